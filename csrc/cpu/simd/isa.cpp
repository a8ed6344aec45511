// Runtime choice of the ISA variant of the CPU kernels: the one place that reads UXNET_CPU_ISA and the CPU's
// features.
#include "cpu/simd/isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "cpu/simd/config.h"

namespace uxnet {
namespace cpu {
namespace simd {
namespace {

constexpr Isa kAll[kIsaCount] = {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_emulated};

#if defined(UXNET_SIMD_X86)
// libgcc's CPU model also checks (XGETBV) that the OS saves the AVX / AVX-512 register state.
bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

}  // namespace

bool cpu_has_bf16_dot() {
#if defined(UXNET_SIMD_X86)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_emulated: return "avx512-emulated";
  }
  return "?";
}

int vector_bytes(Isa isa) {
  switch (isa) {
    case Isa::avx2: return 32;
    case Isa::avx512:
    case Isa::avx512_emulated: return 64;
    default: return 16;
  }
}

bool isa_available(Isa isa, std::string* why_not) {
  auto no = [&](const char* reason) {
    if (why_not != nullptr) *why_not = reason;
    return false;
  };
  if (isa == Isa::generic) return true;
#if defined(UXNET_SIMD_X86)
  switch (isa) {
    case Isa::avx2:
      return cpu_has_avx2_fma() || no("this CPU (or OS) lacks AVX2 + FMA");
    case Isa::avx512:
      return cpu_has_avx512() || no("this CPU (or OS) lacks AVX-512 F/BW/VL/DQ");
    case Isa::avx512_emulated:
      return cpu_has_avx2_fma() ||
             no("on x86-64 the emulation runs each 16-lane vector as two AVX2 vectors and needs AVX2 + FMA");
    default: break;
  }
  return no("unknown ISA");
#elif defined(UXNET_SIMD_ARM64)
  if (isa == Isa::avx512_emulated) return true;
  return no("x86-64 only");
#else
  return no("this library was built for the generic ISA only (needs GCC on x86-64, or arm64)");
#endif
}

Isa best_isa() {
  static const Isa best = isa_available(Isa::avx512) ? Isa::avx512
                          : isa_available(Isa::avx2) ? Isa::avx2
                                                     : Isa::generic;
  return best;
}

Isa selected_isa() {
  const char* requested = std::getenv("UXNET_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0' || std::strcmp(requested, "auto") == 0) return best_isa();
  for (Isa isa : kAll) {
    if (std::strcmp(requested, isa_name(isa)) != 0) continue;
    std::string why;
    if (!isa_available(isa, &why)) {
      throw std::invalid_argument(std::string("uxnet CPU kernels: UXNET_CPU_ISA=") + requested +
                                  " is not available here: " + why);
    }
    return isa;
  }
  throw std::invalid_argument(std::string("uxnet CPU kernels: UXNET_CPU_ISA must be one of auto, generic, avx2, "
                                          "avx512, avx512-emulated; got '") +
                              requested + "'");
}

IsaReport isa_report() {
  IsaReport report;
  const char* requested = std::getenv("UXNET_CPU_ISA");
  report.requested = requested != nullptr && requested[0] != '\0' ? requested : "auto";
  try {
    report.selected = isa_name(selected_isa());
  } catch (const std::exception& e) {
    report.error = e.what();
  }
  for (Isa isa : kAll) {
    std::string why;
    if (isa_available(isa, &why)) {
      report.available.emplace_back(isa_name(isa));
    } else {
      report.unavailable.push_back(std::string(isa_name(isa)) + ": " + why);
    }
  }
  return report;
}

}  // namespace simd
}  // namespace cpu
}  // namespace uxnet
