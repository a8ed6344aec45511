// Kernels of the CPU instance-norm ops (math in params.h), written once over the SIMD layer.
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per ISA variant.
//
// NCDHW: vectors run along a plane's voxels; a plane's partial last vector is handled lane by lane (sums) or with
// partial loads and stores (element-wise passes). channels_last_3d: vectors run along a voxel's channels; the
// per-channel float64 sums of a voxel range are kept in registers for a block of channel vectors at a time.

namespace instance_norm_kernels {

using ::uxnet::cpu::instance_norm::Args;
using ::uxnet::cpu::instance_norm::kBackwardSums;
using ::uxnet::cpu::instance_norm::finalize_stats;
using ::uxnet::cpu::instance_norm::ResidualMode;
using ::uxnet::cpu::instance_norm::StatsArgs;
using ::uxnet::cpu::simd::convert;

// Channel vectors whose float64 sums a channels_last_3d pass keeps in registers at once.
constexpr int64_t kChannelBlock = kVectorRegisters >= 32 ? 4 : 2;

template <typename acc_t>
using VA = Vec<acc_t>;
template <typename acc_t>
constexpr int64_t kL = kLanes<acc_t>;

// float64 sums of the lanes of an acc_t vector: two double vectors for float lanes, one for double lanes.
template <typename acc_t>
struct DoubleLanes;

template <>
struct DoubleLanes<float> {
  using D = Vec<double, kLanes<float> / 2>;
  D lo{}, hi{};
  static UXNET_SIMD_INLINE D low(VA<float> v) { return widen_lo(v); }
  static UXNET_SIMD_INLINE D high(VA<float> v) { return widen_hi(v); }
  UXNET_SIMD_INLINE void add(VA<float> v) {
    lo += widen_lo(v);
    hi += widen_hi(v);
  }
  // += a * b, the product exact in float64
  UXNET_SIMD_INLINE void add_product(VA<float> a, VA<float> b) {
    lo = fma(widen_lo(a), widen_lo(b), lo);
    hi = fma(widen_hi(a), widen_hi(b), hi);
  }
  UXNET_SIMD_INLINE double total() const { return hsum(lo + hi); }
  // out[i] += lane i, for i < n
  UXNET_SIMD_INLINE void add_lanes_to(double* out, int64_t n) const {
    double buf[kLanes<float>];
    store(buf, lo);
    store(buf + kLanes<float> / 2, hi);
    for (int64_t i = 0; i < n; ++i) out[i] += buf[i];
  }
};

template <>
struct DoubleLanes<double> {
  VA<double> v{};
  UXNET_SIMD_INLINE void add(VA<double> x) { v += x; }
  UXNET_SIMD_INLINE void add_product(VA<double> a, VA<double> b) { v = fma(a, b, v); }
  UXNET_SIMD_INLINE double total() const { return hsum(v); }
  UXNET_SIMD_INLINE void add_lanes_to(double* out, int64_t n) const {
    double buf[kLanes<double>];
    store(buf, v);
    for (int64_t i = 0; i < n; ++i) out[i] += buf[i];
  }
};

// n lanes (1 <= n <= lanes) of scalar_t memory as acc_t lanes; lanes past n are 0 and nothing past p[n) is read.
template <typename acc_t, typename scalar_t>
UXNET_SIMD_INLINE VA<acc_t> load_n(const scalar_t* p, int64_t n) {
  return n >= kL<acc_t> ? load<VA<acc_t>>(p) : load_partial<VA<acc_t>>(p, n);
}

template <typename acc_t, typename scalar_t>
UXNET_SIMD_INLINE void store_n(scalar_t* p, VA<acc_t> v, int64_t n) {
  if (n >= kL<acc_t>) {
    store(p, v);
  } else {
    store_partial(p, v, n);
  }
}

template <typename acc_t>
UXNET_SIMD_INLINE VA<acc_t> lrelu(VA<acc_t> s, VA<acc_t> slope) {
  return select(gt(s, zero<VA<acc_t>>()), s, s * slope);
}

// Calls fn(std::integral_constant<ResidualMode, mode>) for the run-time mode.
template <typename Fn>
UXNET_SIMD_INLINE void with_mode(ResidualMode mode, Fn fn) {
  switch (mode) {
    case ResidualMode::none: return fn(std::integral_constant<ResidualMode, ResidualMode::none>());
    case ResidualMode::plain: return fn(std::integral_constant<ResidualMode, ResidualMode::plain>());
    case ResidualMode::normalized: return fn(std::integral_constant<ResidualMode, ResidualMode::normalized>());
  }
}

// channels_last_3d element passes: fn(mode, offset, c, count) for every run of up to one vector of channels
// [c, c + count) of each voxel in [v0, v1) of batch item n, `offset` its first element.
template <typename scalar_t, typename acc_t, typename Fn>
UXNET_SIMD_INLINE void for_each_channel_run(const Args<scalar_t, acc_t>& a, int64_t n, int64_t v0, int64_t v1, Fn fn) {
  constexpr int64_t L = kL<acc_t>;
  const int64_t C = a.layout.channels;
  const int64_t base = n * a.layout.voxels * C;
  with_mode(a.mode, [&](auto mode) {
    for (int64_t v = v0; v < v1; ++v) {
      for (int64_t c = 0; c < C; c += L) fn(mode, base + v * C + c, c, std::min<int64_t>(L, C - c));
    }
  });
}

// The residual of a channel run: r at `offset` and, for the normalised shortcut, its (n, c) statistics at `nc`
// (zeros where the mode has none).
template <typename acc_t>
struct ResidualLanes {
  VA<acc_t> r, mean, rstd;
};

template <ResidualMode kMode, typename scalar_t, typename acc_t>
UXNET_SIMD_INLINE ResidualLanes<acc_t> load_residual(const Args<scalar_t, acc_t>& a, int64_t offset, int64_t nc,
                                                     int64_t count) {
  ResidualLanes<acc_t> res{zero<VA<acc_t>>(), zero<VA<acc_t>>(), zero<VA<acc_t>>()};
  if constexpr (kMode != ResidualMode::none) res.r = load_n<acc_t>(a.r + offset, count);
  if constexpr (kMode == ResidualMode::normalized) {
    res.mean = load_n<acc_t>(a.r_mean + nc, count);
    res.rstd = load_n<acc_t>(a.r_rstd + nc, count);
  }
  return res;
}

// ---- statistics ----------------------------------------------------------------------------------------------

// Shifted float64 sums of the lanes of v: s1 += v - k, s2 += (v - k)^2.
template <typename acc_t>
UXNET_SIMD_INLINE void add_shifted(VA<acc_t> v, DoubleLanes<acc_t>& k, DoubleLanes<acc_t>& s1,
                                   DoubleLanes<acc_t>& s2) {
  if constexpr (std::is_same<acc_t, float>::value) {
    const auto lo = widen_lo(v) - k.lo;
    const auto hi = widen_hi(v) - k.hi;
    s1.lo += lo;
    s1.hi += hi;
    s2.lo = fma(lo, lo, s2.lo);
    s2.hi = fma(hi, hi, s2.hi);
  } else {
    const auto d = v - k.v;
    s1.v += d;
    s2.v = fma(d, d, s2.v);
  }
}

template <typename acc_t>
UXNET_SIMD_INLINE DoubleLanes<acc_t> broadcast_double(double k) {
  DoubleLanes<acc_t> d;
  if constexpr (std::is_same<acc_t, float>::value) {
    d.lo = broadcast<typename DoubleLanes<float>::D>(k);
    d.hi = d.lo;
  } else {
    d.v = broadcast<VA<double>>(k);
  }
  return d;
}

// mean and rstd of the S contiguous values at x.
template <typename scalar_t, typename acc_t>
UXNET_SIMD_INLINE void plane_stats(const scalar_t* x, int64_t S, double eps, acc_t* mean, acc_t* rstd) {
  constexpr int64_t L = kL<acc_t>;
  const double k = convert<double>(x[0]);
  DoubleLanes<acc_t> shift = broadcast_double<acc_t>(k), s1, s2;
  int64_t i = 0;
  for (; i + L <= S; i += L) add_shifted(load<VA<acc_t>>(x + i), shift, s1, s2);
  double t1 = s1.total(), t2 = s2.total();
  for (; i < S; ++i) {
    const double d = convert<double>(x[i]) - k;
    t1 += d;
    t2 += d * d;
  }
  finalize_stats(k, t1, t2, S, eps, mean, rstd);
}

template <typename scalar_t, typename acc_t>
void stats_voxels(const StatsArgs<scalar_t, acc_t>& a, int64_t n, int64_t v0, int64_t v1, double* sums) {
  constexpr int64_t L = kL<acc_t>;
  const int64_t C = a.layout.channels;
  const scalar_t* item = a.x + n * a.layout.voxels * C;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock * L) {
    DoubleLanes<acc_t> shift[kChannelBlock], s1[kChannelBlock], s2[kChannelBlock];
    int64_t lanes[kChannelBlock];
    for (int64_t b = 0; b < kChannelBlock; ++b) {
      lanes[b] = std::max<int64_t>(0, std::min<int64_t>(L, C - c0 - b * L));
      if (lanes[b] > 0) {
        const VA<acc_t> k = load_n<acc_t>(item + c0 + b * L, lanes[b]);  // the shift: voxel 0 (0 past C)
        if constexpr (std::is_same<acc_t, float>::value) {
          shift[b].lo = widen_lo(k);
          shift[b].hi = widen_hi(k);
        } else {
          shift[b].v = k;
        }
      }
    }
    for (int64_t v = v0; v < v1; ++v) {
      const scalar_t* row = item + v * C + c0;
      for (int64_t b = 0; b < kChannelBlock && lanes[b] > 0; ++b) {
        add_shifted(load_n<acc_t>(row + b * L, lanes[b]), shift[b], s1[b], s2[b]);
      }
    }
    for (int64_t b = 0; b < kChannelBlock && lanes[b] > 0; ++b) {
      s1[b].add_lanes_to(sums + c0 + b * L, lanes[b]);
      s2[b].add_lanes_to(sums + C + c0 + b * L, lanes[b]);
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------------------------

template <ResidualMode kMode, typename acc_t>
UXNET_SIMD_INLINE VA<acc_t> forward_value(VA<acc_t> z, VA<acc_t> mean, VA<acc_t> rstd, VA<acc_t> r,
                                          VA<acc_t> r_mean, VA<acc_t> r_rstd, VA<acc_t> slope) {
  VA<acc_t> s = (z - mean) * rstd;
  if constexpr (kMode == ResidualMode::plain) s += r;
  if constexpr (kMode == ResidualMode::normalized) s += (r - r_mean) * r_rstd;
  return lrelu<acc_t>(s, slope);
}

template <typename scalar_t, typename acc_t>
void forward_planes(const Args<scalar_t, acc_t>& a, int64_t p0, int64_t p1) {
  using V = VA<acc_t>;
  constexpr int64_t L = kL<acc_t>;
  const int64_t S = a.layout.voxels;
  const V slope = broadcast<V>(a.slope);
  with_mode(a.mode, [&](auto mode) {
    constexpr ResidualMode kMode = decltype(mode)::value;
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* z = a.z + p * S;
      const scalar_t* r = kMode == ResidualMode::none ? nullptr : a.r + p * S;
      scalar_t* y = a.y + p * S;
      plane_stats(z, S, a.eps, a.mean + p, a.rstd + p);
      if constexpr (kMode == ResidualMode::normalized) plane_stats(r, S, a.eps, a.r_mean + p, a.r_rstd + p);
      const V mean = broadcast<V>(a.mean[p]);
      const V rstd = broadcast<V>(a.rstd[p]);
      const V r_mean = kMode == ResidualMode::normalized ? broadcast<V>(a.r_mean[p]) : zero<V>();
      const V r_rstd = kMode == ResidualMode::normalized ? broadcast<V>(a.r_rstd[p]) : zero<V>();
      auto step = [&](int64_t i, int64_t count) {
        const V rv = kMode == ResidualMode::none ? zero<V>() : load_n<acc_t>(r + i, count);
        store_n<acc_t>(y + i, forward_value<kMode, acc_t>(load_n<acc_t>(z + i, count), mean, rstd, rv, r_mean,
                                                          r_rstd, slope),
                       count);
      };
      int64_t i = 0;
      for (; i + L <= S; i += L) step(i, L);
      if (i < S) step(i, S - i);
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_voxels(const Args<scalar_t, acc_t>& a, int64_t n, int64_t v0, int64_t v1) {
  const VA<acc_t> slope = broadcast<VA<acc_t>>(a.slope);
  for_each_channel_run(a, n, v0, v1, [&](auto mode, int64_t offset, int64_t c, int64_t count) {
    constexpr ResidualMode kMode = decltype(mode)::value;
    const int64_t nc = n * a.layout.channels + c;
    const ResidualLanes<acc_t> res = load_residual<kMode>(a, offset, nc, count);
    store_n<acc_t>(a.y + offset,
                   forward_value<kMode, acc_t>(load_n<acc_t>(a.z + offset, count), load_n<acc_t>(a.mean + nc, count),
                                               load_n<acc_t>(a.rstd + nc, count), res.r, res.mean, res.rstd, slope),
                   count);
  });
}

// ---- backward --------------------------------------------------------------------------------------------------

template <typename acc_t>
struct BackwardTerms {
  VA<acc_t> gs;     // grad_out through the LeakyReLU
  VA<acc_t> xhat;   // z's normalised value, recovered from the output
  VA<acc_t> r_hat;  // the residual as added (0 without one)
};

template <ResidualMode kMode, typename acc_t>
UXNET_SIMD_INLINE BackwardTerms<acc_t> backward_terms(VA<acc_t> g, VA<acc_t> out, VA<acc_t> r, VA<acc_t> r_mean,
                                                      VA<acc_t> r_rstd, VA<acc_t> slope) {
  using V = VA<acc_t>;
  const auto positive = gt(out, zero<V>());
  const V gs = select(positive, g, g * slope);
  const V s = select(positive, out, out / slope);
  V r_hat = zero<V>();
  if constexpr (kMode == ResidualMode::plain) r_hat = r;
  if constexpr (kMode == ResidualMode::normalized) r_hat = (r - r_mean) * r_rstd;
  return {gs, s - r_hat, r_hat};
}

template <ResidualMode kMode, typename acc_t>
UXNET_SIMD_INLINE void add_backward_sums(const BackwardTerms<acc_t>& t, DoubleLanes<acc_t>* sums) {
  sums[0].add(t.gs);
  sums[1].add_product(t.gs, t.xhat);
  if constexpr (kMode == ResidualMode::normalized) sums[2].add_product(t.gs, t.r_hat);
}

template <ResidualMode kMode, typename scalar_t, typename acc_t>
UXNET_SIMD_INLINE void store_backward(const Args<scalar_t, acc_t>& a, int64_t offset, int64_t count,
                                      const BackwardTerms<acc_t>& t, VA<acc_t> rstd, VA<acc_t> r_rstd,
                                      VA<acc_t> coef_a, VA<acc_t> coef_b, VA<acc_t> coef_b_r) {
  store_n<acc_t>(a.y + offset, rstd * (t.gs - coef_a - t.xhat * coef_b), count);
  if constexpr (kMode == ResidualMode::plain) store_n<acc_t>(a.grad_r + offset, t.gs, count);
  if constexpr (kMode == ResidualMode::normalized) {
    store_n<acc_t>(a.grad_r + offset, r_rstd * (t.gs - coef_a - t.r_hat * coef_b_r), count);
  }
}

// NCDHW: per plane, the sums over its voxels, then grad_z (and grad_r) in a second pass.
template <typename scalar_t, typename acc_t>
void backward_planes(const Args<scalar_t, acc_t>& a, int64_t p0, int64_t p1) {
  using V = VA<acc_t>;
  constexpr int64_t L = kL<acc_t>;
  const int64_t S = a.layout.voxels;
  const V slope = broadcast<V>(a.slope);
  with_mode(a.mode, [&](auto mode) {
    constexpr ResidualMode kMode = decltype(mode)::value;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = p * S;
      const V r_mean = kMode == ResidualMode::normalized ? broadcast<V>(a.r_mean[p]) : zero<V>();
      const V r_rstd = kMode == ResidualMode::normalized ? broadcast<V>(a.r_rstd[p]) : zero<V>();
      auto terms = [&](int64_t i, int64_t count) {
        const V r = kMode == ResidualMode::none ? zero<V>() : load_n<acc_t>(a.r + base + i, count);
        return backward_terms<kMode, acc_t>(load_n<acc_t>(a.grad_out + base + i, count),
                                            load_n<acc_t>(a.out + base + i, count), r, r_mean, r_rstd, slope);
      };
      DoubleLanes<acc_t> sums[kBackwardSums];
      int64_t i = 0;
      for (; i + L <= S; i += L) add_backward_sums<kMode, acc_t>(terms(i, L), sums);
      double total[kBackwardSums] = {sums[0].total(), sums[1].total(), sums[2].total()};
      if (i < S) {  // the partial last vector, lane by lane (padding lanes must not enter the sums)
        const BackwardTerms<acc_t> t = terms(i, S - i);
        for (int64_t lane = 0; lane < S - i; ++lane) {
          total[0] += static_cast<double>(t.gs[lane]);
          total[1] += static_cast<double>(t.gs[lane]) * static_cast<double>(t.xhat[lane]);
          total[2] += static_cast<double>(t.gs[lane]) * static_cast<double>(t.r_hat[lane]);
        }
      }
      const double inv = 1.0 / static_cast<double>(S);
      const V coef_a = broadcast<V>(static_cast<acc_t>(total[0] * inv));
      const V coef_b = broadcast<V>(static_cast<acc_t>(total[1] * inv));
      const V coef_b_r = broadcast<V>(static_cast<acc_t>(total[2] * inv));
      const V rstd = broadcast<V>(a.rstd[p]);
      for (i = 0; i < S; i += L) {
        const int64_t count = std::min<int64_t>(L, S - i);
        store_backward<kMode>(a, base + i, count, terms(i, count), rstd, r_rstd, coef_a, coef_b, coef_b_r);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_sums_voxels(const Args<scalar_t, acc_t>& a, int64_t n, int64_t v0, int64_t v1, double* sums) {
  using V = VA<acc_t>;
  constexpr int64_t L = kL<acc_t>;
  const int64_t C = a.layout.channels;
  const int64_t base = n * a.layout.voxels * C;
  const V slope = broadcast<V>(a.slope);
  with_mode(a.mode, [&](auto mode) {
    constexpr ResidualMode kMode = decltype(mode)::value;
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock * L) {
      DoubleLanes<acc_t> block[kChannelBlock][kBackwardSums];
      int64_t lanes[kChannelBlock];
      V r_mean[kChannelBlock], r_rstd[kChannelBlock];
      for (int64_t b = 0; b < kChannelBlock; ++b) {
        lanes[b] = std::max<int64_t>(0, std::min<int64_t>(L, C - c0 - b * L));
        r_mean[b] = r_rstd[b] = zero<V>();
        if (kMode == ResidualMode::normalized && lanes[b] > 0) {
          r_mean[b] = load_n<acc_t>(a.r_mean + n * C + c0 + b * L, lanes[b]);
          r_rstd[b] = load_n<acc_t>(a.r_rstd + n * C + c0 + b * L, lanes[b]);
        }
      }
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t row = base + v * C + c0;
        for (int64_t b = 0; b < kChannelBlock && lanes[b] > 0; ++b) {
          const int64_t off = row + b * L;
          const V r = kMode == ResidualMode::none ? zero<V>() : load_n<acc_t>(a.r + off, lanes[b]);
          // padding lanes read grad_out = 0, so they add 0 to every sum
          add_backward_sums<kMode, acc_t>(
              backward_terms<kMode, acc_t>(load_n<acc_t>(a.grad_out + off, lanes[b]),
                                           load_n<acc_t>(a.out + off, lanes[b]), r, r_mean[b], r_rstd[b], slope),
              block[b]);
        }
      }
      for (int64_t b = 0; b < kChannelBlock && lanes[b] > 0; ++b) {
        for (int k = 0; k < kBackwardSums; ++k) block[b][k].add_lanes_to(sums + k * C + c0 + b * L, lanes[b]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_apply_voxels(const Args<scalar_t, acc_t>& a, int64_t n, int64_t v0, int64_t v1,
                           const acc_t* coefficients) {
  const int64_t C = a.layout.channels;
  const VA<acc_t> slope = broadcast<VA<acc_t>>(a.slope);
  for_each_channel_run(a, n, v0, v1, [&](auto mode, int64_t offset, int64_t c, int64_t count) {
    constexpr ResidualMode kMode = decltype(mode)::value;
    const int64_t nc = n * C + c;
    const ResidualLanes<acc_t> res = load_residual<kMode>(a, offset, nc, count);
    const BackwardTerms<acc_t> t =
        backward_terms<kMode, acc_t>(load_n<acc_t>(a.grad_out + offset, count), load_n<acc_t>(a.out + offset, count),
                                     res.r, res.mean, res.rstd, slope);
    store_backward<kMode>(a, offset, count, t, load_n<acc_t>(a.rstd + nc, count), res.rstd,
                          load_n<acc_t>(coefficients + c, count), load_n<acc_t>(coefficients + C + c, count),
                          load_n<acc_t>(coefficients + 2 * C + c, count));
  });
}

}  // namespace instance_norm_kernels
