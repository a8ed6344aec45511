// The SIMD layer's operations (csrc/cpu/simd/vec.h) against scalar C++, compiled once per ISA variant by
// simd_selftest.cpp through compile_per_isa.inc. NO include guard (included once per variant, inside its namespace).

namespace selftest {

using Report = ::uxnet::cpu::selftest_report::Report;

// Values with every special case: signed zeros, denormals, NaN, infinities, ties of bf16 rounding.
template <typename T>
inline T special(int i) {
  const T values[] = {T(0),
                      T(-0.0),
                      T(1),
                      T(-1.5),
                      T(3.25),
                      std::numeric_limits<T>::denorm_min(),
                      -std::numeric_limits<T>::min(),
                      std::numeric_limits<T>::max(),
                      std::numeric_limits<T>::infinity(),
                      -std::numeric_limits<T>::infinity(),
                      std::numeric_limits<T>::quiet_NaN(),
                      T(1.00390625),      // 1 + 2^-8: a bf16 rounding tie, to even: 1
                      T(1.01171875),      // 1 + 3 * 2^-8: a tie, to even: 1 + 2^-6
                      T(-2.7182818284),
                      T(1e-3),
                      T(123456.789)};
  return values[i % 16];
}

inline bool same(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b));
}

template <typename V>
inline V lanes_from(int offset) {
  using T = Scalar<V>;
  T buf[kLanesOf<V>];
  for (int64_t i = 0; i < kLanesOf<V>; ++i) buf[i] = special<T>(static_cast<int>(i) + offset);
  return load<V>(buf);
}

template <typename T>
void check_type(Report& r) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  for (int offset = 0; offset < 16; offset += 3) {
    const V a = lanes_from<V>(offset), b = lanes_from<V>(offset + 5), c = lanes_from<V>(offset + 11);
    // loads, stores, partial tails
    for (int64_t n = 0; n <= L; ++n) {
      T src[L], dst[L];
      for (int64_t i = 0; i < L; ++i) {
        src[i] = special<T>(static_cast<int>(i) + offset);
        dst[i] = T(7);
      }
      const V p = load_partial<V>(src, n);
      store_partial(dst, p, n);
      for (int64_t i = 0; i < L; ++i) {
        r.check(same(p[i], i < n ? src[i] : T(0)), "load_partial", i);
        r.check(same(dst[i], i < n ? src[i] : T(7)), "store_partial", i);
      }
    }
    const V s = fma(a, b, c), ns = fnma(a, b, c), q = sqrt(a), mn = min(a, b), mx = max(a, b), ab = abs(a);
    const Mask<V> m_lt = lt(a, b), m_le = le(a, b), m_gt = gt(a, b), m_ge = ge(a, b), m_eq = eq(a, b),
                  m_ne = ne(a, b);
    const V sel = select(m_lt, a, b);
    for (int64_t i = 0; i < L; ++i) {
      const T x = a[i], y = b[i], z = c[i];
#if UXNET_SIMD_FMA == 0
      const T fused = x * y + z, fused_neg = z - x * y;
#else
      const T fused = std::fma(x, y, z), fused_neg = std::fma(-x, y, z);
#endif
      r.check(same(s[i], fused), "fma", i);
      r.check(same(ns[i], fused_neg), "fnma", i);
      r.check(same(q[i], std::sqrt(x)), "sqrt", i);
      r.check(same(mn[i], x < y ? x : y), "min", i);
      r.check(same(mx[i], x > y ? x : y), "max", i);
      r.check(same(ab[i], std::fabs(x)), "abs", i);
      r.check(m_lt[i] == (x < y ? -1 : 0) && m_le[i] == (x <= y ? -1 : 0), "lt / le", i);
      r.check(m_gt[i] == (x > y ? -1 : 0) && m_ge[i] == (x >= y ? -1 : 0), "gt / ge", i);
      r.check(m_eq[i] == (x == y ? -1 : 0) && m_ne[i] == (x != y ? -1 : 0), "eq / ne", i);
      r.check(same(sel[i], x < y ? x : y), "select", i);
      r.check(same((a + b)[i], x + y) && same((a * b)[i], x * y) && same((a / b)[i], x / y), "+ * /", i);
      r.check(same(broadcast<V>(z)[i], z) && same(zero<V>()[i], T(0)), "broadcast / zero", i);
      r.check(same(from_bits<V>(bits(a))[i], x), "bits / from_bits", i);
    }
    // hsum: pairwise halves
    T work[L];
    store(work, b);
    for (int64_t half = L / 2; half >= 1; half /= 2) {
      for (int64_t i = 0; i < half; ++i) work[i] = work[i] + work[i + half];
    }
    r.check(same(hsum(b), work[0]), "hsum", 0);
  }
}

inline void check_conversions(Report& r) {
  using VF = Vec<float>;
  constexpr int64_t L = kLanes<float>;
  for (int offset = 0; offset < 16; offset += 3) {
    const VF a = lanes_from<VF>(offset);
    const auto lo = widen_lo(a), hi = widen_hi(a);
    const VF back = narrow(lo, hi);
    const auto wide = to_wide<Vec<double, L>>(a);
    for (int64_t i = 0; i < L; ++i) {
      const double w = i < L / 2 ? lo[i] : hi[i - L / 2];
      r.check(same(w, static_cast<double>(a[i])) && same(wide[i], static_cast<double>(a[i])), "widen", i);
      r.check(same(back[i], a[i]), "narrow", i);
    }
    // bf16 memory: round to nearest even, NaN kept, as c10::BFloat16; loads widen exactly.
    ::uxnet::cpu::simd::bf16 h[L], partial[L];
    store(h, a);
    const VF loaded = load<VF>(h);
    for (int64_t i = 0; i < L; ++i) {
      const ::uxnet::cpu::simd::bf16 want = ::uxnet::cpu::simd::float_to_bf16(a[i]);
      r.check(std::isnan(a[i]) ? (h[i].bits & 0x7fff) > 0x7f80 : h[i].bits == want.bits, "bf16 store", i);
      r.check(same(loaded[i], ::uxnet::cpu::simd::bf16_to_float(h[i])), "bf16 load", i);
    }
    for (int64_t n = 0; n <= L; ++n) {
      for (int64_t i = 0; i < L; ++i) partial[i].bits = 0x4242;
      store_partial(partial, a, n);
      const VF p = load_partial<VF>(partial, n);
      for (int64_t i = 0; i < L; ++i) {
        r.check(i < n ? partial[i].bits == h[i].bits : partial[i].bits == 0x4242, "bf16 store_partial", i);
        r.check(same(p[i], i < n ? ::uxnet::cpu::simd::bf16_to_float(h[i]) : 0.0f), "bf16 load_partial", i);
      }
    }
  }
  // float -> int lanes (truncation, as exp-like code uses it)
  VF small;
  for (int64_t i = 0; i < L; ++i) small[i] = static_cast<float>(i) - 3.5f;
  const Mask<VF> ints = to_wide<Mask<VF>>(small);
  for (int64_t i = 0; i < L; ++i) r.check(ints[i] == static_cast<int32_t>(small[i]), "to_wide float -> int", i);
}

inline float flush_denormal(float v) { return std::fabs(v) < std::numeric_limits<float>::min() ? std::copysign(0.0f, v) : v; }

// bf16_pairs and dot_bf16 against scalar C++: pairs hold c10::BFloat16's rounding of each half; the dot product adds
// the odd product, then the even one, each exactly rounded once, denormals (inputs, acc, results) flushed to zero.
// Finite values without float32 overflow (where vdpbf16ps keeps a wider exponent); zero results compared without
// their sign (vdpbf16ps's sign of an all-zero sum differs from IEEE's).
UXNET_SIMD_BF16_TARGET inline void check_bf16_dot(Report& r) {
  using VF = Vec<float>;
  using P = Bits32<VF>;
  constexpr int64_t L = kLanes<float>;
  // Special values, then pseudo-random ones (whose sums round differently in another order).
  const float values[] = {0.0f, -0.0f, 1.0f, -1.5f, 3.25f, 1e-39f, -2e-38f, 1.00390625f, 1.01171875f, -2.7182818f,
                          1e-3f, 123456.789f, 6e-20f, -7e-20f, 0.3333333f, -1e-5f};
  uint32_t state = 12345u;
  const auto random_float = [&state]() {
    state = state * 1664525u + 1013904223u;
    const uint32_t bits = (state & 0x807fffffu) | ((118u + (state >> 24) % 16u) << 23);  // |x| in [2^-9, 2^7)
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  for (int round = 0; round < 64; ++round) {
    const int offset = round % 16;
    VF even, odd, acc, b_even, b_odd;
    for (int64_t i = 0; i < L; ++i) {
      const bool special = round < 16;
      even[i] = special ? values[(i + offset) % 16] : random_float();
      odd[i] = special ? values[(i + offset + 5) % 16] : random_float();
      acc[i] = special ? values[(i + offset + 11) % 16] : random_float();
      b_even[i] = special ? values[(i + offset + 7) % 16] : random_float();
      b_odd[i] = special ? values[(i + offset + 2) % 16] : random_float();
    }
    const P a = bf16_pairs(even, odd), b = bf16_pairs(b_even, b_odd);
    for (int64_t i = 0; i < L; ++i) {
      const uint32_t want = ::uxnet::cpu::simd::float_to_bf16(even[i]).bits |
                            (static_cast<uint32_t>(::uxnet::cpu::simd::float_to_bf16(odd[i]).bits) << 16);
      r.check(a[i] == want, "bf16_pairs", i);
    }
    const VF got = dot_bf16(acc, a, b);
    for (int64_t i = 0; i < L; ++i) {
      const auto half = [](uint32_t pair, int k) {
        return flush_denormal(::uxnet::cpu::simd::bf16_to_float(::uxnet::cpu::simd::bf16{
            static_cast<uint16_t>(k ? pair >> 16 : pair & 0xffffu)}));
      };
      float want = flush_denormal(std::fma(half(a[i], 1), half(b[i], 1), flush_denormal(acc[i])));
      want = flush_denormal(std::fma(half(a[i], 0), half(b[i], 0), want));
      r.check(got[i] == want, "dot_bf16", i);
    }
  }
}

inline void run(Report& r) {
  check_type<float>(r);
  check_type<double>(r);
  check_conversions(r);
  if (!kNativeBf16Dot || ::uxnet::cpu::simd::cpu_has_bf16_dot()) check_bf16_dot(r);
}

}  // namespace selftest
