// The instance-norm kernels (kernels.h) compiled for every ISA variant, and their tables. No torch headers.
#include "cpu/instance_norm/params.h"
#include "cpu/simd/config.h"
#include "cpu/simd/per_isa.h"

#define UXNET_SIMD_KERNELS "cpu/instance_norm/kernels.h"
#include "cpu/simd/compile_per_isa.inc"

namespace uxnet {
namespace cpu {
namespace instance_norm {

#define UXNET_IN_TABLE(Fn, name)                                                                   \
  UXNET_SIMD_PER_ISA(decltype(Kernels<scalar_t, acc_t>::Fn), instance_norm_kernels::name<scalar_t, acc_t>)

template <typename scalar_t, typename acc_t>
const Kernels<scalar_t, acc_t>& kernels(simd::Isa isa) {
  static const auto forward_planes = UXNET_IN_TABLE(forward_planes, forward_planes);
  static const auto backward_planes = UXNET_IN_TABLE(backward_planes, backward_planes);
  static const auto stats_voxels = UXNET_IN_TABLE(stats_voxels, stats_voxels);
  static const auto forward_voxels = UXNET_IN_TABLE(forward_voxels, forward_voxels);
  static const auto backward_sums_voxels = UXNET_IN_TABLE(backward_sums_voxels, backward_sums_voxels);
  static const auto backward_apply_voxels = UXNET_IN_TABLE(backward_apply_voxels, backward_apply_voxels);
  static const Kernels<scalar_t, acc_t> table[simd::kIsaCount] = {
#define UXNET_IN_ROW(i)                                                                                          \
  {forward_planes.fn[i], backward_planes.fn[i], stats_voxels.fn[i], forward_voxels.fn[i], \
   backward_sums_voxels.fn[i], backward_apply_voxels.fn[i]}
      UXNET_IN_ROW(0), UXNET_IN_ROW(1), UXNET_IN_ROW(2), UXNET_IN_ROW(3)
#undef UXNET_IN_ROW
  };
  static_assert(simd::kIsaCount == 4, "one table row per ISA variant");
  return table[static_cast<int>(isa)];
}

#undef UXNET_IN_TABLE

template const Kernels<float, float>& kernels(simd::Isa);
template const Kernels<simd::bf16, float>& kernels(simd::Isa);
template const Kernels<double, double>& kernels(simd::Isa);

}  // namespace instance_norm
}  // namespace cpu
}  // namespace uxnet
