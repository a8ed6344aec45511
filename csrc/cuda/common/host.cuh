// Host-side helpers shared by the CUDA ops of csrc/cuda: launch-size checks, the voxel partition and the
// deterministic reduction used for every parameter gradient (per-warp or per-block partial sums, then a
// second kernel that adds the rows in a fixed order), and tensor layouts. The argument checks that do not
// depend on the device: common/arg_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common/device_utils.cuh"

namespace uxnet {
namespace gpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest 1-D grid this code launches (gridDim.x may go to 2^31 - 1).
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

inline void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= kMaxGridX, op, ": input too large for one CUDA launch (", blocks,
              " blocks, at most ", kMaxGridX, ")");
}

// Reduces a (rows, cols) tensor of partial sums (dtype float or double) over its rows into a (cols,)
// tensor of the same dtype, deterministically (see reduce_rows_kernel).
inline at::Tensor reduce_partial_rows(const char* op, const at::Tensor& partial) {
  TORCH_CHECK(partial.dim() == 2 && partial.is_contiguous(), op, ": internal error, bad partial-sum buffer");
  const int64_t rows = partial.size(0);
  const int64_t cols = partial.size(1);
  at::Tensor out = at::zeros({cols}, partial.options());
  if (rows == 0 || cols == 0) {
    return out;
  }
  const int64_t blocks = ceil_div(cols, kWarpSize);
  check_grid(op, blocks);
  const dim3 block(kWarpSize, kReduceThreadsY);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (partial.scalar_type() == at::kDouble) {
    reduce_rows_kernel<double><<<static_cast<unsigned int>(blocks), block, 0, stream>>>(
        partial.const_data_ptr<double>(), rows, cols, out.mutable_data_ptr<double>());
  } else {
    TORCH_CHECK(partial.scalar_type() == at::kFloat, op, ": internal error, partial sums must be float or double");
    reduce_rows_kernel<float><<<static_cast<unsigned int>(blocks), block, 0, stream>>>(
        partial.const_data_ptr<float>(), rows, cols, out.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// How the parameter-gradient kernels split the N*D*H*W voxels: warp r sums the contiguous voxel range
// [r * voxels_per_row, (r + 1) * voxels_per_row) into row r of a (rows, cols) partial-sum buffer. Depends only
// on the shapes, never on the device, so the reduced gradients are bit-identical run to run.
struct WarpPartition {
  int64_t rows;
  int64_t voxels_per_row;  // a multiple of the warp size
};

inline WarpPartition partition_voxels(int64_t voxels, int64_t cols, int64_t acc_bytes) {
  if (voxels <= 0) {
    return WarpPartition{0, kWarpSize};
  }
  constexpr int64_t kMaxRows = 4096;
  constexpr int64_t kMaxBufferBytes = int64_t{64} << 20;
  const int64_t by_bytes = kMaxBufferBytes / std::max<int64_t>(1, cols * acc_bytes);
  const int64_t max_rows = std::max<int64_t>(1, std::min<int64_t>(kMaxRows, by_bytes));
  const int64_t per_row = ceil_div(ceil_div(voxels, max_rows), kWarpSize) * kWarpSize;
  return WarpPartition{ceil_div(voxels, per_row), per_row};
}

// A fresh contiguous tensor shaped and typed like `like` holding `values` (any dtype, same number of
// elements): parameter gradients never alias the reduction buffer or each other.
inline at::Tensor gradient_like(const at::Tensor& values, const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous))
      .copy_(values.reshape(like.sizes()));
}

// Offsets of the (N, C, D, H, W) tensor x, which is contiguous in `format`.
inline ChannelsFirstLayout make_layout(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t channels = x.size(1);
  const int64_t voxels = x.size(2) * x.size(3) * x.size(4);
  if (format == at::MemoryFormat::ChannelsLast3d) {
    return ChannelsFirstLayout{channels, voxels, 1, channels};
  }
  return ChannelsFirstLayout{channels, voxels, voxels, 1};
}

}  // namespace gpu
}  // namespace uxnet
