// uxnet::conv3d_3x3x3_backward on the CPU.
//   grad_x      = the same Winograd convolution of grad_out with the kernel flipped along every axis and its
//                 channel axes swapped, out-of-volume taps skipped where a weight is non-finite (driver.h); few
//                 tiles with large filters: ATen's, in one call with grad_weight;
//   grad_weight = ATen's convolution_backward (oneDNN for float32) in the compute dtype (bfloat16 inputs: in float32,
//                 rounded once; ATen's own bfloat16 path also returned stray Infs under PyTorch's
//                 fill_uninitialized_memory); a Winograd weight gradient is not written yet;
//   grad_bias   = the sum of grad_out over (N, D, H, W), in float64.
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "common/arg_checks.h"
#include "cpu/conv3d_3x3x3/driver.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3d_3x3x3_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         std::array<bool, 3> mask) {
  constexpr const char* op = "uxnet::conv3d_3x3x3_backward";
  checks::conv3d_3x3x3_inputs(op, x, weight, c10::nullopt);
  checks::shape(op, grad_out, "grad_out", {x.size(0), weight.size(0), x.size(2), x.size(3), x.size(4)});
  checks::same_dtype(op, grad_out, "grad_out", x, "x");
  checks::same_device(op, grad_out, "grad_out", x);
  const auto empty_grad = [&] { return at::empty({0}, x.options()); };
  const bool nothing_to_sum = x.numel() == 0 || grad_out.numel() == 0;

  const at::ScalarType compute = compute_dtype(x.scalar_type());
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  // ATen's convolution_backward gives grad_weight and, for few tiles with large filters, grad_x in one call.
  const bool aten_grad_x =
      mask[0] && !nothing_to_sum && prefers_direct(grad_out, weight) && all_finite(weight.to(compute).contiguous());
  at::Tensor grad_x = empty_grad();
  at::Tensor grad_weight = empty_grad();
  if (!nothing_to_sum && (mask[1] || aten_grad_x)) {
    const auto grads = at::convolution_backward(grad_out.to(compute), x.to(compute), weight.to(compute), c10::nullopt,
                                                {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, false, {0, 0, 0}, 1,
                                                {aten_grad_x, mask[1], false});
    if (aten_grad_x) grad_x = to_output(std::get<0>(grads), x.scalar_type(), format);
    if (mask[1]) grad_weight = std::get<1>(grads).to(x.scalar_type()).contiguous();
  }
  if (mask[0] && !aten_grad_x) {
    if (nothing_to_sum) {
      grad_x = at::zeros(x.sizes(), x.options().memory_format(format));
    } else {
      const at::Tensor flipped = weight.to(compute).flip({2, 3, 4}).transpose(0, 1);
      grad_x = to_output(
          winograd_conv(grad_out.to(compute), flipped, c10::nullopt, /*multiply_padding=*/false, at::Tensor()),
          x.scalar_type(), format);
    }
  }
  if (mask[1] && nothing_to_sum) grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_bias = empty_grad();
  if (mask[2]) grad_bias = grad_out.sum({0, 2, 3, 4}, false, at::kDouble).to(x.scalar_type());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
