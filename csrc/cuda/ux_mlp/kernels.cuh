// Device code of uxnet::ux_mlp (see op.cu): per-voxel kernels (common/voxel_stats.cuh). Per voxel and channel c,
//   n = xhat * ln_weight + ln_bias,  a_j = w1_j * n + b1_j,  h_j = GELU(a_j),  z = sum_j w2_j h_j + b2,
//   out = residual + gamma * z.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"
#include "cuda/common/voxel_stats.cuh"

namespace uxnet {
namespace gpu {

constexpr int kHidden = 4;  // hidden channels per channel in the UX MLP (pwconv1: C -> 4C, groups = C)

// Columns of the ux_mlp parameter-gradient buffer, per channel.
constexpr int kMlpColLnWeight = 0;
constexpr int kMlpColLnBias = 1;
constexpr int kMlpColW1 = 2;
constexpr int kMlpColB1 = kMlpColW1 + kHidden;
constexpr int kMlpColW2 = kMlpColB1 + kHidden;
constexpr int kMlpColB2 = kMlpColW2 + kHidden;
constexpr int kMlpColGamma = kMlpColB2 + 1;
constexpr int kMlpCols = kMlpColGamma + 1;  // 16

// GELU(a) = a * Phi(a) with the exact normal CDF Phi(a) = (1 + erf(a / sqrt(2))) / 2.
template <typename T>
__device__ __forceinline__ T gelu_erf(T a) {
  const T kInvSqrt2 = T(0.70710678118654752440);
  return T(0.5) * a * (T(1) + erf_(a * kInvSqrt2));
}

// d GELU / d a = Phi(a) + a * phi(a), phi the standard normal density.
template <typename T>
__device__ __forceinline__ T gelu_erf_grad(T a) {
  const T kInvSqrt2 = T(0.70710678118654752440);
  const T kInvSqrt2Pi = T(0.39894228040143267794);
  return T(0.5) * (T(1) + erf_(a * kInvSqrt2)) + a * kInvSqrt2Pi * exp_(T(-0.5) * a * a);
}

template <typename acc_t>
struct MlpChannel {
  acc_t ln_weight, ln_bias, w1[kHidden], b1[kHidden], w2[kHidden], b2, gamma;
};

// Parameters of channel c in acc_t; gamma may be null (layer scale 1). w1, b1, w2 are (C, 4) contiguous.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ MlpChannel<acc_t> load_mlp_channel(
    int64_t c, const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias,
    const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1, const scalar_t* __restrict__ w2,
    const scalar_t* __restrict__ b2, const scalar_t* __restrict__ gamma) {
  MlpChannel<acc_t> p;
  p.ln_weight = static_cast<acc_t>(ln_weight[c]);
  p.ln_bias = static_cast<acc_t>(ln_bias[c]);
#pragma unroll
  for (int j = 0; j < kHidden; ++j) {
    p.w1[j] = static_cast<acc_t>(w1[c * kHidden + j]);
    p.b1[j] = static_cast<acc_t>(b1[c * kHidden + j]);
    p.w2[j] = static_cast<acc_t>(w2[c * kHidden + j]);
  }
  p.b2 = static_cast<acc_t>(b2[c]);
  p.gamma = gamma != nullptr ? static_cast<acc_t>(gamma[c]) : acc_t(1);
  return p;
}

// Gradients of one (voxel, channel) given d loss / d out = g: the contributions to every parameter
// (per kMlpCol*) and d loss / d xhat.
template <typename acc_t>
struct MlpChannelGrad {
  acc_t cols[kMlpCols];
  acc_t grad_xhat;
};

template <typename acc_t>
__device__ __forceinline__ MlpChannelGrad<acc_t> mlp_channel_backward(const MlpChannel<acc_t>& p, acc_t xhat,
                                                                      acc_t g) {
  MlpChannelGrad<acc_t> r;
  const acc_t normed = xhat * p.ln_weight + p.ln_bias;
  const acc_t grad_z = g * p.gamma;
  acc_t z = p.b2;
  acc_t grad_normed = acc_t(0);
#pragma unroll
  for (int j = 0; j < kHidden; ++j) {
    const acc_t a = p.w1[j] * normed + p.b1[j];
    const acc_t h = gelu_erf(a);
    z += p.w2[j] * h;
    const acc_t grad_a = grad_z * p.w2[j] * gelu_erf_grad(a);
    r.cols[kMlpColW2 + j] = grad_z * h;
    r.cols[kMlpColB1 + j] = grad_a;
    r.cols[kMlpColW1 + j] = grad_a * normed;
    grad_normed += grad_a * p.w1[j];
  }
  r.cols[kMlpColB2] = grad_z;
  r.cols[kMlpColGamma] = g * z;
  r.cols[kMlpColLnBias] = grad_normed;
  r.cols[kMlpColLnWeight] = grad_normed * xhat;
  r.grad_xhat = grad_normed * p.ln_weight;
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    ux_mlp_forward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ residual,
                          const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias,
                          const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
                          const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
                          const scalar_t* __restrict__ gamma, scalar_t* __restrict__ out,
                          acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, ChannelsFirstLayout layout,
                          int64_t voxels, acc_t eps) {
  const int64_t v = global_thread_index();
  if (v >= voxels) {
    return;
  }
  const int64_t base = layout.base(v);
  acc_t mean, rstd;
  channel_stats(y, base, layout, eps, mean, rstd);
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const MlpChannel<acc_t> p = load_mlp_channel<scalar_t, acc_t>(c, ln_weight, ln_bias, w1, b1, w2, b2, gamma);
    const acc_t normed = (static_cast<acc_t>(y[i]) - mean) * rstd * p.ln_weight + p.ln_bias;
    acc_t z = p.b2;
#pragma unroll
    for (int j = 0; j < kHidden; ++j) {
      z += p.w2[j] * gelu_erf(p.w1[j] * normed + p.b1[j]);
    }
    acc_t result = p.gamma * z;
    if (residual != nullptr) {
      result += static_cast<acc_t>(residual[i]);
    }
    out[i] = static_cast<scalar_t>(result);
  }
  mean_out[v] = mean;
  rstd_out[v] = rstd;
}

// grad_y = rstd * (gxhat - mean_c(gxhat) - xhat * mean_c(gxhat * xhat)); the hidden activations are
// recomputed from y and the saved statistics (twice: once for the channel sums, once for the output).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    ux_mlp_grad_input_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                             const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias,
                             const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
                             const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
                             const scalar_t* __restrict__ gamma, const acc_t* __restrict__ mean_in,
                             const acc_t* __restrict__ rstd_in, scalar_t* __restrict__ grad_y,
                             ChannelsFirstLayout layout, int64_t voxels) {
  const int64_t v = global_thread_index();
  if (v >= voxels) {
    return;
  }
  const int64_t base = layout.base(v);
  const acc_t mean = mean_in[v];
  const acc_t rstd = rstd_in[v];
  acc_t sum_gxhat = acc_t(0);
  acc_t sum_gxhat_xhat = acc_t(0);
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const MlpChannel<acc_t> p = load_mlp_channel<scalar_t, acc_t>(c, ln_weight, ln_bias, w1, b1, w2, b2, gamma);
    const acc_t xhat = (static_cast<acc_t>(y[i]) - mean) * rstd;
    const acc_t gxhat = mlp_channel_backward(p, xhat, static_cast<acc_t>(grad_out[i])).grad_xhat;
    sum_gxhat += gxhat;
    sum_gxhat_xhat += gxhat * xhat;
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(layout.channels);
  const acc_t mean_gxhat = sum_gxhat * inv_c;
  const acc_t mean_gxhat_xhat = sum_gxhat_xhat * inv_c;
  for (int64_t c = 0; c < layout.channels; ++c) {
    const int64_t i = base + c * layout.channel_stride;
    const MlpChannel<acc_t> p = load_mlp_channel<scalar_t, acc_t>(c, ln_weight, ln_bias, w1, b1, w2, b2, gamma);
    const acc_t xhat = (static_cast<acc_t>(y[i]) - mean) * rstd;
    const acc_t gxhat = mlp_channel_backward(p, xhat, static_cast<acc_t>(grad_out[i])).grad_xhat;
    grad_y[i] = static_cast<scalar_t>(rstd * (gxhat - mean_gxhat - xhat * mean_gxhat_xhat));
  }
}

// partial[row, c * kMlpCols + col] = sum over the row's voxels of the col-th parameter contribution.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kVoxelThreads)
    ux_mlp_param_partial_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias,
                                const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
                                const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
                                const scalar_t* __restrict__ gamma, const acc_t* __restrict__ mean_in,
                                const acc_t* __restrict__ rstd_in, acc_t* __restrict__ partial,
                                ChannelsFirstLayout layout, int64_t voxels, int64_t voxels_per_row, int64_t rows) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kVoxelThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) {
    return;  // the whole warp
  }
  const int64_t first = row * voxels_per_row;
  const int64_t last = first + voxels_per_row < voxels ? first + voxels_per_row : voxels;
  acc_t* partial_row = partial + row * layout.channels * kMlpCols;
  for (int64_t c = 0; c < layout.channels; ++c) {
    const MlpChannel<acc_t> p = load_mlp_channel<scalar_t, acc_t>(c, ln_weight, ln_bias, w1, b1, w2, b2, gamma);
    acc_t sums[kMlpCols];
#pragma unroll
    for (int k = 0; k < kMlpCols; ++k) {
      sums[k] = acc_t(0);
    }
    for (int64_t v = first + lane; v < last; v += kWarpSize) {
      const int64_t i = layout.base(v) + c * layout.channel_stride;
      const acc_t xhat = (static_cast<acc_t>(y[i]) - mean_in[v]) * rstd_in[v];
      const MlpChannelGrad<acc_t> r = mlp_channel_backward(p, xhat, static_cast<acc_t>(grad_out[i]));
#pragma unroll
      for (int k = 0; k < kMlpCols; ++k) {
        sums[k] += r.cols[k];
      }
    }
#pragma unroll
    for (int k = 0; k < kMlpCols; ++k) {
      sums[k] = warp_sum(sums[k]);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kMlpCols; ++k) {
        partial_row[c * kMlpCols + k] = sums[k];
      }
    }
  }
}

}  // namespace gpu
}  // namespace uxnet
