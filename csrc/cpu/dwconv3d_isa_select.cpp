// Runtime choice of the dwconv3d kernel ISA: the best one the CPU (and OS) supports, or UXNET_CPU_ISA.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "dwconv3d_params.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {
namespace {

bool cpu_supports(Isa isa) {
  if (isa == Isa::generic) return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's cpu model also checks (via XGETBV) that the OS saves the AVX / AVX-512 register state.
  __builtin_cpu_init();
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::avx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
  return false;
}

Isa best_isa() {
  static const Isa best = cpu_supports(Isa::avx512) ? Isa::avx512
                          : cpu_supports(Isa::avx2) ? Isa::avx2
                                                    : Isa::generic;
  return best;
}

}  // namespace

Isa selected_isa() {
  const char* requested = std::getenv("UXNET_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0' || std::strcmp(requested, "auto") == 0) return best_isa();
  Isa isa;
  if (std::strcmp(requested, "generic") == 0) {
    isa = Isa::generic;
  } else if (std::strcmp(requested, "avx2") == 0) {
    isa = Isa::avx2;
  } else if (std::strcmp(requested, "avx512") == 0) {
    isa = Isa::avx512;
  } else {
    TORCH_CHECK(false, "uxnet::dwconv3d: UXNET_CPU_ISA must be one of auto, generic, avx2, avx512; got '",
                requested, "'");
  }
  TORCH_CHECK(cpu_supports(isa), "uxnet::dwconv3d: UXNET_CPU_ISA=", requested,
              " but this CPU (or OS) does not support it");
  return isa;
}

template <>
const KernelTable<float>& kernels_for<float>(Isa isa) {
  switch (isa) {
    case Isa::avx512: return avx512_kernels_f32();
    case Isa::avx2: return avx2_kernels_f32();
    default: return generic_kernels_f32();
  }
}

template <>
const KernelTable<double>& kernels_for<double>(Isa isa) {
  switch (isa) {
    case Isa::avx512: return avx512_kernels_f64();
    case Isa::avx2: return avx2_kernels_f64();
    default: return generic_kernels_f64();
  }
}

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
