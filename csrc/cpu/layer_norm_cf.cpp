// CPU kernels of uxnet::layer_norm_cf and uxnet::layer_norm_cf_backward: LayerNorm over the channel dim of
// (N, C, D, H, W), NCDHW-contiguous or channels_last_3d, float32 / bfloat16 (float32 math and stats) and
// float64. The chunk kernels (ln_mlp_layer_norm_kernels.h) are compiled for AVX-512, AVX2+FMA and the
// baseline ISA; the one matching the CPU is picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ln_mlp_common.h"
#include "cpu/ln_mlp_host.h"
#include "uxnet_ops.h"

#define UXNET_LN_MLP_KERNELS_HEADER "cpu/ln_mlp_layer_norm_kernels.h"
#include "cpu/ln_mlp_isa_variants.inc"
#undef UXNET_LN_MLP_KERNELS_HEADER

namespace uxnet {

namespace {

using ln_mlp::LayerNormBackwardArgs;
using ln_mlp::LayerNormForwardArgs;

constexpr const char* kForwardOp = "uxnet::layer_norm_cf";
constexpr const char* kBackwardOp = "uxnet::layer_norm_cf_backward";

template <typename scalar_t, typename acc_t>
void run_forward(const LayerNormForwardArgs<scalar_t, acc_t>& args) {
  using Fn = ln_mlp::ChunkKernel<LayerNormForwardArgs<scalar_t, acc_t>>;
  ln_mlp::run_chunks(args, args.tiling.channels_last
                               ? UXNET_LN_MLP_ISA_KERNEL(Fn, layer_norm_forward_voxels<scalar_t, acc_t>)
                               : UXNET_LN_MLP_ISA_KERNEL(Fn, layer_norm_forward_rows<scalar_t, acc_t>));
}

template <typename scalar_t, typename acc_t>
void run_backward(const LayerNormBackwardArgs<scalar_t, acc_t>& args) {
  using Fn = ln_mlp::ChunkKernel<LayerNormBackwardArgs<scalar_t, acc_t>>;
  ln_mlp::run_chunks(args, args.tiling.channels_last
                               ? UXNET_LN_MLP_ISA_KERNEL(Fn, layer_norm_backward_voxels<scalar_t, acc_t>)
                               : UXNET_LN_MLP_ISA_KERNEL(Fn, layer_norm_backward_rows<scalar_t, acc_t>));
}

// Row blocks in both layouts (channels_last_3d: a block is one contiguous run of voxels).
ln_mlp::VoxelTiling layer_norm_tiling(const at::Tensor& x, at::MemoryFormat format) {
  return ln_mlp::make_tiling(x, format == at::MemoryFormat::ChannelsLast3d, /*row_blocks=*/true);
}

void check_param(const char* op, const at::Tensor& x, const at::Tensor& param, const char* name) {
  check_channels_first_inputs(op, x, param, name);
  ln_mlp::check_param_shape(op, param, name, {x.size(1)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps) {
  ln_mlp::check_kernel_dtype(kForwardOp, x);
  check_param(kForwardOp, x, weight, "weight");
  check_param(kForwardOp, x, bias, "bias");
  TORCH_CHECK(eps > 0, kForwardOp, ": expected eps > 0, got ", eps);
  const at::MemoryFormat format = suggested_memory_format(x);
  const at::Tensor xc = x.contiguous(format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor mean = ln_mlp::empty_stats(x);
  at::Tensor rstd = ln_mlp::empty_stats(x);
  if (x.numel() == 0) {
    mean.fill_(NAN);  // statistics over zero channels are undefined, as for the reference mean
    rstd.fill_(NAN);
    return {out, mean, rstd};
  }
  const ln_mlp::VoxelTiling tiling = layer_norm_tiling(xc, format);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "uxnet_layer_norm_cf_cpu", [&] {
    using acc_t = ln_mlp::acc_type<scalar_t>;
    const at::Tensor w = ln_mlp::param_table<acc_t>(weight);
    const at::Tensor b = ln_mlp::param_table<acc_t>(bias);
    LayerNormForwardArgs<scalar_t, acc_t> args{xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),     b.data_ptr<acc_t>(),
                                               out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                                               static_cast<acc_t>(eps),  tiling};
    run_forward(args);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, std::array<bool, 3> output_mask) {
  ln_mlp::check_kernel_dtype(kBackwardOp, x);
  check_param(kBackwardOp, x, weight, "weight");
  ln_mlp::check_like(kBackwardOp, grad_out, "grad_out", x, "x");
  ln_mlp::check_stats(kBackwardOp, x, mean, "mean");
  ln_mlp::check_stats(kBackwardOp, x, rstd, "rstd");
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
  const ln_mlp::VoxelTiling tiling = layer_norm_tiling(xc, format);
  at::Tensor partials = want_params ? ln_mlp::empty_partials(x, tiling, ln_mlp::kLayerNormParams) : at::Tensor();
  at::Tensor grad_weight = x.new_empty({0});
  at::Tensor grad_bias = x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "uxnet_layer_norm_cf_backward_cpu", [&] {
    using acc_t = ln_mlp::acc_type<scalar_t>;
    const at::Tensor w = ln_mlp::param_table<acc_t>(weight);
    const at::Tensor mean_c = mean.contiguous();
    const at::Tensor rstd_c = rstd.contiguous();
    LayerNormBackwardArgs<scalar_t, acc_t> args{gc.data_ptr<scalar_t>(),
                                                xc.data_ptr<scalar_t>(),
                                                w.data_ptr<acc_t>(),
                                                mean_c.data_ptr<acc_t>(),
                                                rstd_c.data_ptr<acc_t>(),
                                                output_mask[0] ? grad_x.data_ptr<scalar_t>() : nullptr,
                                                want_params ? partials.data_ptr<double>() : nullptr,
                                                tiling};
    run_backward(args);
    if (output_mask[1]) grad_weight = ln_mlp::partial_row_sum<scalar_t>(partials, 0, x.options());
    if (output_mask[2]) grad_bias = ln_mlp::partial_row_sum<scalar_t>(partials, 1, x.options());
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("layer_norm_cf", &uxnet::layer_norm_cf_cpu);
  m.impl("layer_norm_cf_backward", &uxnet::layer_norm_cf_backward_cpu);
}
