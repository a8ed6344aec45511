// Torch side of the CPU 3x3x3 convolution: the Winograd driver shared by the forward and the input gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {

// Which filter a Winograd pass convolves with: the weight as given (the forward), or the input gradient's: the
// weight flipped along every axis with its two channel axes swapped (read in place, never materialised).
enum class Filter { kAsGiven, kFlippedTransposed };

// F.conv3d(x, filter, bias, padding=1) for x float32 or float64 (weight and bias of x's dtype), returned
// channels-last in x's dtype. Tiles whose input window holds a NaN or an Inf, and every tile when a weight is
// non-finite, are computed directly (see KernelTable::direct_tile for multiply_padding). `packed`: the weight's
// transformed points from conv3d_3x3x3_pack_weight (checked by the caller; Filter::kAsGiven), or undefined to
// transform them here (few tiles: one slice at a time, never whole).
at::Tensor winograd_conv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool multiply_padding, const at::Tensor& packed, Filter filter = Filter::kAsGiven);

// Few tiles with large filters (768 -> 768 @ 6^3 in the default model): the transformed filter is large against the
// products (forward.cpp). Float32 / float64 stream it per call (768 -> 768 @ 6^3: 26 ms, packed 15, oneDNN 51), so
// a packed weight saves little for its memory (151 MB); bfloat16 without a packed weight runs ATen's bf16
// convolution (prefers_direct).
bool few_tiles_large_filter(int64_t n, int64_t d, int64_t h, int64_t w, int64_t cout, int64_t cin,
                            int64_t element_size);
// Whether a bfloat16 call without a packed weight runs ATen's direct convolution (few tiles, large filter).
bool prefers_direct(const at::Tensor& x, const at::Tensor& weight);
// Whether bfloat16 inputs run bf16 products on the selected ISA (PairKernelTable; else they compute in float32).
bool bf16_products();
// Whether every element of a dense float32 / float64 / bfloat16 tensor is finite.
bool all_finite(const at::Tensor& t);

// The compute dtype of the kernels for an input dtype: float64 stays, everything else computes in float32.
at::ScalarType compute_dtype(at::ScalarType input);

// `result` (channels-last, compute dtype) in `dtype` and `format`, copying only when either differs.
at::Tensor to_output(const at::Tensor& result, at::ScalarType dtype, at::MemoryFormat format);

// The ops (forward.cpp, backward.cpp), registered in op.cpp.
at::Tensor conv3d_3x3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// Inference with the weight transformed once (an eval-mode cache): the packed points (kPoints, panels, C_in, cols)
// of the selected ISA, in the compute dtype, and the forward that reads them.
at::Tensor conv3d_3x3x3_pack_weight_cpu(const at::Tensor& weight);
at::Tensor conv3d_3x3x3_packed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed_weight,
                                   const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3d_3x3x3_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         std::array<bool, 3> output_mask);

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
