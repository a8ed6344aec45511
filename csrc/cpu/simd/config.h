// Which ISA variants this compiler and target can build (see isa.h), and the system headers the per-ISA code uses.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// x86-64 with GCC: the avx2, avx512 and avx512-emulated variants are compiled under `#pragma GCC target`
// regions (no -m flags: the library still loads on CPUs without them). Other compilers build only `generic`.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UXNET_SIMD_X86 1
#include <immintrin.h>
#endif

// arm64: `generic` is NEON (16-byte vectors); `avx512-emulated` runs its 64-byte vectors as four NEON registers.
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define UXNET_SIMD_ARM64 1
#include <arm_neon.h>
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "the uxnet CPU kernels need GCC or Clang vector extensions"
#endif

#define UXNET_SIMD_INLINE inline __attribute__((always_inline))

namespace uxnet {
namespace cpu {
namespace simd {

// bfloat16 storage, bit-compatible with c10::BFloat16 (the torch-side code reinterpret_casts between them).
struct bf16 {
  uint16_t bits;
};

// c10::BFloat16's conversions: widen by shifting into the upper half; narrow by rounding to nearest even,
// every NaN becoming the quiet NaN 0x7fc0.
inline float bf16_to_float(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline bf16 float_to_bf16(float f) {
  if (std::isnan(f)) return bf16{0x7fc0};
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// Scalar conversions between a storage type (float, double, bf16) and a math type (float, double).
template <typename To, typename From>
inline To convert(From v) {
  if constexpr (std::is_same<From, bf16>::value) {
    return static_cast<To>(bf16_to_float(v));
  } else if constexpr (std::is_same<To, bf16>::value) {
    return float_to_bf16(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace uxnet
