// Per-voxel kernels over the channels of a (N, C, D, H, W) tensor (the LayerNorm's and the UX MLP's): one thread
// per voxel of the N*D*H*W voxels, looping over the C channels (in NCDHW neighbouring threads read neighbouring
// addresses). Statistics and arithmetic in acc_t (float, or double for double tensors).
// Their parameter-gradient kernels: warp r sums the voxel range [r * voxels_per_row, (r + 1) * voxels_per_row)
// of every column into row r of a partial-sum buffer (lane sums, then a fixed-order warp tree); the rows
// are added by reduce_rows_kernel in a fixed order.
#pragma once

#include <cstdint>

#include "cuda/common/device_utils.cuh"

namespace uxnet {
namespace gpu {

constexpr int kVoxelThreads = 256;

__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Mean and 1 / sqrt(biased variance + eps) over the channels of one voxel (two passes).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void channel_stats(const scalar_t* __restrict__ x, int64_t base,
                                              const ChannelsFirstLayout& layout, acc_t eps, acc_t& mean,
                                              acc_t& rstd) {
  const int64_t C = layout.channels;
  acc_t sum = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    sum += static_cast<acc_t>(x[base + c * layout.channel_stride]);
  }
  mean = sum / static_cast<acc_t>(C);
  acc_t squares = acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t centred = static_cast<acc_t>(x[base + c * layout.channel_stride]) - mean;
    squares += centred * centred;
  }
  rstd = acc_t(1) / sqrt_(squares / static_cast<acc_t>(C) + eps);
}

}  // namespace gpu
}  // namespace uxnet
