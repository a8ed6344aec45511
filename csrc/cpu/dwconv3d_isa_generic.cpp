// Portable dwconv3d kernels: 16-byte GCC/Clang vectors (SSE2 on x86-64, NEON on arm64), plain scalars
// elsewhere. Always available; the fallback of the runtime ISA dispatch (dwconv3d_isa_select.cpp).
#include <cstdint>

#include "dwconv3d_params.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {
namespace isa_generic {

#if defined(__GNUC__) || defined(__clang__)
template <typename T>
struct Vec16 {
  using scalar = T;
  typedef T reg __attribute__((vector_size(16)));
  typedef T unaligned __attribute__((vector_size(16), aligned(sizeof(T)), may_alias));
  static constexpr int64_t lanes = 16 / sizeof(T);
  static inline reg load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static inline void store(T* p, reg v) { *reinterpret_cast<unaligned*>(p) = v; }
  static inline reg zero() { return reg{}; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg fmadd(reg a, reg b, reg c) { return a * b + c; }
};
using VecF = Vec16<float>;
using VecD = Vec16<double>;
#else
template <typename T>
struct Scalar1 {
  using scalar = T;
  using reg = T;
  static constexpr int64_t lanes = 1;
  static inline reg load(const T* p) { return *p; }
  static inline void store(T* p, reg v) { *p = v; }
  static inline reg zero() { return T(0); }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg fmadd(reg a, reg b, reg c) { return a * b + c; }
};
using VecF = Scalar1<float>;
using VecD = Scalar1<double>;
#endif

constexpr int kOutBlock = 12;
constexpr int kTapBlock = 12;

}  // namespace isa_generic

#define UXNET_DW_TARGET
#define UXNET_DW_ISA_NAME "generic"
namespace isa_generic {
#include "dwconv3d_kernel_body.h"
}  // namespace isa_generic

const KernelTable<float>& generic_kernels_f32() { return isa_generic::table_f32(); }
const KernelTable<double>& generic_kernels_f64() { return isa_generic::table_f64(); }

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
