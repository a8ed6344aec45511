// Device code of uxnet::layer_norm_channels_first (see op.cu): per-voxel kernels (common/voxel_stats.cuh).
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/common/voxel_stats.cuh"

namespace uxnet {
namespace gpu {

// Columns of the layer_norm_channels_first parameter-gradient buffer, per channel.
constexpr int kLnColWeight = 0;
constexpr int kLnColBias = 1;
constexpr int kLnCols = 2;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    layer_norm_channels_first_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                             acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out,
                                             ChannelsFirstLayout layout, int64_t voxels, acc_t eps) {
  const int64_t v = global_thread_index();
  if (v >= voxels) {
    return;
  }
  const int64_t base = layout.base(v);
  acc_t mean, rstd;
  channel_stats(x, base, layout, eps, mean, rstd);
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const acc_t normed = (static_cast<acc_t>(x[i]) - mean) * rstd;
    out[i] = static_cast<scalar_t>(normed * static_cast<acc_t>(weight[c]) + static_cast<acc_t>(bias[c]));
  }
  mean_out[v] = mean;
  rstd_out[v] = rstd;
}

// grad_x = rstd * (gx - mean_c(gx) - xhat * mean_c(gx * xhat)),  gx = grad_out * weight, xhat = (x - mean) * rstd.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    layer_norm_channels_first_grad_input_kernel(const scalar_t* __restrict__ grad_out,
                                                const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                                const acc_t* __restrict__ mean_in, const acc_t* __restrict__ rstd_in,
                                                scalar_t* __restrict__ grad_x, ChannelsFirstLayout layout,
                                                int64_t voxels) {
  const int64_t v = global_thread_index();
  if (v >= voxels) {
    return;
  }
  const int64_t base = layout.base(v);
  const acc_t mean = mean_in[v];
  const acc_t rstd = rstd_in[v];
  acc_t sum_gx = acc_t(0);
  acc_t sum_gx_xhat = acc_t(0);
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
    const acc_t gx = static_cast<acc_t>(grad_out[i]) * static_cast<acc_t>(weight[c]);
    sum_gx += gx;
    sum_gx_xhat += gx * xhat;
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(layout.channels);
  const acc_t mean_gx = sum_gx * inv_c;
  const acc_t mean_gx_xhat = sum_gx_xhat * inv_c;
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
    const acc_t gx = static_cast<acc_t>(grad_out[i]) * static_cast<acc_t>(weight[c]);
    grad_x[i] = static_cast<scalar_t>(rstd * (gx - mean_gx - xhat * mean_gx_xhat));
  }
}

// partial[row, c * kLnCols + {weight, bias}] = sum over the row's voxels of {grad_out * xhat, grad_out}.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    layer_norm_channels_first_param_partial_kernel(const scalar_t* __restrict__ grad_out,
                                                   const scalar_t* __restrict__ x, const acc_t* __restrict__ mean_in,
                                                   const acc_t* __restrict__ rstd_in, acc_t* __restrict__ partial,
                                                   ChannelsFirstLayout layout, int64_t voxels,
                                                   int64_t voxels_per_row, int64_t rows) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kVoxelThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) {
    return;  // the whole warp
  }
  const int64_t first = row * voxels_per_row;
  const int64_t last = first + voxels_per_row < voxels ? first + voxels_per_row : voxels;
  acc_t* partial_row = partial + row * layout.channels * kLnCols;
  for (int64_t c = 0; c < layout.channels; ++c) {
    acc_t sum_g_xhat = acc_t(0);
    acc_t sum_g = acc_t(0);
    for (int64_t v = first + lane; v < last; v += kWarpSize) {
      const int64_t i = layout.base(v) + c * layout.channel_stride;
      const acc_t g = static_cast<acc_t>(grad_out[i]);
      sum_g_xhat += g * (static_cast<acc_t>(x[i]) - mean_in[v]) * rstd_in[v];
      sum_g += g;
    }
    sum_g_xhat = warp_sum(sum_g_xhat);
    sum_g = warp_sum(sum_g);
    if (lane == 0) {
      partial_row[c * kLnCols + kLnColWeight] = sum_g_xhat;
      partial_row[c * kLnCols + kLnColBias] = sum_g;
    }
  }
}

}  // namespace gpu
}  // namespace uxnet
