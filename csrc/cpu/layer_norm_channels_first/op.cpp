// CPU ops uxnet::layer_norm_channels_first and uxnet::layer_norm_channels_first_backward: LayerNorm over the
// channel dim of (N, C, D, H, W), NCDHW-contiguous or channels_last_3d, float32 / bfloat16 (float32 math and stats) and
// float64. Checks, allocation and threading here; the chunk kernels (kernels.h, compiled per ISA variant in
// kernels.cpp) run with the variant simd::selected_isa() picks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "common/arg_checks.h"
#include "cpu/common/host.h"
#include "cpu/common/isa_check.h"
#include "cpu/layer_norm_channels_first/params.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace layer_norm_channels_first {
namespace {

constexpr const char* kForwardOp = "uxnet::layer_norm_channels_first";
constexpr const char* kBackwardOp = "uxnet::layer_norm_channels_first_backward";

// Row blocks in both layouts (channels_last_3d: a block is one contiguous run of voxels).
voxel_tiling::VoxelTiling layer_norm_tiling(const at::Tensor& x, at::MemoryFormat format) {
  return host::make_tiling(x, format, /*row_blocks=*/true);
}

void check_param(const char* op, const at::Tensor& x, const at::Tensor& param, const char* name) {
  checks::channel_param(op, x, "x", param, name);
  checks::shape(op, param, name, {x.size(1)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_channels_first_cpu(const at::Tensor& x,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& bias, double eps) {
  host::check_kernel_dtype(kForwardOp, x);
  const simd::Isa isa = selected_isa_for(kForwardOp);
  checks::channels_first_input(kForwardOp, x, "x");
  check_param(kForwardOp, x, weight, "weight");
  check_param(kForwardOp, x, bias, "bias");
  checks::positive_eps(kForwardOp, eps);
  const at::MemoryFormat format = suggested_memory_format(x);
  const at::Tensor xc = x.contiguous(format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor mean = host::empty_stats(x);
  at::Tensor rstd = host::empty_stats(x);
  if (x.numel() == 0) {
    mean.fill_(NAN);  // statistics over zero channels are undefined, as for the reference mean
    rstd.fill_(NAN);
    return {out, mean, rstd};
  }
  const voxel_tiling::VoxelTiling tiling = layer_norm_tiling(xc, format);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "uxnet_layer_norm_channels_first_cpu", [&] {
    using acc_t = host::acc_type<scalar_t>;
    using kernel_t = host::kernel_type<scalar_t>;
    const at::Tensor w = host::param_table<acc_t>(weight);
    const at::Tensor b = host::param_table<acc_t>(bias);
    const ForwardArgs<kernel_t, acc_t> args{host::kernel_data<scalar_t>(xc), w.data_ptr<acc_t>(),
                                            b.data_ptr<acc_t>(),                host::kernel_data_mut<scalar_t>(out),
                                            mean.data_ptr<acc_t>(),             rstd.data_ptr<acc_t>(),
                                            static_cast<acc_t>(eps),            tiling};
    host::run_chunks(args, kernels<kernel_t, acc_t>(isa, tiling.channels_last, tiling.channels).forward);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_channels_first_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, std::array<bool, 3> output_mask) {
  host::check_kernel_dtype(kBackwardOp, x);
  const simd::Isa isa = selected_isa_for(kBackwardOp);
  checks::channels_first_input(kBackwardOp, x, "x");
  check_param(kBackwardOp, x, weight, "weight");
  checks::like(kBackwardOp, grad_out, "grad_out", x, "x");
  checks::voxel_stats(kBackwardOp, x, mean, "mean");
  checks::voxel_stats(kBackwardOp, x, rstd, "rstd");
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const bool want_params = output_mask[1] || output_mask[2];
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(format))
                                     : x.new_empty({0});
  if (x.numel() == 0) {
    return {grad_x, output_mask[1] ? at::zeros_like(weight) : x.new_empty({0}),
            output_mask[2] ? at::zeros_like(weight) : x.new_empty({0})};
  }
  const at::Tensor gc = grad_out.contiguous(format);
  const at::Tensor xc = x.contiguous(format);
  const voxel_tiling::VoxelTiling tiling = layer_norm_tiling(xc, format);
  at::Tensor partials = want_params ? host::empty_partials(x, tiling, kLayerNormParams) : at::Tensor();
  at::Tensor grad_weight = x.new_empty({0});
  at::Tensor grad_bias = x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "uxnet_layer_norm_channels_first_backward_cpu", [&] {
    using acc_t = host::acc_type<scalar_t>;
    using kernel_t = host::kernel_type<scalar_t>;
    const at::Tensor w = host::param_table<acc_t>(weight);
    const at::Tensor mean_c = mean.contiguous();
    const at::Tensor rstd_c = rstd.contiguous();
    const BackwardArgs<kernel_t, acc_t> args{host::kernel_data<scalar_t>(gc),
                                             host::kernel_data<scalar_t>(xc),
                                             w.data_ptr<acc_t>(),
                                             mean_c.data_ptr<acc_t>(),
                                             rstd_c.data_ptr<acc_t>(),
                                             output_mask[0] ? host::kernel_data_mut<scalar_t>(grad_x) : nullptr,
                                             want_params ? partials.data_ptr<double>() : nullptr,
                                             tiling};
    host::run_chunks(args, kernels<kernel_t, acc_t>(isa, tiling.channels_last, tiling.channels).backward);
    if (output_mask[1]) grad_weight = host::partial_row_sum<scalar_t>(partials, 0, x.options());
    if (output_mask[2]) grad_bias = host::partial_row_sum<scalar_t>(partials, 1, x.options());
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace layer_norm_channels_first
}  // namespace cpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("layer_norm_channels_first", &uxnet::cpu::layer_norm_channels_first::layer_norm_channels_first_cpu);
  m.impl("layer_norm_channels_first_backward",
         &uxnet::cpu::layer_norm_channels_first::layer_norm_channels_first_backward_cpu);
}
