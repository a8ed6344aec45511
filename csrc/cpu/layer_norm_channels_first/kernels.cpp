// The LayerNorm chunk kernels (kernels.h) compiled for every ISA variant, and their tables. No torch headers.
#include <algorithm>
#include <cstdlib>
#include <new>

#include "cpu/layer_norm_channels_first/params.h"
#include "cpu/simd/config.h"
#include "cpu/simd/per_isa.h"

#define UXNET_SIMD_KERNELS "cpu/layer_norm_channels_first/kernels.h"
#include "cpu/simd/compile_per_isa.inc"

namespace uxnet {
namespace cpu {
namespace layer_norm_channels_first {

template <typename scalar_t, typename acc_t>
Kernels<scalar_t, acc_t> kernels(simd::Isa isa, bool channels_last, int64_t channels) {
  using Forward = voxel_tiling::ChunkKernel<ForwardArgs<scalar_t, acc_t>>;
  using Backward = voxel_tiling::ChunkKernel<BackwardArgs<scalar_t, acc_t>>;
  static const auto forward_voxels =
      UXNET_SIMD_PER_ISA(Forward, layer_norm_channels_first_kernels::forward_voxels<scalar_t, acc_t>);
  static const auto forward_rows =
      UXNET_SIMD_PER_ISA(Forward, layer_norm_channels_first_kernels::forward_rows<scalar_t, acc_t>);
  static const auto backward_voxels =
      UXNET_SIMD_PER_ISA(Backward, layer_norm_channels_first_kernels::backward_voxels<scalar_t, acc_t>);
  static const auto backward_rows =
      UXNET_SIMD_PER_ISA(Backward, layer_norm_channels_first_kernels::backward_rows<scalar_t, acc_t>);
  static const auto backward_few =
      UXNET_SIMD_PER_ISA(Backward, layer_norm_channels_first_kernels::backward_few_channels<scalar_t, acc_t>);
  Kernels<scalar_t, acc_t> chosen = channels_last ? Kernels<scalar_t, acc_t>{forward_voxels[isa], backward_voxels[isa]}
                                                  : Kernels<scalar_t, acc_t>{forward_rows[isa], backward_rows[isa]};
  if (channels <= kFewChannels) chosen.backward = backward_few[isa];
  return chosen;
}

template Kernels<float, float> kernels(simd::Isa, bool, int64_t);
template Kernels<simd::bf16, float> kernels(simd::Isa, bool, int64_t);
template Kernels<double, double> kernels(simd::Isa, bool, int64_t);

}  // namespace layer_norm_channels_first
}  // namespace cpu
}  // namespace uxnet
