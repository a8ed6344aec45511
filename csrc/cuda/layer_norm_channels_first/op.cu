// CUDA kernels of uxnet::layer_norm_channels_first and uxnet::layer_norm_channels_first_backward: LayerNorm over
// the channels of (N, C, D, H, W), NCDHW-contiguous or channels_last_3d natively (one thread per voxel, statistics in
// float, or double for double). Weight and bias gradients are reduced deterministically (per-warp
// partial sums over a fixed voxel partition, then a fixed-order row reduction). Kernels: kernels.cuh.
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

#include "common/arg_checks.h"
#include "cuda/common/host.cuh"
#include "cuda/layer_norm_channels_first/kernels.cuh"
#include "uxnet_ops.h"

namespace uxnet {
namespace gpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_channels_first_cuda(const at::Tensor& x,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bias, double eps) {
  constexpr const char* op = "uxnet::layer_norm_channels_first";
  checks::channels_first_input(op, x, "x");
  checks::channel_param(op, x, "x", weight, "weight");
  checks::channel_param(op, x, "x", bias, "bias");
  checks::shape(op, weight, "weight", {x.size(1)});
  checks::shape(op, bias, "bias", {x.size(1)});
  const c10::cuda::CUDAGuard guard(x.device());

  const at::MemoryFormat format = suggested_memory_format(x);
  const at::Tensor x_c = x.contiguous(format);
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.contiguous();
  const ChannelsFirstLayout layout = make_layout(x_c, format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(0), x.size(2), x.size(3), x.size(4)}, stats_options);
  at::Tensor rstd = at::empty_like(mean);
  const int64_t voxels = voxels_per_batch(x);
  if (voxels == 0) {
    return std::make_tuple(out, mean, rstd);
  }
  const int64_t blocks = ceil_div(voxels, kVoxelThreads);
  check_grid(op, blocks);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "uxnet_layer_norm_channels_first_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_channels_first_forward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(blocks), kVoxelThreads, 0, stream>>>(
            x_c.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(), bias_c.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
            layout, voxels, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(out, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_channels_first_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, std::array<bool, 3> output_mask) {
  constexpr const char* op = "uxnet::layer_norm_channels_first_backward";
  checks::channels_first_input(op, x, "x");
  checks::channel_param(op, x, "x", weight, "weight");
  checks::shape(op, weight, "weight", {x.size(1)});
  checks::like(op, grad_out, "grad_out", x, "x");
  checks::voxel_stats(op, x, mean, "mean");
  checks::voxel_stats(op, x, rstd, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());

  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const at::Tensor grad_out_c = grad_out.contiguous(format);
  const at::Tensor x_c = x.contiguous(format);
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  const ChannelsFirstLayout layout = make_layout(x_c, format);
  const int64_t voxels = voxels_per_batch(x);
  const int64_t channels = x.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_x = at::empty({0}, x.options());
  if (output_mask[0]) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(format));
    if (voxels > 0) {
      const int64_t blocks = ceil_div(voxels, kVoxelThreads);
      check_grid(op, blocks);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                      "uxnet_layer_norm_channels_first_grad_input_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        layer_norm_channels_first_grad_input_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned int>(blocks), kVoxelThreads, 0, stream>>>(
                grad_out_c.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(),
                weight_c.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
                grad_x.mutable_data_ptr<scalar_t>(), layout, voxels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }

  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (output_mask[1] || output_mask[2]) {
    const at::ScalarType acc_type = stats_dtype(x.scalar_type());
    at::Tensor sums;  // (C * kLnCols,)
    const WarpPartition part = partition_voxels(voxels, channels * kLnCols, at::elementSize(acc_type));
    if (part.rows == 0 || channels == 0) {
      sums = at::zeros({channels * kLnCols}, x.options().dtype(acc_type));
    } else {
      at::Tensor partial = at::empty({part.rows, channels * kLnCols}, x.options().dtype(acc_type));
      const int64_t blocks = ceil_div(part.rows, kVoxelThreads / kWarpSize);
      check_grid(op, blocks);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                      "uxnet_layer_norm_channels_first_param_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        layer_norm_channels_first_param_partial_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned int>(blocks), kVoxelThreads, 0, stream>>>(
                grad_out_c.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
                rstd_c.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), layout, voxels,
                part.voxels_per_row, part.rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      sums = reduce_partial_rows(op, partial);
    }
    const at::Tensor per_channel = sums.view({channels, kLnCols});
    if (output_mask[1]) {
      grad_weight = gradient_like(per_channel.select(1, kLnColWeight), weight);
    }
    if (output_mask[2]) {
      grad_bias = gradient_like(per_channel.select(1, kLnColBias), weight);
    }
  }
  return std::make_tuple(grad_x, grad_weight, grad_bias);
}

}  // namespace
}  // namespace gpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CUDA, m) {
  m.impl("layer_norm_channels_first", &uxnet::gpu::layer_norm_channels_first_cuda);
  m.impl("layer_norm_channels_first_backward", &uxnet::gpu::layer_norm_channels_first_backward_cuda);
}
