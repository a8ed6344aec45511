// The UX MLP chunk kernels (kernels.h) compiled for every ISA variant, and their tables. No torch headers.
#include <algorithm>
#include <cstdlib>
#include <new>

#include "cpu/simd/config.h"
#include "cpu/simd/per_isa.h"
#include "cpu/ux_mlp/params.h"

#define UXNET_SIMD_KERNELS "cpu/ux_mlp/kernels.h"
#include "cpu/simd/compile_per_isa.inc"

namespace uxnet {
namespace cpu {
namespace ux_mlp {

template <typename scalar_t, typename acc_t>
Kernels<scalar_t, acc_t> kernels(simd::Isa isa, bool channels_last, int64_t channels) {
  using Forward = voxel_tiling::ChunkKernel<ForwardArgs<scalar_t, acc_t>>;
  using Backward = voxel_tiling::ChunkKernel<BackwardArgs<scalar_t, acc_t>>;
  static const auto forward_cl = UXNET_SIMD_PER_ISA(Forward, ux_mlp_kernels::forward_chunks<scalar_t, acc_t, true>);
  static const auto forward_cf = UXNET_SIMD_PER_ISA(Forward, ux_mlp_kernels::forward_chunks<scalar_t, acc_t, false>);
  static const auto backward_cl =
      UXNET_SIMD_PER_ISA(Backward, ux_mlp_kernels::backward_chunks<scalar_t, acc_t, true>);
  static const auto backward_cf =
      UXNET_SIMD_PER_ISA(Backward, ux_mlp_kernels::backward_chunks<scalar_t, acc_t, false>);
  static const auto backward_few_cl =
      UXNET_SIMD_PER_ISA(Backward, ux_mlp_kernels::backward_few_channels<scalar_t, acc_t, true>);
  static const auto backward_few_cf =
      UXNET_SIMD_PER_ISA(Backward, ux_mlp_kernels::backward_few_channels<scalar_t, acc_t, false>);
  Kernels<scalar_t, acc_t> chosen = channels_last ? Kernels<scalar_t, acc_t>{forward_cl[isa], backward_cl[isa]}
                                                  : Kernels<scalar_t, acc_t>{forward_cf[isa], backward_cf[isa]};
  if (channels <= kFewChannels) chosen.backward = channels_last ? backward_few_cl[isa] : backward_few_cf[isa];
  return chosen;
}

template Kernels<float, float> kernels(simd::Isa, bool, int64_t);
template Kernels<simd::bf16, float> kernels(simd::Isa, bool, int64_t);
template Kernels<double, double> kernels(simd::Isa, bool, int64_t);

}  // namespace ux_mlp
}  // namespace cpu
}  // namespace uxnet
