// Tile load/store, per-voxel statistics and the exact-GELU math of the CPU LayerNorm / UX MLP kernels.
//
// NO include guard on purpose: each kernel .cpp includes its kernel header (which includes this one) once per
// instruction set, inside a namespace and a `#pragma GCC target` region, so every function here is compiled
// for AVX-512, AVX2+FMA and the baseline ISA. Every loop over the kTile voxels of a tile is branch-free so that
// the compiler vectorises it for the ISA of the region. Needs <cmath>, <cstdint>, <cstring>, <type_traits>,
// c10::BFloat16 and ln_mlp_common.h included before.

using ::uxnet::ln_mlp::kTile;
using ::uxnet::ln_mlp::TileRef;
using ::uxnet::ln_mlp::VoxelTiling;

// ---- lane vectors -------------------------------------------------------------------------------------------
// kLanes consecutive voxels of a tile as a GCC vector of the region's native float width (UXNET_LN_MLP_LANES,
// set by the including .cpp: 16 for AVX-512, 8 for AVX2, 4 for the baseline): one register per value for
// float, so the long GELU expressions do not spill. A tile row of kTile voxels is kSub such vectors.
constexpr int64_t kLanes = UXNET_LN_MLP_LANES;
constexpr int64_t kSub = kTile / kLanes;
static_assert(kTile % kLanes == 0, "a tile must be a whole number of lane vectors");

template <typename acc_t>
struct LaneTypes;
template <>
struct LaneTypes<float> {
  typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
};
template <>
struct LaneTypes<double> {
  typedef double vec __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename acc_t>
using Lanes = typename LaneTypes<acc_t>::vec;

template <typename acc_t>
UXNET_LN_MLP_INLINE Lanes<acc_t> broadcast(acc_t v) {
  return Lanes<acc_t>{} + v;
}

// Zero-initialised heap array of lane vectors, aligned for them (std::vector drops the vector alignment).
template <typename V>
class LaneBuffer {
 public:
  explicit LaneBuffer(int64_t count) {
    const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(V) + 127) / 128) * 128;
    data_ = static_cast<V*>(std::aligned_alloc(128, bytes));
    TORCH_CHECK(data_ != nullptr, "uxnet: out of memory allocating ", bytes, " bytes of kernel scratch");
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

using FloatLanes = Lanes<float>;
using IntLanes = LaneTypes<float>::ivec;

// Selects and masks are built from integer arithmetic only: GCC lowers comparisons and ?: of vectors wider than
// the ISA's registers element by element, but splits integer add/shift/and into native-width instructions.
UXNET_LN_MLP_INLINE IntLanes bits_of(FloatLanes x) { return (IntLanes)x; }
UXNET_LN_MLP_INLINE FloatLanes select(IntLanes mask, FloatLanes if_set, FloatLanes if_clear) {
  return (FloatLanes)((mask & bits_of(if_set)) | (~mask & bits_of(if_clear)));
}
// All ones where a > limit, for a >= 0 and limit >= 0 (their bit patterns order like the values).
UXNET_LN_MLP_INLINE IntLanes greater_mask(FloatLanes a, float limit) {
  int32_t limit_bits;
  std::memcpy(&limit_bits, &limit, sizeof(limit_bits));
  return (limit_bits - bits_of(a)) >> 31;
}

// exp(x) for -87 <= x <= 0: Cody-Waite reduction by ln 2, degree-7 Taylor polynomial on |r| <= ln2/2
// (truncation error < 6e-9), 2^k inserted into the exponent bits.
UXNET_LN_MLP_INLINE FloatLanes exp_nonpositive(FloatLanes x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  FloatLanes k = x * 1.44269504088896341f + shifter;
  k -= shifter;
  FloatLanes r = x - k * 0.693145751953125f;
  r -= k * 1.428606765330187e-06f;
  FloatLanes p = broadcast(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IntLanes scale_bits = (__builtin_convertvector(k, IntLanes) + 127) << 23;
  return p * (FloatLanes)scale_bits;
}

// Phi(x) and phi(x) of the standard normal, without erf cancellation in either tail. With a = |x| / sqrt(2):
//   a <= 1: erf(a) = a * P(a^2)                (least-squares fit, relative error < 1.4e-9)
//   a >  1: erfc(a) = exp(-a^2) * Q(1 / a)     (fit on a in [1, 4.5], relative error < 3e-8; beyond 4.5
//                                               erfc(a) < 2e-10 and only contributes below float resolution)
// phi(x) = exp(-a^2) / sqrt(2 pi) reuses the same exponential (a^2 clamped at 87, where exp underflows).
// Float rounding of a^2 limits the relative accuracy of Phi in the far negative tail to ~1e-6 (absolute error
// < 1e-7 everywhere).
UXNET_LN_MLP_INLINE void normal_cdf_pdf(FloatLanes x, FloatLanes& cdf, FloatLanes& pdf) {
  const FloatLanes a = (FloatLanes)(bits_of(x) & 0x7fffffff) * 0.707106781186547524f;
  FloatLanes a2 = a * a;
  a2 = select(greater_mask(a2, 87.0f), broadcast(87.0f), a2);
  const FloatLanes e = exp_nonpositive(-a2);
  pdf = e * 0.398942280401432678f;

  FloatLanes p = broadcast(7.8982101233388e-05f);
  p = p * a2 - 0.0008024354100276965f;
  p = p * a2 + 0.0051900535740917325f;
  p = p * a2 - 0.026854808534817587f;
  p = p * a2 + 0.112836124281681f;
  p = p * a2 - 0.37612628843314233f;
  p = p * a2 + 1.1283791665100467f;
  const FloatLanes erf_small = a * p;

  const IntLanes large = greater_mask(a, 1.0f);
  const FloatLanes u = 1.0f / select(large, a, broadcast(1.0f));
  FloatLanes q = broadcast(0.036578786946252065f);
  q = q * u - 0.21295547999210912f;
  q = q * u + 0.5201406133675134f;
  q = q * u - 0.6518760934218639f;
  q = q * u + 0.3393967587537968f;
  q = q * u + 0.17273520223392352f;
  q = q * u - 0.3545523441846141f;
  q = q * u + 0.015622531002019768f;
  q = q * u + 0.5624084786764058f;
  q = q * u + 8.513175259495541e-05f;
  const FloatLanes half_erfc = 0.5f * select(large, e * q, 1.0f - erf_small);
  const IntLanes negative = bits_of(x) >> 31;  // all ones where the sign bit is set
  cdf = select(negative, half_erfc, 1.0f - half_erfc);
}

// float64 inputs take the exact libm path, lane by lane (the float64 kernels are the gradcheck path).
UXNET_LN_MLP_INLINE void normal_cdf_pdf(Lanes<double> x, Lanes<double>& cdf, Lanes<double>& pdf) {
  for (int64_t b = 0; b < kLanes; ++b) {
    cdf[b] = 0.5 * std::erfc(-x[b] * 0.70710678118654752440);
    pdf[b] = std::exp(-0.5 * x[b] * x[b]) * 0.39894228040143267794;
  }
}

// ---- tiles -------------------------------------------------------------------------------------------------

// Tile row c (kSub lane vectors from rows + c * kSub) = src(n, c, v0 + b) for b < count, 0 for padding lanes.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
UXNET_LN_MLP_INLINE void load_tile(const scalar_t* src, const VoxelTiling& t, const TileRef& tile,
                                   Lanes<acc_t>* rows) {
  acc_t* buf = reinterpret_cast<acc_t*>(rows);  // GCC vectors alias their element type
  const int64_t C = t.channels;
  if (kChannelsLast) {
    const scalar_t* base = src + (tile.n * t.voxels + tile.v0) * C;
    for (int64_t b = 0; b < tile.count; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        buf[c * kTile + b] = static_cast<acc_t>(base[b * C + c]);
      }
    }
  } else {
    const scalar_t* base = src + tile.n * C * t.voxels + tile.v0;
    if (tile.count == kTile) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t b = 0; b < kTile; ++b) {
          buf[c * kTile + b] = static_cast<acc_t>(base[c * t.voxels + b]);
        }
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < tile.count; ++b) {
        buf[c * kTile + b] = static_cast<acc_t>(base[c * t.voxels + b]);
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
UXNET_LN_MLP_INLINE void store_tile(const Lanes<acc_t>* rows, const VoxelTiling& t, const TileRef& tile,
                                    scalar_t* dst) {
  const acc_t* buf = reinterpret_cast<const acc_t*>(rows);
  const int64_t C = t.channels;
  if (kChannelsLast) {
    scalar_t* base = dst + (tile.n * t.voxels + tile.v0) * C;
    for (int64_t b = 0; b < tile.count; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        base[b * C + c] = static_cast<scalar_t>(buf[c * kTile + b]);
      }
    }
    return;
  }
  scalar_t* base = dst + tile.n * C * t.voxels + tile.v0;
  if (tile.count == kTile) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = 0; b < kTile; ++b) {
        base[c * t.voxels + b] = static_cast<scalar_t>(buf[c * kTile + b]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < tile.count; ++b) {
      base[c * t.voxels + b] = static_cast<scalar_t>(buf[c * kTile + b]);
    }
  }
}

// ---- lane vectors straight from tensor memory (LayerNorm: NCDHW rows, channels_last_3d voxels) --------------

using UintLanes = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using HalfWordLanes = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// kLanes elements at p as acc_t lanes (bfloat16: the bits shifted into the float's upper half).
template <typename acc_t, typename scalar_t>
UXNET_LN_MLP_INLINE Lanes<acc_t> load_lanes(const scalar_t* p) {
  Lanes<acc_t> v;
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    HalfWordLanes h;
    std::memcpy(&h, p, sizeof(h));
    v = (Lanes<acc_t>)(__builtin_convertvector(h, UintLanes) << 16);
  } else {
    static_assert(std::is_same<scalar_t, acc_t>::value, "float32 / float64 rows load in their own type");
    std::memcpy(&v, p, sizeof(v));
  }
  return v;
}

// Stores kLanes elements at p (bfloat16: round to nearest even, NaN stays NaN, as c10::BFloat16 rounds).
template <typename scalar_t, typename acc_t>
UXNET_LN_MLP_INLINE void store_lanes(scalar_t* p, Lanes<acc_t> v) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    const UintLanes u = (UintLanes)v;
    const UintLanes rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const UintLanes is_nan = (UintLanes)((u & 0x7fffffffu) > 0x7f800000u);
    const HalfWordLanes h = __builtin_convertvector((is_nan & 0x7fc0u) | (~is_nan & rounded), HalfWordLanes);
    std::memcpy(p, &h, sizeof(h));
  } else {
    std::memcpy(p, &v, sizeof(v));
  }
}

// Lane vector v of a row of `count` elements; lanes past the row's end read as 0.
template <typename acc_t, typename scalar_t>
UXNET_LN_MLP_INLINE Lanes<acc_t> row_lanes(const scalar_t* row, int64_t v, int64_t count) {
  const int64_t start = v * kLanes;
  if (start + kLanes <= count) {
    return load_lanes<acc_t>(row + start);
  }
  scalar_t tail[kLanes];
  for (int64_t b = 0; b < kLanes; ++b) {
    tail[b] = start + b < count ? row[start + b] : static_cast<scalar_t>(0.0f);
  }
  return load_lanes<acc_t>(tail);
}

// Runs body(v, whole) for the lane vectors v of a row of `count` elements; `whole` is std::true_type for the
// vectors inside the row (plain vector loads and stores) and std::false_type for the partial last one.
template <typename Body>
UXNET_LN_MLP_INLINE void for_each_lane_vector(int64_t count, Body body) {
  const int64_t whole = count / kLanes;
  for (int64_t v = 0; v < whole; ++v) {
    body(v, std::true_type{});
  }
  if (whole * kLanes < count) {
    body(whole, std::false_type{});
  }
}

template <typename acc_t, typename scalar_t, typename Whole>
UXNET_LN_MLP_INLINE Lanes<acc_t> lanes_at(const scalar_t* row, int64_t v, int64_t count, Whole) {
  if constexpr (Whole::value) {
    return load_lanes<acc_t>(row + v * kLanes);
  } else {
    return row_lanes<acc_t>(row, v, count);
  }
}

// Writes lane vector v of a row of `count` elements (lanes past the row's end are dropped).
template <typename scalar_t, typename acc_t>
UXNET_LN_MLP_INLINE void store_row_lanes(scalar_t* row, int64_t v, int64_t count, Lanes<acc_t> value) {
  const int64_t start = v * kLanes;
  if (start + kLanes <= count) {
    store_lanes<scalar_t, acc_t>(row + start, value);
    return;
  }
  scalar_t tail[kLanes];
  store_lanes<scalar_t, acc_t>(tail, value);
  for (int64_t b = 0; start + b < count; ++b) {
    row[start + b] = tail[b];
  }
}

template <typename scalar_t, typename acc_t, typename Whole>
UXNET_LN_MLP_INLINE void store_lanes_at(scalar_t* row, int64_t v, int64_t count, Whole, Lanes<acc_t> value) {
  if constexpr (Whole::value) {
    store_lanes<scalar_t, acc_t>(row + v * kLanes, value);
  } else {
    store_row_lanes<scalar_t, acc_t>(row, v, count, value);
  }
}

// 1 / sqrt(v), lane by lane.
template <typename V>
UXNET_LN_MLP_INLINE V lane_rsqrt(V v) {
  for (int64_t b = 0; b < kLanes; ++b) {
    v[b] = 1 / std::sqrt(v[b]);
  }
  return v;
}

// Per-voxel mean and 1/sqrt(biased variance + eps) over the C rows of a tile (two passes, acc_t precision).
template <typename acc_t>
UXNET_LN_MLP_INLINE void tile_stats(const Lanes<acc_t>* rows, int64_t C, acc_t eps, Lanes<acc_t>* mean,
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
      sq += d * d;
    }
    rstd[s] = lane_rsqrt(sq / static_cast<acc_t>(C) + eps);
  }
}

template <typename acc_t>
UXNET_LN_MLP_INLINE void store_stats(const Lanes<acc_t>* mean, const Lanes<acc_t>* rstd, const VoxelTiling& t,
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
UXNET_LN_MLP_INLINE void load_stats(const acc_t* mean_in, const acc_t* rstd_in, const VoxelTiling& t,
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
UXNET_LN_MLP_INLINE void flush_lanes(Lanes<acc_t>* lanes, int64_t rows, int64_t C, double* partial) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t row = 0; row < rows; ++row) {
      Lanes<acc_t>* lane = lanes + (c * rows + row) * kSub;
      double sum = 0.0;
      for (int64_t s = 0; s < kSub; ++s) {
        for (int64_t b = 0; b < kLanes; ++b) {
          sum += static_cast<double>(lane[s][b]);
        }
        lane[s] = Lanes<acc_t>{};
      }
      partial[row * C + c] += sum;
    }
  }
}

#undef UXNET_LN_MLP_LANES
