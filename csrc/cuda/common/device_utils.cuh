// Device-side helpers of csrc/cuda (no ATen: the kernel headers that include this also compile in the
// CPU emulation test harness, tests/cpp/cuda_emulation/): math overloads for float/double accumulation,
// warp sums, the deterministic row reduction of partial sums, and tensor offsets.
#pragma once

#include <cstdint>

#ifndef UXNET_DYNAMIC_SHARED
// A pointer `name` to the block's dynamic shared memory (aligned for double).
#define UXNET_DYNAMIC_SHARED(name) extern __shared__ __align__(sizeof(double)) unsigned char name[]
#endif

namespace uxnet {
namespace gpu {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }
__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

// Sum over the 32 lanes of a warp, in a fixed tree order (deterministic); the result is valid in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// out[col] = sum over rows r = 0..rows-1 of partial[r * cols + col], in an order that depends only on
// (rows, cols): thread (tx, ty) adds rows ty, ty + kReduceThreadsY, ... of its column, then the
// kReduceThreadsY sums are added in ascending ty. Launch: grid ceil(cols / 32), block (32, kReduceThreadsY).
constexpr int kReduceThreadsY = 32;

template <typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kReduceThreadsY)
    reduce_rows_kernel(const acc_t* __restrict__ partial, int64_t rows, int64_t cols,
                       acc_t* __restrict__ out) {
  __shared__ acc_t sums[kReduceThreadsY][kWarpSize + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  acc_t s = acc_t(0);
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kReduceThreadsY) {
      s += partial[r * cols + col];
    }
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc_t total = acc_t(0);
    for (int i = 0; i < kReduceThreadsY; ++i) {
      total += sums[i][threadIdx.x];
    }
    out[col] = total;
  }
}

// Element offsets of a (N, C, D, H, W) tensor that is contiguous in `format` (S = D*H*W voxels per sample):
// element (n, c, s) lives at n*C*S + c*channel_stride + s*voxel_stride.
struct ChannelsFirstLayout {
  int64_t channels;
  int64_t voxels_per_sample;
  int64_t channel_stride;
  int64_t voxel_stride;

  __host__ __device__ __forceinline__ int64_t base(int64_t voxel) const {
    const int64_t n = voxel / voxels_per_sample;
    const int64_t s = voxel - n * voxels_per_sample;
    return n * channels * voxels_per_sample + s * voxel_stride;
  }
};

}  // namespace gpu
}  // namespace uxnet
