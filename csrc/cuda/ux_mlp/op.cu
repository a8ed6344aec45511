// CUDA kernels of uxnet::ux_mlp and uxnet::ux_mlp_backward: the fused UX block tail
// residual + gamma * pwconv2(GELU(pwconv1(LN(y)))) with per-channel (grouped) 1x1x1 convolutions, one
// thread per voxel, NCDHW-contiguous or channels_last_3d natively. The backward recomputes the 4C hidden
// activations from y and the saved statistics instead of storing them; the parameter gradients are
// reduced deterministically (per-warp partial sums over a fixed voxel partition, then a fixed-order row
// reduction). Kernels: kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>

#include "common/arg_checks.h"
#include "cuda/common/host.cuh"
#include "cuda/ux_mlp/kernels.cuh"
#include "uxnet_ops.h"

namespace uxnet {
namespace gpu {
namespace {

const at::Tensor* optional_tensor(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// The parameters, checked against y and made contiguous.
struct MlpParams {
  at::Tensor ln_weight, ln_bias, w1, b1, w2, b2, gamma;  // gamma undefined when absent

  template <typename scalar_t>
  const scalar_t* gamma_ptr() const {
    return gamma.defined() ? gamma.const_data_ptr<scalar_t>() : nullptr;
  }
};

MlpParams checked_params(const char* op, const at::Tensor& y, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         const at::Tensor* gamma) {
  const int64_t channels = y.size(1);
  const std::array<std::pair<const at::Tensor*, const char*>, 6> params{
      {{&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}, {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}}};
  for (const auto& [tensor, name] : params) {
    checks::channel_param(op, y, "y", *tensor, name);
  }
  checks::shape(op, ln_weight, "ln_weight", {channels});
  checks::shape(op, ln_bias, "ln_bias", {channels});
  checks::shape(op, w1, "w1", {channels, kHidden});
  checks::shape(op, b1, "b1", {channels, kHidden});
  checks::shape(op, w2, "w2", {channels, kHidden});
  checks::shape(op, b2, "b2", {channels});
  if (gamma != nullptr) {
    checks::channel_param(op, y, "y", *gamma, "gamma");
    checks::shape(op, *gamma, "gamma", {channels});
  }
  return MlpParams{ln_weight.contiguous(), ln_bias.contiguous(), w1.contiguous(), b1.contiguous(),
                   w2.contiguous(),        b2.contiguous(),      gamma != nullptr ? gamma->contiguous() : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ux_mlp_cuda(
    const at::Tensor& y, const c10::optional<at::Tensor>& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const c10::optional<at::Tensor>& gamma, double eps) {
  constexpr const char* op = "uxnet::ux_mlp";
  checks::channels_first_input(op, y, "y");
  const MlpParams p = checked_params(op, y, ln_weight, ln_bias, w1, b1, w2, b2, optional_tensor(gamma));
  const at::Tensor* residual_in = optional_tensor(residual);
  if (residual_in != nullptr) {
    checks::like(op, *residual_in, "residual", y, "y");
  }
  const c10::cuda::CUDAGuard guard(y.device());

  const at::MemoryFormat format = suggested_memory_format(y);
  const at::Tensor y_c = y.contiguous(format);
  const at::Tensor residual_c = residual_in != nullptr ? residual_in->contiguous(format) : at::Tensor();
  const ChannelsFirstLayout layout = make_layout(y_c, format);
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(format));
  const auto stats_options = y.options().dtype(stats_dtype(y.scalar_type()));
  at::Tensor mean = at::empty({y.size(0), y.size(2), y.size(3), y.size(4)}, stats_options);
  at::Tensor rstd = at::empty_like(mean);
  const int64_t voxels = voxels_per_batch(y);
  if (voxels == 0) {
    return std::make_tuple(out, mean, rstd);
  }
  const int64_t blocks = ceil_div(voxels, kVoxelThreads);
  check_grid(op, blocks);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, y.scalar_type(),
                                  "uxnet_ux_mlp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ux_mlp_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kVoxelThreads, 0, stream>>>(
        y_c.const_data_ptr<scalar_t>(), residual_c.defined() ? residual_c.const_data_ptr<scalar_t>() : nullptr,
        p.ln_weight.const_data_ptr<scalar_t>(), p.ln_bias.const_data_ptr<scalar_t>(),
        p.w1.const_data_ptr<scalar_t>(), p.b1.const_data_ptr<scalar_t>(), p.w2.const_data_ptr<scalar_t>(),
        p.b2.const_data_ptr<scalar_t>(), p.gamma_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), layout, voxels, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(out, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ux_mlp_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& ln_weight,
                     const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2, const c10::optional<at::Tensor>& gamma, const at::Tensor& mean,
                     const at::Tensor& rstd) {
  constexpr const char* op = "uxnet::ux_mlp_backward";
  checks::channels_first_input(op, y, "y");
  const MlpParams p = checked_params(op, y, ln_weight, ln_bias, w1, b1, w2, b2, optional_tensor(gamma));
  checks::like(op, grad_out, "grad_out", y, "y");
  checks::voxel_stats(op, y, mean, "mean");
  checks::voxel_stats(op, y, rstd, "rstd");
  const c10::cuda::CUDAGuard guard(y.device());

  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const at::Tensor grad_out_c = grad_out.contiguous(format);
  const at::Tensor y_c = y.contiguous(format);
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  const ChannelsFirstLayout layout = make_layout(y_c, format);
  const int64_t voxels = voxels_per_batch(y);
  const int64_t channels = y.size(1);
  const at::ScalarType acc_type = stats_dtype(y.scalar_type());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(format));
  const WarpPartition part = partition_voxels(voxels, channels * kMlpCols, at::elementSize(acc_type));
  at::Tensor sums;  // (C * kMlpCols,)
  if (voxels == 0 || channels == 0) {
    sums = at::zeros({channels * kMlpCols}, y.options().dtype(acc_type));
  } else {
    const int64_t input_blocks = ceil_div(voxels, kVoxelThreads);
    const int64_t partial_blocks = ceil_div(part.rows, kVoxelThreads / kWarpSize);
    check_grid(op, input_blocks);
    check_grid(op, partial_blocks);
    at::Tensor partial = at::empty({part.rows, channels * kMlpCols}, y.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, y.scalar_type(),
                                    "uxnet_ux_mlp_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ux_mlp_grad_input_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned int>(input_blocks), kVoxelThreads, 0, stream>>>(
              grad_out_c.const_data_ptr<scalar_t>(), y_c.const_data_ptr<scalar_t>(),
              p.ln_weight.const_data_ptr<scalar_t>(), p.ln_bias.const_data_ptr<scalar_t>(),
              p.w1.const_data_ptr<scalar_t>(), p.b1.const_data_ptr<scalar_t>(), p.w2.const_data_ptr<scalar_t>(),
              p.b2.const_data_ptr<scalar_t>(), p.gamma_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
              rstd_c.const_data_ptr<acc_t>(), grad_y.mutable_data_ptr<scalar_t>(), layout, voxels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ux_mlp_param_partial_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned int>(partial_blocks), kVoxelThreads, 0, stream>>>(
              grad_out_c.const_data_ptr<scalar_t>(), y_c.const_data_ptr<scalar_t>(),
              p.ln_weight.const_data_ptr<scalar_t>(), p.ln_bias.const_data_ptr<scalar_t>(),
              p.w1.const_data_ptr<scalar_t>(), p.b1.const_data_ptr<scalar_t>(), p.w2.const_data_ptr<scalar_t>(),
              p.b2.const_data_ptr<scalar_t>(), p.gamma_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
              rstd_c.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), layout, voxels,
              part.voxels_per_row, part.rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sums = reduce_partial_rows(op, partial);
  }

  const at::Tensor per_channel = sums.view({channels, kMlpCols});
  const at::Tensor grad_gamma = p.gamma.defined()
                                    ? gradient_like(per_channel.select(1, kMlpColGamma), p.gamma)
                                    : at::empty({0}, ln_weight.options());
  return std::make_tuple(grad_y, gradient_like(per_channel.select(1, kMlpColLnWeight), ln_weight),
                         gradient_like(per_channel.select(1, kMlpColLnBias), ln_bias),
                         gradient_like(per_channel.narrow(1, kMlpColW1, kHidden), w1),
                         gradient_like(per_channel.narrow(1, kMlpColB1, kHidden), b1),
                         gradient_like(per_channel.narrow(1, kMlpColW2, kHidden), w2),
                         gradient_like(per_channel.select(1, kMlpColB2), b2), grad_gamma);
}

}  // namespace
}  // namespace gpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CUDA, m) {
  m.impl("ux_mlp", &uxnet::gpu::ux_mlp_cuda);
  m.impl("ux_mlp_backward", &uxnet::gpu::ux_mlp_backward_cuda);
}
