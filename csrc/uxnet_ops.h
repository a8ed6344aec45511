// Declarations shared by the schema registration and the per-device kernels.
//
// Every op is declared once in registration.cpp (TORCH_LIBRARY(uxnet, m)); each device registers
// its implementations in its own TORCH_LIBRARY_IMPL block (cpu/<op>/, cuda/<op>/), which check their
// arguments with common/arg_checks.h. Shapes and layouts:
//   x, y, residual, grad_out : (N, C, D, H, W), NCDHW-contiguous or channels_last_3d; outputs keep
//                              the memory format of the first tensor argument.
//   dwconv weight            : (C, 1, KD, KH, KW), odd KD/KH/KW;  bias: (C,)
//   layer norm weight/bias   : (C,)
//   ux_mlp w1, b1, w2        : (C, 4) contiguous (the grouped 1x1x1 convs, reshaped); b2, gamma: (C,)
//   mean, rstd               : (N, D, H, W), float64 for float64 inputs, float32 otherwise; (N, C) for the
//                              instance-norm ops.
//   shortcut weights         : (C, C_i, 1, 1, 1), one per shortcut input (N, C_i, D, H, W).
// Masked-out gradients (output_mask[i] == false) are returned as empty tensors of shape (0,).
#pragma once

#include <ATen/core/Tensor.h>

namespace uxnet {

// Memory format an output should take so that it matches `like`.
at::MemoryFormat suggested_memory_format(const at::Tensor& like);

// Number of elements of a stats tensor (N*D*H*W) as int64.
int64_t voxels_per_batch(const at::Tensor& x);

// dtype of the saved statistics (mean, rstd) for inputs of dtype `input`.
inline at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace uxnet
