// Self-test of the SIMD layer (csrc/cpu/simd): every operation of vec.h against scalar C++ on special values (signed
// zeros, denormals, NaN, infinities, bf16 rounding ties), in every ISA variant this machine runs. No torch: built and
// run by tests/test_cpu_simd_layer.py with the C++ compiler alone, e.g.
//   g++ -std=c++17 -O2 -ffp-contract=off -Wno-psabi -Icsrc tests/cpp/simd_selftest.cpp csrc/cpu/simd/isa.cpp
// Prints one line per variant; exit status 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

#include "cpu/simd/config.h"
#include "cpu/simd/isa.h"
#include "cpu/simd/per_isa.h"

namespace uxnet {
namespace cpu {
namespace selftest_report {

struct Report {
  int64_t checks = 0;
  int64_t failures = 0;
  std::string first;
  void check(bool ok, const char* what, int64_t lane) {
    ++checks;
    if (ok) return;
    if (failures++ == 0) first = std::string(what) + " (lane " + std::to_string(lane) + ")";
  }
};

}  // namespace selftest_report
}  // namespace cpu
}  // namespace uxnet

#define UXNET_SIMD_KERNELS "simd_selftest_checks.h"
#include "cpu/simd/compile_per_isa.inc"

int main() {
  using uxnet::cpu::selftest_report::Report;
  using uxnet::cpu::simd::Isa;
  using Fn = void (*)(Report&);
  const auto run = UXNET_SIMD_PER_ISA(Fn, selftest::run);
  int status = 0;
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_emulated}) {
    std::string why;
    if (!uxnet::cpu::simd::isa_available(isa, &why)) {
      std::printf("%-16s skipped: %s\n", uxnet::cpu::simd::isa_name(isa), why.c_str());
      continue;
    }
    Report report;
    run[isa](report);
    std::printf("%-16s %lld checks, %lld failures%s%s\n", uxnet::cpu::simd::isa_name(isa),
                static_cast<long long>(report.checks), static_cast<long long>(report.failures),
                report.failures ? ", first: " : "", report.first.c_str());
    if (report.failures) status = 1;
  }
  return status;
}
