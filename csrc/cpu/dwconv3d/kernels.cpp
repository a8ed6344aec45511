// The dwconv3d kernels (kernels.h) compiled for every ISA variant, and their tables. No torch headers.
#include "cpu/dwconv3d/params.h"
#include "cpu/simd/config.h"
#include "cpu/simd/per_isa.h"

#define UXNET_SIMD_KERNELS "cpu/dwconv3d/kernels.h"
#include "cpu/simd/compile_per_isa.inc"

namespace uxnet {
namespace cpu {
namespace dwconv3d {

const KernelTable<float>& kernels_f32(simd::Isa isa) {
  using Fn = const KernelTable<float>& (*)();
  static const auto tables = UXNET_SIMD_PER_ISA(Fn, dwconv3d_kernels::table<float>);
  return tables[isa]();
}

const KernelTable<double>& kernels_f64(simd::Isa isa) {
  using Fn = const KernelTable<double>& (*)();
  static const auto tables = UXNET_SIMD_PER_ISA(Fn, dwconv3d_kernels::table<double>);
  return tables[isa]();
}

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
