// The Winograd F(2x2x2, 3x3x3) transforms (forward, with float32 / float64 or bf16-pair products, and weight
// gradient), the register block of their matrix products, and the direct fallback of the 3x3x3 convolution, written
// once over the SIMD layer and compiled once per ISA variant (params.h describes the data).
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per variant, inside that
// variant's namespace, after simd/vec.h. Only raw pointers, int64 offsets and Vec operations here.
//
// A Vec holds kLanes<T> consecutive channels of one point; the last vector of a channel row is partial.
// One-dimensional F(2, 3) matrices, applied along w, then h, then d:
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]

namespace conv3d_3x3x3_kernels {

using ::uxnet::cpu::conv3d_3x3x3::Block;
using ::uxnet::cpu::conv3d_3x3x3::FilterView;
using ::uxnet::cpu::conv3d_3x3x3::Geometry;
using ::uxnet::cpu::conv3d_3x3x3::KernelTable;
using ::uxnet::cpu::conv3d_3x3x3::kPoints;
using ::uxnet::cpu::conv3d_3x3x3::kTaps;
using ::uxnet::cpu::conv3d_3x3x3::PairBlock;
using ::uxnet::cpu::conv3d_3x3x3::PairKernelTable;
using ::uxnet::cpu::conv3d_3x3x3::Strides;

// The first n lanes from p (Mem: the lanes' type, or bf16 for float lanes), the others 0.
template <typename V, typename Mem>
UXNET_SIMD_INLINE V load_lanes(const Mem* p, int64_t n) {
  return n == kLanesOf<V> ? load<V>(p) : load_partial<V>(p, n);
}

template <typename V, typename Mem>
UXNET_SIMD_INLINE void store_lanes(Mem* p, V v, int64_t n) {
  if (n == kLanesOf<V>) {
    store(p, v);
  } else {
    store_partial(p, v, n);
  }
}

// B^T applied to the four values a[0], a[s], a[2s], a[3s] in place.
template <typename V>
UXNET_SIMD_INLINE void input_1d(V* a, int s) {
  const V x0 = a[0], x1 = a[s], x2 = a[2 * s], x3 = a[3 * s];
  a[0] = x0 - x2;
  a[s] = x1 + x2;
  a[2 * s] = x2 - x1;
  a[3 * s] = x1 - x3;
}

// G applied to three filter values, giving four.
template <typename V>
UXNET_SIMD_INLINE void weight_1d(V w0, V w1, V w2, V* out, int s) {
  const V half = broadcast<V>(Scalar<V>(0.5));
  const V outer = w0 + w2;
  out[0] = w0;
  out[s] = (outer + w1) * half;
  out[2 * s] = (outer - w1) * half;
  out[3 * s] = w2;
}

// A^T applied to a[0], a[s], a[2s], a[3s]: the two results in a[0] and a[s].
template <typename V>
UXNET_SIMD_INLINE void output_1d(V* a, int s) {
  const V m0 = a[0], m1 = a[s], m2 = a[2 * s], m3 = a[3 * s];
  a[0] = m0 + m1 + m2;
  a[s] = m1 - m2 - m3;
}

// A applied to the two values a[0], a[s] (the adjoint of output_1d), giving four in a[0], a[s], a[2s], a[3s].
template <typename V>
UXNET_SIMD_INLINE void grad_output_1d(V* a, int s) {
  const V y0 = a[0], y1 = a[s];
  a[0] = y0;
  a[s] = y0 + y1;
  a[2 * s] = y0 - y1;
  a[3 * s] = zero<V>() - y1;
}

// G^T applied to four transformed-tap gradients (the adjoint of weight_1d), giving three.
template <typename V>
UXNET_SIMD_INLINE void weight_grad_1d(V d0, V d1, V d2, V d3, V* out, int s) {
  const V half = broadcast<V>(Scalar<V>(0.5));
  const V inner = (d1 + d2) * half;
  out[0] = d0 + inner;
  out[s] = (d1 - d2) * half;
  out[2 * s] = d3 + inner;
}

// The micro-kernel's register block: kRows tiles x kPanelVectors vectors of output channels, accumulated over C_in
// (6 x 4 = 24 accumulators + 4 u vectors + 1 broadcast of 32 registers; 6 x 2 + 2 + 1 of 16).
constexpr int kRows = 6;
constexpr int kPanelVectors = kVectorRegisters >= 32 ? 4 : 2;
template <typename T>
constexpr int64_t kCols = kPanelVectors * kLanes<T>;

// pts[p] = (G w G^T)[p] of one input channel's 27 taps (kd, kh, kw order), a vector of output channels each.
template <typename V>
UXNET_SIMD_INLINE void points_of_taps(const V* taps, V* pts) {
  V along_w[3][3][4], along_h[3][4][4];
  for (int d = 0; d < 3; ++d)
    for (int h = 0; h < 3; ++h)
      weight_1d(taps[(d * 3 + h) * 3], taps[(d * 3 + h) * 3 + 1], taps[(d * 3 + h) * 3 + 2], along_w[d][h], 1);
  for (int d = 0; d < 3; ++d)
    for (int k = 0; k < 4; ++k) weight_1d(along_w[d][0][k], along_w[d][1][k], along_w[d][2][k], &along_h[d][0][k], 4);
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < 4; ++k) weight_1d(along_h[0][j][k], along_h[1][j][k], along_h[2][j][k], &pts[j * 4 + k], 16);
}

// pts[p] for the filter rows wc[tap][co] of one input channel (C_out per tap) and the output channels [co, co + L):
// lanes past C_out are 0.
template <typename T>
UXNET_SIMD_INLINE void weight_points(const Geometry& g, const T* wc, int64_t co, Vec<T>* pts) {
  using V = Vec<T>;
  const int64_t n = std::clamp<int64_t>(g.Cout - co, 0, kLanes<T>);
  V taps[kTaps];
  for (int64_t t = 0; t < kTaps; ++t) taps[t] = n > 0 ? load_lanes<V>(wc + t * g.Cout + co, n) : zero<V>();
  points_of_taps(taps, pts);
}

// pts[p] for input channel ci of a filter in the weight's own memory and the output channels [co, co + L) (lanes
// past C_out 0): each (ci, co) holds its 27 taps in a row, so they are gathered into vectors first.
template <typename T>
UXNET_SIMD_INLINE void filter_points(const Geometry& g, const FilterView<const T>& f, int64_t ci, int64_t co,
                                     Vec<T>* pts) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t n = std::clamp<int64_t>(g.Cout - co, 0, L);
  alignas(64) T gathered[kTaps * L];
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t t = 0; t < kTaps; ++t) gathered[t * L + c] = f.w[f.at(ci, co + c, t)];
  }
  V taps[kTaps];
  for (int64_t t = 0; t < kTaps; ++t) taps[t] = n > 0 ? load_lanes<V>(gathered + t * L, n) : zero<V>();
  points_of_taps(taps, pts);
}

// u[p * point_stride + (ci - ci_begin) * kCols + c] = (G w G^T)[p] for the input channels [ci_begin, ci_end) and the
// output channels panel * kCols + c of one column panel (0 past C_out).
template <typename T>
void transform_weight_panel(const Geometry& g, const FilterView<const T>& w, int64_t panel, int64_t ci_begin,
                            int64_t ci_end, T* u, int64_t point_stride) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t ci = ci_begin; ci < ci_end; ++ci) {
    for (int64_t c = 0; c < kCols<T>; c += L) {
      Vec<T> pts[kPoints];
      filter_points(g, w, ci, panel * kCols<T> + c, pts);
      T* dst = u + (ci - ci_begin) * kCols<T> + c;
      for (int64_t p = 0; p < kPoints; ++p) store(dst + p * point_stride, pts[p]);
    }
  }
}

template <typename T>
void transform_weight(const Geometry& g, const FilterView<const T>& w, T* u, int64_t ci_begin, int64_t ci_end) {
  for (int64_t panel = 0; panel < g.panels(); ++panel) {
    transform_weight_panel(g, w, panel, ci_begin, ci_end, u + (panel * g.Cin + ci_begin) * kCols<T>,
                           g.Cin * g.cout_padded());
  }
}

// The bf16-pair layout of transform_weight: u[p][panel][k][cols] holds the pair of input channels 2k, 2k + 1.
void transform_weight_pairs(const Geometry& g, const float* w, uint32_t* u, int64_t pair_begin, int64_t pair_end) {
  constexpr int64_t L = kLanes<float>;
  const int64_t pairs = g.cin_row / 2, point_stride = pairs * g.cout_padded();
  for (int64_t k = pair_begin; k < pair_end; ++k) {
    for (int64_t co = 0; co < g.cout_padded(); co += L) {
      Vec<float> even[kPoints], odd[kPoints];
      weight_points(g, w + 2 * k * kTaps * g.Cout, co, even);
      if (2 * k + 1 < g.Cin) {
        weight_points(g, w + (2 * k + 1) * kTaps * g.Cout, co, odd);
      } else {
        for (int64_t p = 0; p < kPoints; ++p) odd[p] = zero<Vec<float>>();
      }
      uint32_t* dst = u + (co / kCols<float>) * pairs * kCols<float> + k * kCols<float> + co % kCols<float>;
      for (int64_t p = 0; p < kPoints; ++p) store(dst + p * point_stride, bf16_pairs(even[p], odd[p]));
    }
  }
}

// Tile index -> (n, first output d, h, w).
struct TileOrigin {
  int64_t n, d, h, w;
};

inline TileOrigin tile_origin(const Geometry& g, int64_t tile) {
  const int64_t tw = tile % g.TW;
  int64_t rest = tile / g.TW;
  const int64_t th = rest % g.TH;
  rest /= g.TH;
  const int64_t td = rest % g.TD;
  return TileOrigin{rest / g.TD, 2 * td, 2 * th, 2 * tw};
}

// x of storage type S (T, or bf16 for float), v rows of VT (T, or bf16: rounded once, the padding channel 0).
template <typename T, typename S, typename VT>
void transform_input(const Geometry& g, const S* x, Strides xs, const Block<T, VT>& block, int64_t begin,
                     int64_t end, uint8_t* nonfinite) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t t = begin; t < end; ++t) {
    const TileOrigin o = tile_origin(g, block.first + t);
    // The window starts one voxel before the output tile (padding 1).
    bool inside[3][4];
    for (int i = 0; i < 4; ++i) {
      inside[0][i] = o.d - 1 + i >= 0 && o.d - 1 + i < g.D;
      inside[1][i] = o.h - 1 + i >= 0 && o.h - 1 + i < g.H;
      inside[2][i] = o.w - 1 + i >= 0 && o.w - 1 + i < g.W;
    }
    const S* base = x + o.n * xs.n + (o.d - 1) * xs.d + (o.h - 1) * xs.h + (o.w - 1) * xs.w;
    // The next tile along W reads two new columns of the window: fetch them while this tile is transformed.
    if (o.w + 2 < g.W) {  // (a prefetch never faults: columns past the volume need no clipping)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          if (!(inside[0][i] && inside[1][j])) continue;
          const char* next = reinterpret_cast<const char*>(base + i * xs.d + j * xs.h + 4 * xs.w);
          for (int64_t byte = 0; byte < g.Cin * static_cast<int64_t>(sizeof(S)); byte += 64) {
            __builtin_prefetch(next + byte, 0, 3);
            __builtin_prefetch(next + byte + xs.w * static_cast<int64_t>(sizeof(S)), 0, 3);
          }
        }
    }
    V poison = zero<V>();
    for (int64_t c = 0; c < g.Cin; c += L) {
      const int64_t n = std::min<int64_t>(L, g.Cin - c);
      V a[kPoints];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          V* row = a + (i * 4 + j) * 4;
          for (int k = 0; k < 4; ++k) {
            row[k] = inside[0][i] && inside[1][j] && inside[2][k]
                         ? load_lanes<V>(base + i * xs.d + j * xs.h + k * xs.w + c, n)
                         : zero<V>();
          }
          input_1d(row, 1);
        }
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 4; ++k) input_1d(a + i * 16 + k, 4);
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 4; ++k) input_1d(a + j * 4 + k, 16);
      VT* dst = block.v + t * block.v_tile + c;
      const int64_t stored = std::min<int64_t>(L, g.cin_row - c);  // with the padding channel of bf16 pairs
      for (int64_t p = 0; p < kPoints; ++p) {
        poison = poison + a[p] * zero<V>();  // NaN in a lane once any transformed value is NaN or infinite
        store_lanes(dst + p * block.v_point, a[p], stored);
      }
    }
    const T probe = hsum(poison);
    nonfinite[t] = probe == probe ? 0 : 1;
  }
}

// The two kinds of products of rank1_block, over rows of In: float32 / float64 fma (the forward and the weight
// gradient), and bf16 pairs (two input channels per 32-bit element, dot_bf16, accumulated in float32; the forward).
template <typename T>
struct FmaProducts {
  using In = T;
  using Acc = Vec<T>;
  using B = Vec<T>;
  static constexpr int64_t kPerIn = 1;  // input channels per element of In
  static UXNET_SIMD_INLINE B load_b(const In* p) { return load<B>(p); }
  static UXNET_SIMD_INLINE B broadcast_a(In a) { return broadcast<B>(a); }
  static UXNET_SIMD_INLINE Acc step(Acc acc, B a, B b) { return fma(a, b, acc); }
};

struct Bf16PairProducts {
  using In = uint32_t;
  using Acc = Vec<float>;
  using B = Bits32<Acc>;
  static constexpr int64_t kPerIn = 2;
  static UXNET_SIMD_INLINE B load_b(const In* p) { return load<B>(p); }
  static UXNET_SIMD_INLINE B broadcast_a(In a) { return broadcast<B>(a); }
  static UXNET_SIMD_BF16_TARGET UXNET_SIMD_INLINE Acc step(Acc acc, B a, B b) { return dot_bf16(acc, a, b); }
};

// The register block of both matrix products (the forward's m = v u and the weight gradient's du += v^T m):
// c[r][0 .. NV vectors) (+)= sum over k, in order, of a[r * a_row + k * a_k] * b[k * b_k + 0 .. NV vectors), for R
// rows, one Ops::step per term; kAccumulate: c starts from its stored values, else from 0.
// (UXNET_SIMD_BF16_TARGET: the pair products' vdpbf16ps; it adds nothing the float kernels use.)
template <typename Ops, int R, int NV, bool kAccumulate>
UXNET_SIMD_BF16_TARGET UXNET_SIMD_INLINE void rank1_block(int64_t depth, const typename Ops::In* a, int64_t a_row,
                                                          int64_t a_k, const typename Ops::In* b, int64_t b_k,
                                                          Scalar<typename Ops::Acc>* c, int64_t c_row) {
  using Acc = typename Ops::Acc;
  using B = typename Ops::B;
  constexpr int64_t L = kLanesOf<Acc>;
  Acc acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = kAccumulate ? load<Acc>(c + r * c_row + j * L) : zero<Acc>();
  for (int64_t k = 0; k < depth; ++k, a += a_k, b += b_k) {
    B bk[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bk[j] = Ops::load_b(b + j * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const B ar = Ops::broadcast_a(a[r * a_row]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = Ops::step(acc[r][j], ar, bk[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store(c + r * c_row + j * L, acc[r][j]);
}

// rank1_block over `rows` rows of a and c, kRows at a time (a's rows a_row apart, c's c_row apart), for one panel of
// NV vectors.
template <typename Ops, int NV, bool kAccumulate>
UXNET_SIMD_BF16_TARGET void rank1_panel(int64_t rows, int64_t depth, const typename Ops::In* a, int64_t a_row,
                                        int64_t a_k, const typename Ops::In* b, int64_t b_k,
                                        Scalar<typename Ops::Acc>* c, int64_t c_row) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    rank1_block<Ops, kRows, NV, kAccumulate>(depth, a + r * a_row, a_row, a_k, b, b_k, c + r * c_row, c_row);
  }
  a += r * a_row;
  c += r * c_row;
  switch (rows - r) {  // the last rows
    case 5: return rank1_block<Ops, 5, NV, kAccumulate>(depth, a, a_row, a_k, b, b_k, c, c_row);
    case 4: return rank1_block<Ops, 4, NV, kAccumulate>(depth, a, a_row, a_k, b, b_k, c, c_row);
    case 3: return rank1_block<Ops, 3, NV, kAccumulate>(depth, a, a_row, a_k, b, b_k, c, c_row);
    case 2: return rank1_block<Ops, 2, NV, kAccumulate>(depth, a, a_row, a_k, b, b_k, c, c_row);
    case 1: return rank1_block<Ops, 1, NV, kAccumulate>(depth, a, a_row, a_k, b, b_k, c, c_row);
    default: return;
  }
}

// rank1_panel for the vectors of one column panel that hold output channels (the last panel of a C_out that is not
// a multiple of kCols skips its zero columns).
template <typename Ops, bool kAccumulate>
UXNET_SIMD_BF16_TARGET void rank1_columns(const Geometry& g, int64_t panel, int64_t rows, int64_t depth,
                                          const typename Ops::In* a, int64_t a_row, int64_t a_k,
                                          const typename Ops::In* b, int64_t b_k, Scalar<typename Ops::Acc>* c,
                                          int64_t c_row) {
  static_assert(kRows == 6 && kPanelVectors <= 4, "rank1_panel's row tails and the NV switch below");
  constexpr int64_t L = kLanesOf<typename Ops::Acc>;
  const int64_t vectors = std::min<int64_t>(kPanelVectors, (g.Cout - panel * kPanelVectors * L + L - 1) / L);
  switch (vectors) {
    case 1: return rank1_panel<Ops, 1, kAccumulate>(rows, depth, a, a_row, a_k, b, b_k, c, c_row);
    case 2: return rank1_panel<Ops, 2, kAccumulate>(rows, depth, a, a_row, a_k, b, b_k, c, c_row);
    case 3:
      return rank1_panel<Ops, kPanelVectors >= 3 ? 3 : 1, kAccumulate>(rows, depth, a, a_row, a_k, b, b_k, c, c_row);
    default: return rank1_panel<Ops, kPanelVectors, kAccumulate>(rows, depth, a, a_row, a_k, b, b_k, c, c_row);
  }
}

// block.m[p] = block.v[p] u[p] for the points [p_begin, p_end); u: the packed weight in Ops::In elements.
template <typename Ops, typename T, typename VT>
UXNET_SIMD_BF16_TARGET void multiply(const Geometry& g, const Block<T, VT>& block, const typename Ops::In* u,
                                     int64_t p_begin, int64_t p_end) {
  using In = typename Ops::In;
  const int64_t depth = g.cin_row / Ops::kPerIn;
  const In* v_rows = reinterpret_cast<const In*>(block.v);  // (v strides are in VT elements, Ops::kPerIn per In)
  for (int64_t p = p_begin; p < p_end; ++p) {
    for (int64_t panel = 0; panel < g.panels(); ++panel) {
      const In* up = u + (p * g.panels() + panel) * depth * kCols<T>;
      rank1_columns<Ops, false>(g, panel, block.count, depth, v_rows + p * block.v_point / Ops::kPerIn,
                                block.v_tile / Ops::kPerIn, 1, up, kCols<T>,
                                block.m + p * block.m_point + panel * kCols<T>, block.m_tile);
    }
  }
}

// The products of one column panel over the input channels [ci_begin, ci_end), for a filter transformed a slice at a
// time (transform_weight_panel's layout, u[p] point_stride apart): block.m[p][panel's columns] = (ci_begin > 0: +=)
// block.v[p][ci_begin, ci_end) u[p], for the points [p_begin, p_end). Slices taken in order of ci give the bits of
// multiply (one accumulation, stored and reloaded between slices).
template <typename T>
void multiply_panel(const Geometry& g, const Block<T>& block, const T* u, int64_t point_stride, int64_t panel,
                    int64_t ci_begin, int64_t ci_end, int64_t p_begin, int64_t p_end) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    const T* a = block.v + p * block.v_point + ci_begin;
    T* c = block.m + p * block.m_point + panel * kCols<T>;
    if (ci_begin == 0) {
      rank1_columns<FmaProducts<T>, false>(g, panel, block.count, ci_end - ci_begin, a, block.v_tile, 1,
                                           u + p * point_stride, kCols<T>, c, block.m_tile);
    } else {
      rank1_columns<FmaProducts<T>, true>(g, panel, block.count, ci_end - ci_begin, a, block.v_tile, 1,
                                          u + p * point_stride, kCols<T>, c, block.m_tile);
    }
  }
}

// out of storage type S (T, or bf16 for float: rounded once).
template <typename T, typename VT, typename S>
void transform_output(const Geometry& g, const Block<T, VT>& block, const T* bias, int64_t begin, int64_t end, S* out,
                      Strides os) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t t = begin; t < end; ++t) {
    const TileOrigin o = tile_origin(g, block.first + t);
    const int nd = std::min<int64_t>(2, g.D - o.d), nh = std::min<int64_t>(2, g.H - o.h);
    const int nw = std::min<int64_t>(2, g.W - o.w);
    S* base = out + o.n * os.n + o.d * os.d + o.h * os.h + o.w * os.w;
    const T* src = block.m + t * block.m_tile;
    for (int64_t c = 0; c < g.Cout; c += L) {
      const int64_t n = std::min<int64_t>(L, g.Cout - c);
      V a[kPoints];
      for (int64_t p = 0; p < kPoints; ++p) a[p] = load_lanes<V>(src + p * block.m_point + c, n);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) output_1d(a + (i * 4 + j) * 4, 1);
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 2; ++k) output_1d(a + i * 16 + k, 4);
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 2; ++k) output_1d(a + j * 4 + k, 16);
      const V b = bias ? load_lanes<V>(bias + c, n) : zero<V>();
      for (int i = 0; i < nd; ++i)
        for (int j = 0; j < nh; ++j)
          for (int k = 0; k < nw; ++k) {
            store_lanes(base + i * os.d + j * os.h + k * os.w + c, a[(i * 4 + j) * 4 + k] + b, n);
          }
    }
  }
}

// The weight gradient. block.m[t][p][co] = (A dy A^T)[p] of tile first + t's output gradient (zero outside the
// volume and in the padding columns past C_out); nonfinite[t] as for transform_input.
template <typename T>
void transform_grad_output(const Geometry& g, const T* dy, Strides ys, const Block<T>& block, int64_t begin,
                           int64_t end, uint8_t* nonfinite) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t cout = g.cout_padded();
  for (int64_t t = begin; t < end; ++t) {
    const TileOrigin o = tile_origin(g, block.first + t);
    const int nd = std::min<int64_t>(2, g.D - o.d), nh = std::min<int64_t>(2, g.H - o.h);
    const int nw = std::min<int64_t>(2, g.W - o.w);
    const T* base = dy + o.n * ys.n + o.d * ys.d + o.h * ys.h + o.w * ys.w;
    T* dst = block.m + t * block.m_tile;
    V poison = zero<V>();
    for (int64_t c = 0; c < cout; c += L) {
      const int64_t n = std::clamp<int64_t>(g.Cout - c, 0, L);
      V a[kPoints];
      for (int64_t p = 0; p < kPoints; ++p) a[p] = zero<V>();
      if (n > 0) {
        for (int i = 0; i < nd; ++i)
          for (int j = 0; j < nh; ++j)
            for (int k = 0; k < nw; ++k) {
              a[(i * 4 + j) * 4 + k] = load_lanes<V>(base + i * ys.d + j * ys.h + k * ys.w + c, n);
            }
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) grad_output_1d(a + (i * 4 + j) * 4, 1);
      for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 4; ++k) grad_output_1d(a + i * 16 + k, 4);
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 4; ++k) grad_output_1d(a + j * 4 + k, 16);
      for (int64_t p = 0; p < kPoints; ++p) {
        poison = poison + a[p] * zero<V>();
        store(dst + p * block.m_point + c, a[p]);
      }
    }
    const T probe = hsum(poison);
    nonfinite[t] = probe == probe ? 0 : 1;
  }
}

// du[p] (C_in x cout_padded, row-major) += v[p]^T m[p] over the block's tiles, for the points [p_begin, p_end):
// rows are input channels, the sum runs over tiles. One thread owns a point for the whole call, and tiles are summed
// in order: bitwise the same for any thread count.
template <typename T>
void multiply_grad(const Geometry& g, const Block<T>& block, T* du, int64_t p_begin, int64_t p_end) {
  const int64_t cout = g.cout_padded();
  for (int64_t p = p_begin; p < p_end; ++p) {
    for (int64_t panel = 0; panel < g.panels(); ++panel) {
      rank1_columns<FmaProducts<T>, true>(g, panel, g.Cin, block.count, block.v + p * block.v_point, 1,
                                          block.v_tile, block.m + p * block.m_point + panel * kCols<T>,
                                          block.m_tile, du + p * g.Cin * cout + panel * kCols<T>, cout);
    }
  }
}

// taps[tap] = (G^T du G)[tap] of the transformed-tap gradients du[p * point_stride] (kLanes output channels).
template <typename T>
UXNET_SIMD_INLINE void weight_grad_taps(const T* du, int64_t point_stride, Vec<T>* taps) {
  using V = Vec<T>;
  V pts[kPoints], along_d[3][4][4], along_h[3][3][4];
  for (int64_t p = 0; p < kPoints; ++p) pts[p] = load<V>(du + p * point_stride);
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      weight_grad_1d(pts[j * 4 + k], pts[16 + j * 4 + k], pts[32 + j * 4 + k], pts[48 + j * 4 + k],
                     &along_d[0][j][k], 16);
  for (int d = 0; d < 3; ++d)
    for (int k = 0; k < 4; ++k)
      weight_grad_1d(along_d[d][0][k], along_d[d][1][k], along_d[d][2][k], along_d[d][3][k], &along_h[d][0][k], 4);
  for (int d = 0; d < 3; ++d)
    for (int h = 0; h < 3; ++h)
      weight_grad_1d(along_h[d][h][0], along_h[d][h][1], along_h[d][h][2], along_h[d][h][3], &taps[(d * 3 + h) * 3],
                     1);
}

// dw(ci, tap, co) for the output channels [co, co + n) = taps[tap] (scattered to each (ci, co)'s row of 27 taps).
template <typename T>
UXNET_SIMD_INLINE void store_filter_taps(const Vec<T>* taps, const FilterView<T>& dw, int64_t ci, int64_t co,
                                         int64_t n) {
  constexpr int64_t L = kLanes<T>;
  alignas(64) T gathered[kTaps * L];
  for (int64_t t = 0; t < kTaps; ++t) store(gathered + t * L, taps[t]);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t t = 0; t < kTaps; ++t) dw.w[dw.at(ci, co + c, t)] = gathered[t * L + c];
  }
}

// dw(ci, tap, co) = (G^T du G)[tap] of du[p][ci][co] (taps in kd, kh, kw order), for ci in [ci_begin, ci_end).
template <typename T>
void transform_weight_grad(const Geometry& g, const T* du, const FilterView<T>& dw, int64_t ci_begin,
                           int64_t ci_end) {
  constexpr int64_t L = kLanes<T>;
  const int64_t cout = g.cout_padded();
  for (int64_t ci = ci_begin; ci < ci_end; ++ci) {
    for (int64_t co = 0; co < g.Cout; co += L) {
      Vec<T> taps[kTaps];
      weight_grad_taps(du + ci * cout + co, g.Cin * cout, taps);
      store_filter_taps(taps, dw, ci, co, std::min<int64_t>(L, g.Cout - co));
    }
  }
}

// The weight gradient of one column panel and the input channels [ci_begin, ci_end), with the block holding every
// tile: du[p][ci - ci_begin][c] = sum over the tiles, in order, of v[t][p][ci] m[t][p][panel * kCols + c] into
// `du` (scratch of kPoints * (ci_end - ci_begin) * kCols values), then dw(ci, tap, co) = (G^T du G)[tap] for the
// panel's output channels. The same bits as multiply_grad + transform_weight_grad.
template <typename T>
void weight_grad_panel(const Geometry& g, const Block<T>& block, int64_t panel, int64_t ci_begin, int64_t ci_end,
                       T* du, const FilterView<T>& dw) {
  constexpr int64_t L = kLanes<T>;
  const int64_t rows = ci_end - ci_begin, point_stride = rows * kCols<T>;
  for (int64_t p = 0; p < kPoints; ++p) {
    rank1_columns<FmaProducts<T>, false>(g, panel, rows, block.count, block.v + p * block.v_point + ci_begin, 1,
                                         block.v_tile, block.m + p * block.m_point + panel * kCols<T>, block.m_tile,
                                         du + p * point_stride, kCols<T>);
  }
  for (int64_t ci = ci_begin; ci < ci_end; ++ci) {
    for (int64_t c = 0; c < kCols<T> && panel * kCols<T> + c < g.Cout; c += L) {
      const int64_t co = panel * kCols<T> + c;
      Vec<T> taps[kTaps];
      weight_grad_taps(du + (ci - ci_begin) * kCols<T> + c, point_stride, taps);
      store_filter_taps(taps, dw, ci, co, std::min<int64_t>(L, g.Cout - co));
    }
  }
}

template <typename T>
void direct_tile(const Geometry& g, const T* x, Strides xs, const T* w_direct, const T* bias, bool multiply_padding,
                 int64_t tile, T* out, Strides os) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const TileOrigin o = tile_origin(g, tile);
  for (int64_t d = o.d; d < std::min<int64_t>(o.d + 2, g.D); ++d)
    for (int64_t h = o.h; h < std::min<int64_t>(o.h + 2, g.H); ++h)
      for (int64_t w = o.w; w < std::min<int64_t>(o.w + 2, g.W); ++w) {
        for (int64_t co = 0; co < g.Cout; co += L) {
          const int64_t n = std::min<int64_t>(L, g.Cout - co);
          V acc = bias ? load_lanes<V>(bias + co, n) : zero<V>();
          for (int64_t tap = 0; tap < kTaps; ++tap) {
            const int64_t sd = d + tap / 9 - 1, sh = h + (tap / 3) % 3 - 1, sw = w + tap % 3 - 1;
            const bool inside = sd >= 0 && sd < g.D && sh >= 0 && sh < g.H && sw >= 0 && sw < g.W;
            if (!inside && !multiply_padding) continue;
            const T* src = x + o.n * xs.n + sd * xs.d + sh * xs.h + sw * xs.w;
            const T* wt = w_direct + tap * g.Cin * g.Cout + co;
            for (int64_t ci = 0; ci < g.Cin; ++ci) {
              const V xv = broadcast<V>(inside ? src[ci] : T(0));
              acc = fma(xv, load_lanes<V>(wt + ci * g.Cout, n), acc);
            }
          }
          store_lanes(out + o.n * os.n + d * os.d + h * os.h + w * os.w + co, acc, n);
        }
      }
}

template <typename T>
const KernelTable<T>& table() {
  static const KernelTable<T> kernels{::uxnet::cpu::simd::isa_name(kIsa),
                                      kLanes<T>,
                                      kCols<T>,
                                      &transform_weight<T>,
                                      &transform_weight_panel<T>,
                                      &transform_input<T, T, T>,
                                      &multiply<FmaProducts<T>, T, T>,
                                      &multiply_panel<T>,
                                      &transform_output<T, T, T>,
                                      &direct_tile<T>,
                                      &transform_grad_output<T>,
                                      &multiply_grad<T>,
                                      &transform_weight_grad<T>,
                                      &weight_grad_panel<T>};
  return kernels;
}

inline const PairKernelTable* pair_table() {
  static const PairKernelTable kernels{::uxnet::cpu::simd::isa_name(kIsa),
                                       kCols<float>,
                                       &transform_weight_pairs,
                                       &transform_input<float, ::uxnet::cpu::simd::bf16, ::uxnet::cpu::simd::bf16>,
                                       &multiply<Bf16PairProducts, float, ::uxnet::cpu::simd::bf16>,
                                       &transform_output<float, ::uxnet::cpu::simd::bf16, ::uxnet::cpu::simd::bf16>};
  return &kernels;
}

}  // namespace conv3d_3x3x3_kernels
