// Arguments and kernel tables of the CPU fused UX MLP (no torch headers).
//
// out = residual + gamma * pwconv2(GELU(pwconv1(LN(y)))) per voxel. scalar_t is the storage type (float,
// simd::bf16, double), acc_t the math and statistics type (float for float and bf16, double for double). Tensors
// are in the op's canonical layout (NCDHW-contiguous or channels_last_3d, as tiling.channels_last says).
#pragma once

#include <cstdint>

#include "cpu/common/voxel_tiling.h"
#include "cpu/simd/config.h"
#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace ux_mlp {

// Parameter rows of the packed parameter table [kMlpParams][C] (also the order of its gradients).
namespace param_rows {
enum MlpParam : int64_t {
  kLnWeight = 0,
  kLnBias = 1,
  kW1 = 2,   // 4 rows: w1[:, j]
  kB1 = 6,   // 4 rows: b1[:, j]
  kW2 = 10,  // 4 rows: w2[:, j]
  kB2 = 14,
  kGamma = 15,
  kMlpParams = 16,
};
}  // namespace param_rows
using namespace param_rows;

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* y;
  const scalar_t* residual;  // nullptr: no residual
  const acc_t* params;       // [kMlpParams][C]; the gamma row is all ones when gamma is None
  scalar_t* out;
  acc_t* mean;
  acc_t* rstd;
  acc_t eps;
  voxel_tiling::VoxelTiling tiling;  // kTile tiles
};

// The backward centres y on the saved mean plus a correction (see layer_norm_channels_first/params.h).
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* y;
  const acc_t* params;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_y;
  double* partials;  // [num_chunks][kMlpParams][C]
  voxel_tiling::VoxelTiling tiling;
};

using voxel_tiling::kFewChannels;

template <typename scalar_t, typename acc_t>
using Kernels = voxel_tiling::ChunkKernels<ForwardArgs<scalar_t, acc_t>, BackwardArgs<scalar_t, acc_t>>;

// The kernels of an ISA variant for a layout and channel count (kernels.cpp); instantiated for (float, float),
// (bf16, float) and (double, double).
template <typename scalar_t, typename acc_t>
Kernels<scalar_t, acc_t> kernels(simd::Isa isa, bool channels_last, int64_t channels);

}  // namespace ux_mlp
}  // namespace cpu
}  // namespace uxnet
