// Lane vectors, tile load/store, per-voxel statistics and the exact-GELU math shared by the CPU LayerNorm and
// UX MLP kernels, on top of the SIMD layer (simd/vec.h).
//
// NO include guard: each op's kernel header includes this; both are compiled once per ISA variant by
// simd/compile_per_isa.inc, inside the variant's namespace and target region. Every loop over the lanes of a
// vector is branch-free so that it vectorises for the variant.

using ::uxnet::cpu::voxel_tiling::kTile;
using ::uxnet::cpu::voxel_tiling::TileRef;
using ::uxnet::cpu::voxel_tiling::VoxelTiling;

// ---- lane vectors -------------------------------------------------------------------------------------------
// kWidth consecutive voxels (or, in the channels_last LayerNorm, channels) as one vector of the variant's float
// width: 16 for avx512 and its emulation, 8 for avx2, 4 for generic. float math uses one register per value,
// so the long GELU expressions do not spill; double math uses Lanes<double> of the same lane count (two or more
// registers). A tile row of kTile voxels is kSub vectors.
constexpr int64_t kWidth = kLanes<float>;
constexpr int64_t kSub = kTile / kWidth;
static_assert(kTile % kWidth == 0, "a tile must be a whole number of lane vectors");

template <typename acc_t>
using Lanes = Vec<acc_t, kWidth>;
using FloatLanes = Lanes<float>;
using IntLanes = Mask<FloatLanes>;
using DoubleLanes = Lanes<double>;  // float64 sums of float lanes

// Zero-initialised heap array of lane vectors, aligned for them (std::vector drops the vector alignment).
template <typename V>
class LaneBuffer {
 public:
  explicit LaneBuffer(int64_t count) {
    const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(V) + 127) / 128) * 128;
    data_ = static_cast<V*>(std::aligned_alloc(128, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(static_cast<void*>(data_), 0, bytes);
  }
  ~LaneBuffer() { std::free(data_); }
  LaneBuffer(const LaneBuffer&) = delete;
  LaneBuffer& operator=(const LaneBuffer&) = delete;
  V& operator[](int64_t i) { return data_[i]; }
  V* data() { return data_; }

 private:
  V* data_;
};

// ---- exact GELU: normal CDF and PDF ------------------------------------------------------------------------

// All ones where a > limit, for a >= 0 and limit >= 0 (their bit patterns order like the values); integer
// arithmetic only, so it costs native instructions on emulated vectors too.
UXNET_SIMD_INLINE IntLanes greater_mask(FloatLanes a, float limit) {
  int32_t limit_bits;
  std::memcpy(&limit_bits, &limit, sizeof(limit_bits));
  return (limit_bits - bits(a)) >> 31;
}

// exp(x) for -87 <= x <= 0: Cody-Waite reduction by ln 2, degree-7 Taylor polynomial on |r| <= ln2/2
// (truncation error < 6e-9), 2^k inserted into the exponent bits.
UXNET_SIMD_INLINE FloatLanes exp_nonpositive(FloatLanes x) {
  const FloatLanes shifter = broadcast<FloatLanes>(12582912.0f);  // 1.5 * 2^23: +- it rounds to an integer
  FloatLanes k = fma(x, broadcast<FloatLanes>(1.44269504088896341f), shifter);
  k -= shifter;
  FloatLanes r = fnma(k, broadcast<FloatLanes>(0.693145751953125f), x);
  r = fnma(k, broadcast<FloatLanes>(1.428606765330187e-06f), r);
  FloatLanes p = broadcast<FloatLanes>(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = fma(p, r, broadcast<FloatLanes>(c));
  }
  const IntLanes scale_bits = (to_wide<IntLanes>(k) + 127) << 23;
  return p * from_bits<FloatLanes>(scale_bits);
}

// Phi(x) and phi(x) of the standard normal, without erf cancellation in either tail. With a = |x| / sqrt(2):
//   a <= 1: erf(a) = a * P(a^2)                (least-squares fit, relative error < 1.4e-9)
//   a >  1: erfc(a) = exp(-a^2) * Q(1 / a)     (fit on a in [1, 4.5], relative error < 3e-8; beyond 4.5
//                                               erfc(a) < 2e-10 and only contributes below float resolution)
// phi(x) = exp(-a^2) / sqrt(2 pi) reuses the same exponential (a^2 clamped at 87, where exp underflows).
// Float rounding of a^2 limits the relative accuracy of Phi in the far negative tail to ~1e-6 (absolute error
// < 1e-7 everywhere).
UXNET_SIMD_INLINE void normal_cdf_pdf(FloatLanes x, FloatLanes& cdf, FloatLanes& pdf) {
  const FloatLanes a = abs(x) * 0.707106781186547524f;
  FloatLanes a2 = a * a;
  a2 = select(greater_mask(a2, 87.0f), broadcast<FloatLanes>(87.0f), a2);
  const FloatLanes e = exp_nonpositive(-a2);
  pdf = e * 0.398942280401432678f;

  FloatLanes p = broadcast<FloatLanes>(7.8982101233388e-05f);
  for (const float c : {-0.0008024354100276965f, 0.0051900535740917325f, -0.026854808534817587f,
                        0.112836124281681f, -0.37612628843314233f, 1.1283791665100467f}) {
    p = fma(p, a2, broadcast<FloatLanes>(c));
  }
  const FloatLanes erf_small = a * p;

  const IntLanes large = greater_mask(a, 1.0f);
  const FloatLanes u = 1.0f / select(large, a, broadcast<FloatLanes>(1.0f));
  FloatLanes q = broadcast<FloatLanes>(0.036578786946252065f);
  for (const float c : {-0.21295547999210912f, 0.5201406133675134f, -0.6518760934218639f, 0.3393967587537968f,
                        0.17273520223392352f, -0.3545523441846141f, 0.015622531002019768f, 0.5624084786764058f,
                        8.513175259495541e-05f}) {
    q = fma(q, u, broadcast<FloatLanes>(c));
  }
  const FloatLanes half_erfc = 0.5f * select(large, e * q, 1.0f - erf_small);
  const IntLanes negative = bits(x) >> 31;  // all ones where the sign bit is set
  cdf = select(negative, half_erfc, 1.0f - half_erfc);
}

// float64 inputs take the exact libm path, lane by lane (the float64 kernels are the gradcheck path).
UXNET_SIMD_INLINE void normal_cdf_pdf(DoubleLanes x, DoubleLanes& cdf, DoubleLanes& pdf) {
  for (int64_t b = 0; b < kWidth; ++b) {
    cdf[b] = 0.5 * std::erfc(-x[b] * 0.70710678118654752440);
    pdf[b] = std::exp(-0.5 * x[b] * x[b]) * 0.39894228040143267794;
  }
}

// ---- tiles -------------------------------------------------------------------------------------------------

// Tile row c (kSub lane vectors from rows + c * kSub) = src(n, c, v0 + b) for b < count, 0 for padding lanes.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
UXNET_SIMD_INLINE void load_tile(const scalar_t* src, const VoxelTiling& t, const TileRef& tile,
                                 Lanes<acc_t>* rows) {
  using ::uxnet::cpu::simd::convert;
  acc_t* buf = reinterpret_cast<acc_t*>(rows);  // GCC vectors alias their element type
  const int64_t C = t.channels;
  if (kChannelsLast) {
    const scalar_t* base = src + (tile.n * t.voxels + tile.v0) * C;
    for (int64_t b = 0; b < tile.count; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        buf[c * kTile + b] = convert<acc_t>(base[b * C + c]);
      }
    }
  } else {
    const scalar_t* base = src + tile.n * C * t.voxels + tile.v0;
    if (tile.count == kTile) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t b = 0; b < kTile; ++b) {
          buf[c * kTile + b] = convert<acc_t>(base[c * t.voxels + b]);
        }
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < tile.count; ++b) {
        buf[c * kTile + b] = convert<acc_t>(base[c * t.voxels + b]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = tile.count; b < kTile; ++b) {
      buf[c * kTile + b] = acc_t(0);
    }
  }
}

template <bool kChannelsLast, typename scalar_t, typename acc_t>
UXNET_SIMD_INLINE void store_tile(const Lanes<acc_t>* rows, const VoxelTiling& t, const TileRef& tile,
                                  scalar_t* dst) {
  using ::uxnet::cpu::simd::convert;
  const acc_t* buf = reinterpret_cast<const acc_t*>(rows);
  const int64_t C = t.channels;
  if (kChannelsLast) {
    scalar_t* base = dst + (tile.n * t.voxels + tile.v0) * C;
    for (int64_t b = 0; b < tile.count; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        base[b * C + c] = convert<scalar_t>(buf[c * kTile + b]);
      }
    }
    return;
  }
  scalar_t* base = dst + tile.n * C * t.voxels + tile.v0;
  if (tile.count == kTile) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < kTile; ++b) {
        base[c * t.voxels + b] = convert<scalar_t>(buf[c * kTile + b]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < tile.count; ++b) {
      base[c * t.voxels + b] = convert<scalar_t>(buf[c * kTile + b]);
    }
  }
}

// ---- lane vectors straight from tensor memory (LayerNorm: NCDHW rows, channels_last_3d voxels) --------------

// Runs body(v, whole) for the lane vectors v of a row of `count` elements; `whole` is std::true_type for the
// vectors inside the row (plain vector loads and stores) and std::false_type for the partial last one.
template <typename Body>
UXNET_SIMD_INLINE void for_each_lane_vector(int64_t count, Body body) {
  const int64_t whole = count / kWidth;
  for (int64_t v = 0; v < whole; ++v) {
    body(v, std::true_type{});
  }
  if (whole * kWidth < count) {
    body(whole, std::false_type{});
  }
}

// Lane vector v of a row of `count` elements; in the partial last vector, lanes past the row's end read as 0.
template <typename acc_t, typename scalar_t, typename Whole>
UXNET_SIMD_INLINE Lanes<acc_t> lanes_at(const scalar_t* row, int64_t v, int64_t count, Whole) {
  if constexpr (Whole::value) {
    return load<Lanes<acc_t>>(row + v * kWidth);
  } else {
    return load_partial<Lanes<acc_t>>(row + v * kWidth, count - v * kWidth);
  }
}

// Writes lane vector v of a row of `count` elements (in the partial last vector, lanes past the end are dropped).
template <typename scalar_t, typename acc_t, typename Whole>
UXNET_SIMD_INLINE void store_lanes_at(scalar_t* row, int64_t v, int64_t count, Whole, Lanes<acc_t> value) {
  if constexpr (Whole::value) {
    store(row + v * kWidth, value);
  } else {
    store_partial(row + v * kWidth, value, count - v * kWidth);
  }
}

// 1 / sqrt(v), lane by lane (IEEE division and square root).
template <typename V>
UXNET_SIMD_INLINE V lane_rsqrt(V v) {
  return broadcast<V>(1) / sqrt(v);
}

// ---- per-voxel statistics -------------------------------------------------------------------------------------

// Per-voxel mean and 1/sqrt(biased variance + eps) over the C rows of a tile (two passes, acc_t precision).
template <typename acc_t>
UXNET_SIMD_INLINE void tile_stats(const Lanes<acc_t>* rows, int64_t C, acc_t eps, Lanes<acc_t>* mean,
                                  Lanes<acc_t>* rstd) {
  for (int64_t s = 0; s < kSub; ++s) {
    Lanes<acc_t> sum{};
    for (int64_t c = 0; c < C; ++c) {
      sum += rows[c * kSub + s];
    }
    mean[s] = sum / static_cast<acc_t>(C);
    Lanes<acc_t> sq{};
    for (int64_t c = 0; c < C; ++c) {
      const Lanes<acc_t> d = rows[c * kSub + s] - mean[s];
      sq = fma(d, d, sq);
    }
    rstd[s] = lane_rsqrt(sq / static_cast<acc_t>(C) + eps);
  }
}

// float lanes as float64 lanes (for float64 sums); float64 lanes as they are.
UXNET_SIMD_INLINE DoubleLanes widen(FloatLanes v) { return to_wide<DoubleLanes>(v); }
UXNET_SIMD_INLINE DoubleLanes widen(DoubleLanes v) { return v; }

// The backward passes centre x on the saved mean plus a correction, mean_lo = mean_c(x - mean) (float, one more
// sweep over the channels): with few channels the input gradient is ill-conditioned in the mean (C = 2: xhat is
// +-1 up to eps terms and grad_x is what is left after cancelling terms of size |grad_out|), and the saved mean
// is rounded. (x - mean) - mean_lo is x minus the mean to within a rounding of the centred value itself.
template <typename V>
UXNET_SIMD_INLINE V centred(V x, V mean, V mean_lo) {
  return (x - mean) - mean_lo;
}

// Per-voxel mean corrections of a tile of C rows against the saved means.
template <typename V>
UXNET_SIMD_INLINE void tile_mean_corrections(const V* rows, int64_t C, const V* mean, V* mean_lo) {
  for (int64_t s = 0; s < kSub; ++s) {
    V sum{};
    for (int64_t c = 0; c < C; ++c) {
      sum += rows[c * kSub + s] - mean[s];
    }
    mean_lo[s] = sum / static_cast<Scalar<V>>(C);
  }
}

template <typename acc_t>
UXNET_SIMD_INLINE void store_stats(const Lanes<acc_t>* mean, const Lanes<acc_t>* rstd, const VoxelTiling& t,
                                   const TileRef& tile, acc_t* mean_out, acc_t* rstd_out) {
  const acc_t* mean_lanes = reinterpret_cast<const acc_t*>(mean);
  const acc_t* rstd_lanes = reinterpret_cast<const acc_t*>(rstd);
  const int64_t base = tile.n * t.voxels + tile.v0;
  for (int64_t b = 0; b < tile.count; ++b) {
    mean_out[base + b] = mean_lanes[b];
    rstd_out[base + b] = rstd_lanes[b];
  }
}

// Saved stats of a tile (t.tile_voxels lanes); padding lanes get mean 0 and rstd 0 (their grad_out is 0, so they
// contribute nothing).
template <typename acc_t>
UXNET_SIMD_INLINE void load_stats(const acc_t* mean_in, const acc_t* rstd_in, const VoxelTiling& t,
                                  const TileRef& tile, Lanes<acc_t>* mean, Lanes<acc_t>* rstd) {
  acc_t* mean_lanes = reinterpret_cast<acc_t*>(mean);
  acc_t* rstd_lanes = reinterpret_cast<acc_t*>(rstd);
  const int64_t base = tile.n * t.voxels + tile.v0;
  for (int64_t b = 0; b < t.tile_voxels; ++b) {
    mean_lanes[b] = b < tile.count ? mean_in[base + b] : acc_t(0);
    rstd_lanes[b] = b < tile.count ? rstd_in[base + b] : acc_t(0);
  }
}

// Lane-wise parameter-gradient sums of one chunk: lanes[(c * rows + row) * kSub + s] accumulate over at most
// kTilesPerFlush tiles, then are added (in double, fixed lane order) into the chunk's partial sums
// partial[row * C + c].
template <typename acc_t>
UXNET_SIMD_INLINE void flush_lanes(Lanes<acc_t>* lanes, int64_t rows, int64_t C, double* partial) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t row = 0; row < rows; ++row) {
      Lanes<acc_t>* lane = lanes + (c * rows + row) * kSub;
      double sum = 0.0;
      for (int64_t s = 0; s < kSub; ++s) {
        for (int64_t b = 0; b < kWidth; ++b) {
          sum += static_cast<double>(lane[s][b]);
        }
        lane[s] = Lanes<acc_t>{};
      }
      partial[row * C + c] += sum;
    }
  }
}

// ---- few-channel backwards (float64, voxel by voxel) ---------------------------------------------------------
// One voxel's C channels of x and grad_out (channel c at base + c * channel_stride) as float64 into xs and gs;
// returns the channels' mean of x.
template <typename scalar_t>
inline double load_voxel_channels(const scalar_t* x, const scalar_t* grad_out, int64_t base, int64_t channel_stride,
                                  int64_t C, double* xs, double* gs) {
  using ::uxnet::cpu::simd::convert;
  double mean = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    xs[c] = convert<double>(x[base + c * channel_stride]);
    gs[c] = convert<double>(grad_out[base + c * channel_stride]);
    mean += xs[c];
  }
  return mean / static_cast<double>(C);
}
