// Argument checks of the uxnet ops that do not depend on the device: used by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) implementations alike, so a direct caller of torch.ops.uxnet.* (C++, TorchScript) gets the same
// errors on every device. Each throws a c10::Error (RuntimeError in Python) whose message starts with the op's
// name and states what was expected and what was got. Checks of what one device's kernels implement (dtypes,
// launch sizes) stay with that device (cpu/common/host.h, cuda/common/host.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace uxnet {
namespace checks {

// ---- one property of a tensor ----------------------------------------------------------------------------------

// "<op>: expected <name> of shape (N, C, D, H, W), got <k>-d tensor of shape <sizes>"
void five_dim(const char* op, const at::Tensor& t, const char* name);
// "<op>: expected <name> to have a floating dtype (float32, bfloat16, float16 or float64), got <dtype>"
void floating(const char* op, const at::Tensor& t, const char* name);
// "<op>: expected <name> of shape <expected>, got <sizes>"
void shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected);
// "<op>: expected <name> dtype <like's dtype> (the dtype of <like_name>), got <dtype>"
void same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                const char* like_name);
// "<op>: expected <name> on <like's device>, got <device>"
void same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like);
// t has the shape, dtype and device of `like` (grad_out or a residual against the op's input).
void like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name);
// "<op>: expected eps > 0, got <eps>"
void positive_eps(const char* op, double eps);

// ---- the arguments of an op family ---------------------------------------------------------------------------

// dwconv3d: x (N, C, D, H, W) floating; weight (C, 1, KD, KH, KW) with odd kernel sizes; bias (C,) or absent;
// all of x's dtype and device.
void dwconv3d_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias);
// conv3d_3x3x3: x (N, C_in, D, H, W) floating; weight (C_out, C_in, 3, 3, 3); bias (C_out,) or absent; all of x's
// dtype and device.
void conv3d_3x3x3_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias);
// The channels-first ops (LayerNorm, UX MLP): x (N, C, D, H, W) floating.
void channels_first_input(const char* op, const at::Tensor& x, const char* name);
// A per-channel parameter of a channels-first op: C rows along dim 0, x's dtype and device.
void channel_param(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& param,
                   const char* name);
// Saved per-voxel statistics (mean, rstd) of the channels-first ops: (N, D, H, W), stats_dtype (uxnet_ops.h),
// on x's device.
void voxel_stats(const char* op, const at::Tensor& x, const at::Tensor& stats, const char* name);

}  // namespace checks
}  // namespace uxnet
