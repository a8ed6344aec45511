// AVX2 + FMA dwconv3d kernels (8 float / 4 double lanes), compiled with a function target attribute so the
// library needs no -mavx2 and still runs on older CPUs; chosen at run time by dwconv3d_isa_select.cpp.
#include <cstdint>

#include "dwconv3d_params.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define UXNET_DW_TARGET __attribute__((target("avx2,fma")))

namespace uxnet {
namespace cpu {
namespace dwconv3d {
namespace isa_avx2 {

struct VecF {
  using scalar = float;
  using reg = __m256;
  static constexpr int64_t lanes = 8;
  UXNET_DW_TARGET static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  UXNET_DW_TARGET static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  UXNET_DW_TARGET static inline reg zero() { return _mm256_setzero_ps(); }
  UXNET_DW_TARGET static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  UXNET_DW_TARGET static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
};

struct VecD {
  using scalar = double;
  using reg = __m256d;
  static constexpr int64_t lanes = 4;
  UXNET_DW_TARGET static inline reg load(const double* p) { return _mm256_loadu_pd(p); }
  UXNET_DW_TARGET static inline void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  UXNET_DW_TARGET static inline reg zero() { return _mm256_setzero_pd(); }
  UXNET_DW_TARGET static inline reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  UXNET_DW_TARGET static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
};

// 16 ymm registers: 12 accumulators + the weight (or grad) vector + a spare.
constexpr int kOutBlock = 12;
constexpr int kTapBlock = 12;

#define UXNET_DW_ISA_NAME "avx2"
#include "dwconv3d_kernel_body.h"
#undef UXNET_DW_ISA_NAME

}  // namespace isa_avx2

const KernelTable<float>& avx2_kernels_f32() { return isa_avx2::table_f32(); }
const KernelTable<double>& avx2_kernels_f64() { return isa_avx2::table_f64(); }

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

#else  // not x86 or not GCC/Clang: the selector never picks this ISA.

namespace uxnet {
namespace cpu {
namespace dwconv3d {
const KernelTable<float>& avx2_kernels_f32() { return generic_kernels_f32(); }
const KernelTable<double>& avx2_kernels_f64() { return generic_kernels_f64(); }
}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

#endif
