// AVX-512F dwconv3d kernels (16 float / 8 double lanes), compiled with a function target attribute so the
// library needs no -mavx512f and still runs on older CPUs; chosen at run time by dwconv3d_isa_select.cpp.
#include <cstdint>

#include "dwconv3d_params.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define UXNET_DW_TARGET __attribute__((target("avx512f,fma")))

namespace uxnet {
namespace cpu {
namespace dwconv3d {
namespace isa_avx512 {

struct VecF {
  using scalar = float;
  using reg = __m512;
  static constexpr int64_t lanes = 16;
  UXNET_DW_TARGET static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  UXNET_DW_TARGET static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  UXNET_DW_TARGET static inline reg zero() { return _mm512_setzero_ps(); }
  UXNET_DW_TARGET static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  UXNET_DW_TARGET static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
};

struct VecD {
  using scalar = double;
  using reg = __m512d;
  static constexpr int64_t lanes = 8;
  UXNET_DW_TARGET static inline reg load(const double* p) { return _mm512_loadu_pd(p); }
  UXNET_DW_TARGET static inline void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  UXNET_DW_TARGET static inline reg zero() { return _mm512_setzero_pd(); }
  UXNET_DW_TARGET static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  UXNET_DW_TARGET static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
};

// 32 zmm registers: 16 accumulators + the weight (or grad) vector, with room to spare.
constexpr int kOutBlock = 16;
constexpr int kTapBlock = 16;

#define UXNET_DW_ISA_NAME "avx512"
#include "dwconv3d_kernel_body.h"
#undef UXNET_DW_ISA_NAME

}  // namespace isa_avx512

const KernelTable<float>& avx512_kernels_f32() { return isa_avx512::table_f32(); }
const KernelTable<double>& avx512_kernels_f64() { return isa_avx512::table_f64(); }

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

#else  // not x86 or not GCC/Clang: the selector never picks this ISA.

namespace uxnet {
namespace cpu {
namespace dwconv3d {
const KernelTable<float>& avx512_kernels_f32() { return generic_kernels_f32(); }
const KernelTable<double>& avx512_kernels_f64() { return generic_kernels_f64(); }
}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

#endif
