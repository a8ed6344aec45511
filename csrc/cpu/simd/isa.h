// The instruction sets the CPU kernels are compiled for, and the one they run with.
//
// Every CPU kernel is compiled once per Isa (compile_per_isa.inc) and picked at run time (PerIsa, per_isa.h)
// by selected_isa(): the best ISA this CPU and OS support, or the one named by the environment variable
//   UXNET_CPU_ISA = auto | generic | avx2 | avx512 | avx512-emulated
// read on every call, so that one process (a test) can run every variant. No torch headers here: this is
// shared by the kernel translation units, which must compile without them (aarch64 compile check, sanitizers).
#pragma once

#include <string>
#include <vector>

namespace uxnet {
namespace cpu {
namespace simd {

enum class Isa : int {
  generic = 0,          // 16-byte vectors: SSE2 on x86-64, NEON on arm64 (plain scalars on other targets)
  avx2 = 1,             // 32-byte vectors, AVX2 + FMA
  avx512 = 2,           // 64-byte vectors, AVX-512 F/BW/VL/DQ + FMA
  avx512_emulated = 3,  // the AVX-512 variant's 64-byte vectors and block sizes, run as pairs of AVX2 (x86-64) or
                        // quadruples of NEON (arm64) registers: tests the 16-lane code on any CPU
};
constexpr int kIsaCount = 4;

// The name UXNET_CPU_ISA uses ("generic", "avx2", "avx512", "avx512-emulated").
const char* isa_name(Isa isa);

// Bytes of one vector of the variant (16, 32, 64), i.e. 4, 8, 16 float lanes.
int vector_bytes(Isa isa);

// Whether the variant was compiled into this library and this CPU (and OS) can run it; if not, why not.
bool isa_available(Isa isa, std::string* why_not = nullptr);

// Whether this CPU runs AVX512_BF16's vdpbf16ps (with AVX-512 F/BW/VL/DQ): the avx512 variant's native dot_bf16.
bool cpu_has_bf16_dot();

// The best available variant: avx512, then avx2, then generic (never the emulated one).
Isa best_isa();

// The variant kernels run with now: UXNET_CPU_ISA if set (and not "auto"), else best_isa(). Throws
// std::invalid_argument naming the variable, the value and the choices when the value is unknown or the variant
// is not available here.
Isa selected_isa();

struct IsaReport {
  std::string requested;                 // UXNET_CPU_ISA as set ("auto" when unset)
  std::string selected;                  // the variant selected_isa() picks, or "" if it throws
  std::string error;                     // selected_isa()'s message when it throws
  std::vector<std::string> available;    // isa names, in Isa order
  std::vector<std::string> unavailable;  // "name: reason"
};
IsaReport isa_report();

}  // namespace simd
}  // namespace cpu
}  // namespace uxnet
