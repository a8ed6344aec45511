// Device code of uxnet::dwconv3d (see op.cu for the design). NCDHW-contiguous tensors only.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"

namespace uxnet {
namespace gpu {

// Forward tile: kThreadsH x kThreadsW threads, each computing kOutsW outputs strided by kThreadsW along W
// (so neighbouring threads read neighbouring shared-memory words).
constexpr int kThreadsW = 8;
constexpr int kOutsW = 4;
constexpr int kThreadsH = 16;
constexpr int kTileW = kThreadsW * kOutsW;  // 32
constexpr int kTileH = kThreadsH;           // 16
constexpr int kForwardThreads = kThreadsW * kThreadsH;

// Grad-weight blocks.
constexpr int kGradWeightThreads = 256;
// Stages rows [row0, row0 + rows) x columns [col0, col0 + cols) of one H x W plane in shared memory,
// zero outside the plane. All threads of the block take part.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_plane_tile(const scalar_t* __restrict__ plane, int64_t H, int64_t W,
                                                int64_t row0, int64_t col0, int rows, int cols,
                                                acc_t* __restrict__ tile) {
  const int count = rows * cols;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int r = i / cols;
    const int q = i - r * cols;
    const int64_t h = row0 + r;
    const int64_t w = col0 + q;
    const bool inside = h >= 0 && h < H && w >= 0 && w < W;
    tile[i] = inside ? static_cast<acc_t>(plane[h * W + w]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kForwardThreads)
    dwconv3d_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t C,
                            int64_t D, int64_t H, int64_t W, int KD, int KH, int KW, int64_t tiles_h,
                            int64_t tiles_w) {
  UXNET_DYNAMIC_SHARED(shared_bytes);
  acc_t* plane_tile = reinterpret_cast<acc_t*>(shared_bytes);
  const int in_rows = kTileH + KH - 1;
  const int in_cols = kTileW + KW - 1;
  acc_t* plane_weights = plane_tile + in_rows * in_cols;

  int64_t index = blockIdx.x;
  const int64_t tile_w = index % tiles_w;
  index /= tiles_w;
  const int64_t tile_h = index % tiles_h;
  index /= tiles_h;
  const int64_t d = index % D;
  const int64_t nc = index / D;  // n * C + c
  const int64_t c = nc % C;
  const int64_t h0 = tile_h * kTileH;
  const int64_t w0 = tile_w * kTileW;
  const int tx = threadIdx.x % kThreadsW;
  const int ty = threadIdx.x / kThreadsW;
  const int64_t plane_size = H * W;
  const int taps_per_plane = KH * KW;
  const scalar_t* x_nc = x + nc * D * plane_size;
  const scalar_t* weight_c = weight + c * KD * taps_per_plane;

  acc_t acc[kOutsW];
#pragma unroll
  for (int o = 0; o < kOutsW; ++o) {
    acc[o] = acc_t(0);
  }

  for (int kd = 0; kd < KD; ++kd) {
    const int64_t d_in = d + kd - KD / 2;
    if (d_in < 0 || d_in >= D) {
      continue;  // the same for every thread of the block
    }
    __syncthreads();  // the previous plane is no longer being read
    load_plane_tile(x_nc + d_in * plane_size, H, W, h0 - KH / 2, w0 - KW / 2, in_rows, in_cols, plane_tile);
    for (int i = threadIdx.x; i < taps_per_plane; i += blockDim.x) {
      plane_weights[i] = static_cast<acc_t>(weight_c[kd * taps_per_plane + i]);
    }
    __syncthreads();
    for (int kh = 0; kh < KH; ++kh) {
      const acc_t* row = plane_tile + (ty + kh) * in_cols + tx;
      const acc_t* row_weights = plane_weights + kh * KW;
      for (int kw = 0; kw < KW; ++kw) {
        const acc_t wv = row_weights[kw];
#pragma unroll
        for (int o = 0; o < kOutsW; ++o) {
          acc[o] += wv * row[kw + o * kThreadsW];
        }
      }
    }
  }

  const int64_t h = h0 + ty;
  if (h < H) {
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    scalar_t* out_row = out + (nc * D + d) * plane_size + h * W;
#pragma unroll
    for (int o = 0; o < kOutsW; ++o) {
      const int64_t w = w0 + tx + o * kThreadsW;
      if (w < W) {
        out_row[w] = static_cast<scalar_t>(acc[o] + b);
      }
    }
  }
}

// Block (c, b, kd) with b = (n, h-tile group, w-tile) writes, for every tap (kh, kw) of kernel plane kd,
// sum over its output voxels of grad_out * x into partial[b, c * K + kd * KH * KW + kh * KW + kw].
// Threads: tap_local = t % taps_per_group, slice = t / taps_per_group; slice s sums tile rows s, s + slices, ...;
// the slices are then added in ascending order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGradWeightThreads)
    dwconv3d_grad_weight_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                acc_t* __restrict__ partial, int64_t C, int64_t D, int64_t H, int64_t W,
                                int KD, int KH, int KW, int64_t tiles_h, int64_t tiles_w,
                                int64_t h_tiles_per_block, int64_t h_groups, int64_t blocks_per_channel) {
  UXNET_DYNAMIC_SHARED(shared_bytes);
  const int in_rows = kTileH + KH - 1;
  const int in_cols = kTileW + KW - 1;
  acc_t* x_tile = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* g_tile = x_tile + in_rows * in_cols;
  acc_t* slice_sums = g_tile + kTileH * kTileW;

  const int taps_per_plane = KH * KW;
  const int64_t K = static_cast<int64_t>(KD) * taps_per_plane;
  int64_t index = blockIdx.x;
  const int kd = static_cast<int>(index % KD);
  index /= KD;
  const int64_t b = index % blocks_per_channel;
  const int64_t c = index / blocks_per_channel;
  const int64_t tile_w = b % tiles_w;
  const int64_t h_group = (b / tiles_w) % h_groups;
  const int64_t n = b / (tiles_w * h_groups);
  const int64_t w0 = tile_w * kTileW;
  const int64_t plane_size = H * W;
  const scalar_t* g_nc = grad_out + (n * C + c) * D * plane_size;
  const scalar_t* x_nc = x + (n * C + c) * D * plane_size;
  const int64_t h_tile_begin = h_group * h_tiles_per_block;
  const int64_t h_tile_end =
      h_tile_begin + h_tiles_per_block < tiles_h ? h_tile_begin + h_tiles_per_block : tiles_h;

  const int taps_per_group = min(taps_per_plane, kGradWeightThreads);
  const int slices = min(kGradWeightThreads / taps_per_group, kTileH);
  const int tap_local = threadIdx.x % taps_per_group;
  const int slice = threadIdx.x / taps_per_group;
  const int tap_groups = (taps_per_plane + taps_per_group - 1) / taps_per_group;

  for (int group = 0; group < tap_groups; ++group) {
    const int tap = group * taps_per_group + tap_local;
    const bool active = slice < slices && tap < taps_per_plane;
    const int kh = active ? tap / KW : 0;
    const int kw = active ? tap - kh * KW : 0;
    acc_t acc = acc_t(0);
    for (int64_t tile_h = h_tile_begin; tile_h < h_tile_end; ++tile_h) {
      const int64_t h0 = tile_h * kTileH;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t d_in = d + kd - KD / 2;
        if (d_in < 0 || d_in >= D) {
          continue;  // the same for every thread of the block
        }
        __syncthreads();  // the previous tiles are no longer being read
        load_plane_tile(g_nc + d * plane_size, H, W, h0, w0, kTileH, kTileW, g_tile);
        load_plane_tile(x_nc + d_in * plane_size, H, W, h0 - KH / 2, w0 - KW / 2, in_rows, in_cols, x_tile);
        __syncthreads();
        if (active) {
          for (int r = slice; r < kTileH; r += slices) {
            const acc_t* g_row = g_tile + r * kTileW;
            const acc_t* x_row = x_tile + (r + kh) * in_cols + kw;
#pragma unroll 8
            for (int q = 0; q < kTileW; ++q) {
              acc += g_row[q] * x_row[q];
            }
          }
        }
      }
    }
    slice_sums[threadIdx.x] = active ? acc : acc_t(0);
    __syncthreads();
    if (slice == 0 && tap < taps_per_plane) {
      acc_t total = acc_t(0);
      for (int s = 0; s < slices; ++s) {
        total += slice_sums[s * taps_per_group + tap_local];
      }
      partial[b * (C * K) + c * K + static_cast<int64_t>(kd) * taps_per_plane + tap] = total;
    }
    __syncthreads();  // slice_sums is rewritten by the next group
  }
}

}  // namespace gpu
}  // namespace uxnet
