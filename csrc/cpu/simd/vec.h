// The SIMD layer of the CPU kernels: fixed-width vectors of float, double and int lanes, with the operations the
// kernels need. Written once; compiled once per ISA variant.
//
// NO include guard: compile_per_isa.inc includes this (and the kernel header after it) once per variant, each
// time inside that variant's namespace and `#pragma GCC target` region, with these macros set:
//   UXNET_SIMD_ISA_ID        the variant, an Isa enumerator (isa.h)
//   UXNET_SIMD_VECTOR_BYTES  bytes of one Vec: 16 (generic), 32 (avx2), 64 (avx512, avx512-emulated)
//   UXNET_SIMD_NATIVE_BYTES  bytes of one hardware register: equal to VECTOR_BYTES, except for the emulation
//                            (32 on x86-64: a Vec is two AVX2 registers; 16 on arm64: four NEON registers)
//   UXNET_SIMD_REGISTERS     vector registers the kernels' register blocks are sized for (16, or 32 for avx512
//                            and its emulation, which must use the same block sizes)
//   UXNET_SIMD_FMA           how fma() is computed: 0 = a * b + c rounded twice (x86-64 baseline, no FMA unit),
//                            1 = x86 FMA3 / AVX-512 vfmadd, 2 = NEON vfmaq; 1 and 2 are fused (one rounding)
//
// Vectors are GCC/Clang vector types (operators + - * / and [] work lane-wise), e.g. in a kernel:
//   using VF = Vec<float>;                         // kLanes<float> = 4 / 8 / 16 lanes
//   VF acc = zero<VF>();
//   for (...) acc = fma(load<VF>(w + i), load<VF>(x + i), acc);
//   const float total = hsum(acc);
// The build passes -ffp-contract=off, so the compiler never fuses a * b + c on its own: every fused multiply-add
// is an explicit fma(), and a kernel computes the same roundings in every variant with the same lane count
// (avx512 and avx512-emulated give bitwise-identical results).
//
// Operations (V is a Vec of float or double, S its scalar, M = Mask<V> the matching int vector):
//   zero<V>(), broadcast<V>(s)
//   load<V>(p), store(p, v)                       p: float*, double*, or bf16* for float vectors
//   load_partial<V>(p, n), store_partial(p, v, n) the first n lanes (0 <= n <= lanes); lanes >= n load as 0 and
//                                                 are not stored
//   a + b, a - b, a * b, a / b, -a               IEEE, lane-wise
//   fma(a, b, c) = a * b + c, fnma(a, b, c) = c - a * b   (fused, see UXNET_SIMD_FMA)
//   sqrt(a)                                       IEEE square root
//   min(a, b), max(a, b)                          a < b ? a : b, a > b ? a : b (b where either is NaN)
//   lt, le, gt, ge, eq, ne(a, b) -> M             all ones where true
//   select(m, a, b)                               m ? a : b lane-wise (e.g. LeakyReLU: select(gt(x, 0), x, s * x))
//   abs(a), bits(a) -> M, from_bits<V>(m)         reinterpretation of the lanes
//   hsum(v)                                       sum of the lanes, pairwise halves in a fixed order
//   widen_lo(vf), widen_hi(vf) -> VD              float lanes [0, L/2) / [L/2, L) as doubles (exact)
//   narrow(lo, hi) -> VF                          two double vectors as one float vector (rounded to nearest)
//   to_wide<W>(v)                                 lane-wise conversion to a vector W of the same lane count
//   bf16_bits(vf) -> Bits32                       bf16 bit patterns of the lanes (low halves)
//   bf16_pairs(even, odd) -> Bits32               two float vectors as bf16 pairs, one pair per 32-bit lane
//   dot_bf16(acc, a, b)                           acc + products of bf16 pairs (vdpbf16ps; see below)
// bf16 stores round to nearest even and keep NaN (a quiet NaN), exactly as c10::BFloat16 does.

#ifndef UXNET_SIMD_BF16_DOT
#define UXNET_SIMD_BF16_DOT 0  // dot_bf16 emulated (the avx512 variant sets 1: vdpbf16ps)
#define UXNET_SIMD_BF16_TARGET
#endif

constexpr ::uxnet::cpu::simd::Isa kIsa = UXNET_SIMD_ISA_ID;
constexpr bool kNativeBf16Dot = UXNET_SIMD_BF16_DOT;
constexpr int kVectorBytes = UXNET_SIMD_VECTOR_BYTES;
constexpr int kNativeBytes = UXNET_SIMD_NATIVE_BYTES;
constexpr int kVectorRegisters = UXNET_SIMD_REGISTERS;
template <typename T>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(T));

using ::uxnet::cpu::simd::bf16;

template <typename T, int64_t N>
struct VecOf {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "lane counts are powers of two");
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// N lanes of T (by default one vector of the variant).
template <typename T, int64_t N = kLanes<T>>
using Vec = typename VecOf<T, N>::type;

template <typename V>
using Scalar = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V>
constexpr int64_t kLanesOf = sizeof(V) / sizeof(Scalar<V>);

template <int kBytes>
struct IntOfSize;
template <>
struct IntOfSize<4> {
  using type = int32_t;
};
template <>
struct IntOfSize<8> {
  using type = int64_t;
};
// The mask / bit pattern type of V: signed ints of the lane width, all ones for true.
template <typename V>
using Mask = Vec<typename IntOfSize<sizeof(Scalar<V>)>::type, kLanesOf<V>>;

namespace detail {

// A vector wider than a hardware register (the emulation's 64-byte vectors, or double vectors of a float
// vector's lane count) is processed as kCount native-width pieces. GCC splits arithmetic on such vectors into
// native instructions by itself, but comparisons lane by lane, and intrinsics take native widths only: those go
// through map_pieces.
template <typename V>
struct Pieces {
  static constexpr int64_t kBytes = sizeof(V) < static_cast<size_t>(kNativeBytes) ? sizeof(V) : kNativeBytes;
  static constexpr int64_t kCount = sizeof(V) / kBytes;
};

// Lanes [first, first + N) of v, and two vectors joined, built lane by lane from constant indices: GCC turns
// these into register shuffles. (A memcpy through the vector's address would pin it to the stack, also inside
// the loops that accumulate it.)
template <int64_t first, typename V, size_t... I>
UXNET_SIMD_INLINE Vec<Scalar<V>, sizeof...(I)> slice_lanes(V v, std::index_sequence<I...>) {
  return Vec<Scalar<V>, sizeof...(I)>{v[first + static_cast<int64_t>(I)]...};
}

template <int64_t first, int64_t N, typename V>
UXNET_SIMD_INLINE Vec<Scalar<V>, N> slice(V v) {
  return slice_lanes<first>(v, std::make_index_sequence<N>{});
}

template <typename H, size_t... I>
UXNET_SIMD_INLINE Vec<Scalar<H>, 2 * kLanesOf<H>> concat_lanes(H lo, H hi, std::index_sequence<I...>) {
  constexpr int64_t n = kLanesOf<H>;
  return Vec<Scalar<H>, 2 * n>{(static_cast<int64_t>(I) < n ? lo[I % n] : hi[I % n])...};
}

template <typename H>
UXNET_SIMD_INLINE Vec<Scalar<H>, 2 * kLanesOf<H>> concat(H lo, H hi) {
  return concat_lanes(lo, hi, std::make_index_sequence<2 * kLanesOf<H>>{});
}

// f applied to `count` equal pieces of the vectors vs (all with R's lane count), the results joined into R.
template <typename R, int64_t count, typename F, typename... Vs>
UXNET_SIMD_INLINE R map_pieces(F f, Vs... vs) {
  if constexpr (count == 1) {
    return f(vs...);
  } else {
    constexpr int64_t half = kLanesOf<R> / 2;
    using H = Vec<Scalar<R>, half>;
    return concat(map_pieces<H, count / 2>(f, slice<0, half>(vs)...),
                  map_pieces<H, count / 2>(f, slice<half, half>(vs)...));
  }
}

template <typename R, typename V, typename F>
UXNET_SIMD_INLINE R map1(V a, F f) {
  return map_pieces<R, Pieces<V>::kCount>(f, a);
}

template <typename R, typename V, typename F>
UXNET_SIMD_INLINE R map2(V a, V b, F f) {
  static_assert(Pieces<V>::kCount == Pieces<R>::kCount, "same number of pieces");
  return map_pieces<R, Pieces<V>::kCount>(f, a, b);
}

template <typename V, typename F>
UXNET_SIMD_INLINE V map3(V a, V b, V c, F f) {
  return map_pieces<V, Pieces<V>::kCount>(f, a, b, c);
}

// One native-width piece: a * b + c (kNegate: c - a * b) with one rounding (two where UXNET_SIMD_FMA == 0).
template <bool kNegate, typename P>
UXNET_SIMD_INLINE P fma_piece(P a, P b, P c) {
#if UXNET_SIMD_FMA == 1
  constexpr bool f32 = std::is_same<Scalar<P>, float>::value;
  if constexpr (sizeof(P) == 64 && f32) {
    return kNegate ? (P)_mm512_fnmadd_ps((__m512)a, (__m512)b, (__m512)c)
                   : (P)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  } else if constexpr (sizeof(P) == 64) {
    return kNegate ? (P)_mm512_fnmadd_pd((__m512d)a, (__m512d)b, (__m512d)c)
                   : (P)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
  } else if constexpr (sizeof(P) == 32 && f32) {
    return kNegate ? (P)_mm256_fnmadd_ps((__m256)a, (__m256)b, (__m256)c)
                   : (P)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  } else if constexpr (sizeof(P) == 32) {
    return kNegate ? (P)_mm256_fnmadd_pd((__m256d)a, (__m256d)b, (__m256d)c)
                   : (P)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
  } else if constexpr (sizeof(P) == 16 && f32) {
    return kNegate ? (P)_mm_fnmadd_ps((__m128)a, (__m128)b, (__m128)c)
                   : (P)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
  } else if constexpr (sizeof(P) == 16) {
    return kNegate ? (P)_mm_fnmadd_pd((__m128d)a, (__m128d)b, (__m128d)c)
                   : (P)_mm_fmadd_pd((__m128d)a, (__m128d)b, (__m128d)c);
  } else {  // a narrower piece: lane by lane, still fused
    for (int64_t i = 0; i < kLanesOf<P>; ++i) a[i] = std::fma(kNegate ? -a[i] : a[i], b[i], c[i]);
    return a;
  }
#elif UXNET_SIMD_FMA == 2
  if constexpr (sizeof(P) == 16 && std::is_same<Scalar<P>, float>::value) {
    return kNegate ? (P)vfmsq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b)
                   : (P)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
  } else if constexpr (sizeof(P) == 16) {
    return kNegate ? (P)vfmsq_f64((float64x2_t)c, (float64x2_t)a, (float64x2_t)b)
                   : (P)vfmaq_f64((float64x2_t)c, (float64x2_t)a, (float64x2_t)b);
  } else {
    for (int64_t i = 0; i < kLanesOf<P>; ++i) a[i] = std::fma(kNegate ? -a[i] : a[i], b[i], c[i]);
    return a;
  }
#else
  return kNegate ? c - a * b : a * b + c;
#endif
}

template <typename P>
UXNET_SIMD_INLINE P sqrt_piece(P a) {
  using S = Scalar<P>;
  constexpr bool f32 = std::is_same<S, float>::value;
#if defined(UXNET_SIMD_X86)
  // (Only pieces up to kNativeBytes reach here, so no branch needs more than the region's target.)
  // (The zero-masked forms: the plain ones start from _mm512_undefined_*, which GCC 12 warns about.)
  if constexpr (sizeof(P) == 64) {
    return f32 ? (P)_mm512_maskz_sqrt_ps(static_cast<__mmask16>(-1), (__m512)a)
               : (P)_mm512_maskz_sqrt_pd(static_cast<__mmask8>(-1), (__m512d)a);
  }
  if constexpr (sizeof(P) == 32) return f32 ? (P)_mm256_sqrt_ps((__m256)a) : (P)_mm256_sqrt_pd((__m256d)a);
  if constexpr (sizeof(P) == 16) return f32 ? (P)_mm_sqrt_ps((__m128)a) : (P)_mm_sqrt_pd((__m128d)a);
#elif defined(UXNET_SIMD_ARM64)
  if constexpr (sizeof(P) == 16) return f32 ? (P)vsqrtq_f32((float32x4_t)a) : (P)vsqrtq_f64((float64x2_t)a);
#endif
  for (int64_t i = 0; i < kLanesOf<P>; ++i) a[i] = std::sqrt(a[i]);
  return a;
}

}  // namespace detail

// ---- construction, loads and stores ------------------------------------------------------------------------

template <typename V>
UXNET_SIMD_INLINE V zero() {
  return V{};
}

namespace detail {
template <typename V, size_t... I>
UXNET_SIMD_INLINE V broadcast_lanes(Scalar<V> s, std::index_sequence<I...>) {
  return V{(static_cast<void>(I), s)...};
}
}  // namespace detail

// s in every lane (exactly: V{} + s would turn -0.0 into +0.0).
template <typename V>
UXNET_SIMD_INLINE V broadcast(Scalar<V> s) {
  return detail::broadcast_lanes<V>(s, std::make_index_sequence<kLanesOf<V>>{});
}

template <typename V>
UXNET_SIMD_INLINE V load(const Scalar<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
UXNET_SIMD_INLINE void store(Scalar<V>* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// bfloat16 memory <-> float lanes.
template <typename V>
UXNET_SIMD_INLINE V load(const bf16* p) {
  static_assert(std::is_same<Scalar<V>, float>::value, "bf16 loads into float lanes");
  using Wide = Vec<uint32_t, kLanesOf<V>>;
  Vec<uint16_t, kLanesOf<V>> h;
  std::memcpy(&h, p, sizeof(h));
  return (V)(__builtin_convertvector(h, Wide) << 16);
}

// Unsigned 32-bit lanes of a float vector: bf16 pairs (below) and bit patterns.
template <typename V>
using Bits32 = Vec<uint32_t, kLanesOf<V>>;

// The bf16 bit patterns of v's lanes (rounded to nearest even, NaN the quiet NaN), in the low half of each lane.
template <typename V>
UXNET_SIMD_INLINE Bits32<V> bf16_bits(V v) {
  static_assert(std::is_same<Scalar<V>, float>::value, "bf16 from float lanes");
  using U = Bits32<V>;
  const U u = (U)v;
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // NaN: exponent all ones and a nonzero mantissa, i.e. (u & 0x7fffffff) > 0x7f800000, from integer
  // arithmetic only (no comparison, which GCC would split lane by lane on emulated vectors).
  const U is_nan = (U)((Mask<V>)(0x7f800000u - (u & 0x7fffffffu)) >> 31);
  return (is_nan & 0x7fc0u) | (~is_nan & rounded);
}

template <typename V>
UXNET_SIMD_INLINE void store(bf16* p, V v) {
  using Half = Vec<uint16_t, kLanesOf<V>>;
  const Half h = __builtin_convertvector(bf16_bits(v), Half);
  std::memcpy(p, &h, sizeof(h));
}

// The first n lanes from p (0 <= n <= lanes); the others are 0. Reads only p[0 .. n).
template <typename V, typename Mem>
UXNET_SIMD_INLINE V load_partial(const Mem* p, int64_t n) {
  Mem buf[kLanesOf<V>];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load<V>(buf);
}

// Stores the first n lanes of v at p (0 <= n <= lanes). Writes only p[0 .. n).
template <typename V, typename Mem>
UXNET_SIMD_INLINE void store_partial(Mem* p, V v, int64_t n) {
  Mem buf[kLanesOf<V>];
  store(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

// ---- arithmetic ---------------------------------------------------------------------------------------------

template <typename V>
UXNET_SIMD_INLINE V fma(V a, V b, V c) {
  return detail::map3(a, b, c, [](auto x, auto y, auto z) { return detail::fma_piece<false>(x, y, z); });
}

// c - a * b with one rounding (where fma is fused).
template <typename V>
UXNET_SIMD_INLINE V fnma(V a, V b, V c) {
  return detail::map3(a, b, c, [](auto x, auto y, auto z) { return detail::fma_piece<true>(x, y, z); });
}

template <typename V>
UXNET_SIMD_INLINE V sqrt(V a) {
  return detail::map1<V>(a, [](auto x) { return detail::sqrt_piece(x); });
}

// ---- comparisons and selects ----------------------------------------------------------------------------------

template <typename V>
UXNET_SIMD_INLINE Mask<V> lt(V a, V b) {
  return detail::map2<Mask<V>>(a, b, [](auto x, auto y) { return x < y; });
}
template <typename V>
UXNET_SIMD_INLINE Mask<V> le(V a, V b) {
  return detail::map2<Mask<V>>(a, b, [](auto x, auto y) { return x <= y; });
}
template <typename V>
UXNET_SIMD_INLINE Mask<V> gt(V a, V b) {
  return lt(b, a);
}
template <typename V>
UXNET_SIMD_INLINE Mask<V> ge(V a, V b) {
  return le(b, a);
}
template <typename V>
UXNET_SIMD_INLINE Mask<V> eq(V a, V b) {
  return detail::map2<Mask<V>>(a, b, [](auto x, auto y) { return x == y; });
}
template <typename V>
UXNET_SIMD_INLINE Mask<V> ne(V a, V b) {
  return detail::map2<Mask<V>>(a, b, [](auto x, auto y) { return x != y; });
}

template <typename V>
UXNET_SIMD_INLINE Mask<V> bits(V a) {
  return (Mask<V>)a;
}

template <typename V>
UXNET_SIMD_INLINE V from_bits(Mask<V> m) {
  return (V)m;
}

// m ? a : b lane by lane, for masks of all ones / all zeros (as comparisons return): bitwise, so it is exact for
// every value and costs native instructions on emulated vectors too.
template <typename V>
UXNET_SIMD_INLINE V select(Mask<V> m, V a, V b) {
  return (V)((m & bits(a)) | (~m & bits(b)));
}

template <typename V>
UXNET_SIMD_INLINE V min(V a, V b) {
  return select(lt(a, b), a, b);
}

template <typename V>
UXNET_SIMD_INLINE V max(V a, V b) {
  return select(lt(b, a), a, b);
}

template <typename V>
UXNET_SIMD_INLINE V abs(V a) {
  using I = typename IntOfSize<sizeof(Scalar<V>)>::type;
  const I magnitude = static_cast<I>(~(static_cast<std::make_unsigned_t<I>>(1) << (8 * sizeof(I) - 1)));
  return (V)(bits(a) & magnitude);
}

// ---- reductions and conversions -------------------------------------------------------------------------------

// Sum of the lanes: the upper half is added to the lower half until one lane is left (a fixed order, so every
// variant with the same lane count gives the same bits).
template <typename V>
UXNET_SIMD_INLINE Scalar<V> hsum(V v) {
  if constexpr (kLanesOf<V> == 2) {
    return v[0] + v[1];
  } else {
    constexpr int64_t half = kLanesOf<V> / 2;
    return hsum(detail::slice<0, half>(v) + detail::slice<half, half>(v));
  }
}

// Lane-wise conversion to a vector type W with the same number of lanes (float <-> double, int <-> float, ...).
template <typename W, typename V>
UXNET_SIMD_INLINE W to_wide(V v) {
  static_assert(kLanesOf<W> == kLanesOf<V>, "same lane count");
  return __builtin_convertvector(v, W);
}

template <typename V>
UXNET_SIMD_INLINE Vec<double, kLanesOf<V> / 2> widen_lo(V v) {
  using D = Vec<double, kLanesOf<V> / 2>;
  return __builtin_convertvector(detail::slice<0, kLanesOf<V> / 2>(v), D);
}

template <typename V>
UXNET_SIMD_INLINE Vec<double, kLanesOf<V> / 2> widen_hi(V v) {
  using D = Vec<double, kLanesOf<V> / 2>;
  return __builtin_convertvector(detail::slice<kLanesOf<V> / 2, kLanesOf<V> / 2>(v), D);
}

template <typename D>
UXNET_SIMD_INLINE Vec<float, 2 * kLanesOf<D>> narrow(D lo, D hi) {
  using F = Vec<float, kLanesOf<D>>;
  return detail::concat(__builtin_convertvector(lo, F), __builtin_convertvector(hi, F));
}

// ---- bfloat16 pair products ---------------------------------------------------------------------------------------

// Lane i of a pair vector holds two bf16 values, element 2i in its low half and 2i + 1 in its high half (the memory
// order of bf16 x[2i], x[2i + 1] on a little-endian CPU).
template <typename V>
UXNET_SIMD_INLINE Bits32<V> bf16_pairs(V even, V odd) {
  return bf16_bits(even) | (bf16_bits(odd) << 16);
}

namespace detail {
// Denormals to zero of the same sign.
template <typename V>
UXNET_SIMD_INLINE V flush_denormals(V v) {
  const Mask<V> tiny = lt(abs(v), broadcast<V>(1.17549435e-38f));
  return select(tiny, from_bits<V>(bits(v) & static_cast<int32_t>(0x80000000u)), v);
}
}  // namespace detail

// acc + a.odd * b.odd + a.even * b.even per lane, as AVX512_BF16's vdpbf16ps computes it: each bf16 product is exact
// in float32 and is added with one rounding to nearest even, the odd one first; denormal inputs (bf16 and acc) count
// as zero and denormal results are flushed to zero. Native on the avx512 variant where the CPU has AVX512_BF16
// (simd::cpu_has_bf16_dot()), whose callers must carry UXNET_SIMD_BF16_TARGET; elsewhere the same operations on
// float lanes (measured bitwise equal to the Zen 4 instruction on 3.2 million random lanes, except where a product
// overflows float32, which the instruction carries in a wider exponent, and the sign of an all-zero sum).
template <typename V>
UXNET_SIMD_BF16_TARGET UXNET_SIMD_INLINE V dot_bf16(V acc, Bits32<V> a, Bits32<V> b) {
#if UXNET_SIMD_BF16_DOT
  static_assert(sizeof(V) == 64, "the native bf16 dot product is compiled for 64-byte vectors");
  return (V)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
  using detail::flush_denormals;
  const Bits32<V> high = broadcast<Bits32<V>>(0xffff0000u);
  const V a_even = flush_denormals((V)(a << 16)), b_even = flush_denormals((V)(b << 16));
  const V a_odd = flush_denormals((V)(a & high)), b_odd = flush_denormals((V)(b & high));
  acc = flush_denormals(fma(a_odd, b_odd, flush_denormals(acc)));
  return flush_denormals(fma(a_even, b_even, acc));
#endif
}
