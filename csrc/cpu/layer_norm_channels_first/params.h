// Arguments and kernel tables of the CPU channels-first LayerNorm (no torch headers).
//
// scalar_t is the storage type (float, simd::bf16, double), acc_t the math and statistics type (float for float
// and bf16, double for double). Tensors are in the op's canonical layout (NCDHW-contiguous or channels_last_3d,
// as tiling.channels_last says); weight / bias are acc_t arrays of C; mean / rstd are acc_t arrays of N*D*H*W.
#pragma once

#include <cstdint>

#include "cpu/common/voxel_tiling.h"
#include "cpu/simd/config.h"
#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace layer_norm_channels_first {

constexpr int64_t kLayerNormParams = 2;  // parameter-gradient rows: weight, bias

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;
  const acc_t* weight;
  const acc_t* bias;
  scalar_t* out;
  acc_t* mean;
  acc_t* rstd;
  acc_t eps;
  voxel_tiling::VoxelTiling tiling;  // row blocks
};

// grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight; the backward centres x on
// the saved mean plus a correction mean_c(x - mean) (the saved mean is rounded, and few channels make grad_x
// sensitive to it). grad_weight = sum over voxels of grad_out * xhat, grad_bias = sum of grad_out,
// as per-chunk float64 partials [num_chunks][2][C].
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* weight;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_x;  // nullptr: not wanted
  double* partials;  // nullptr: parameter grads not wanted
  voxel_tiling::VoxelTiling tiling;
};

using voxel_tiling::kFewChannels;

template <typename scalar_t, typename acc_t>
using Kernels = voxel_tiling::ChunkKernels<ForwardArgs<scalar_t, acc_t>, BackwardArgs<scalar_t, acc_t>>;

// The kernels of an ISA variant for a layout and channel count (kernels.cpp); instantiated for (float, float),
// (bf16, float) and (double, double).
template <typename scalar_t, typename acc_t>
Kernels<scalar_t, acc_t> kernels(simd::Isa isa, bool channels_last, int64_t channels);

}  // namespace layer_norm_channels_first
}  // namespace cpu
}  // namespace uxnet
