// The conv3d_3x3x3 kernels (kernels.h) compiled for every ISA variant, and their tables. No torch headers.
#include <algorithm>

#include "cpu/conv3d_3x3x3/params.h"
#include "cpu/simd/config.h"
#include "cpu/simd/per_isa.h"

#define UXNET_SIMD_KERNELS "cpu/conv3d_3x3x3/kernels.h"
#include "cpu/simd/compile_per_isa.inc"

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {

const KernelTable<float>& kernels_f32(simd::Isa isa) {
  using Fn = const KernelTable<float>& (*)();
  static const auto tables = UXNET_SIMD_PER_ISA(Fn, conv3d_3x3x3_kernels::table<float>);
  return tables[isa]();
}

const KernelTable<double>& kernels_f64(simd::Isa isa) {
  using Fn = const KernelTable<double>& (*)();
  static const auto tables = UXNET_SIMD_PER_ISA(Fn, conv3d_3x3x3_kernels::table<double>);
  return tables[isa]();
}

const PairKernelTable* pair_kernels(simd::Isa isa) {
  using Fn = const PairKernelTable* (*)();
  static const auto tables = UXNET_SIMD_PER_ISA(Fn, conv3d_3x3x3_kernels::pair_table);
  if (isa == simd::Isa::avx512_emulated || (isa == simd::Isa::avx512 && simd::cpu_has_bf16_dot())) {
    return tables[isa]();
  }
  return nullptr;
}

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
