// The depthwise 3D convolution kernels, written once over the SIMD layer and compiled once per ISA variant.
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per variant, inside that
// variant's namespace, after simd/vec.h. Only raw pointers, int64 offsets and Vec operations here.
//
// A Vec holds kLanes<T> channels of one voxel (blocked or in place: params.h). Register blocks: kOutBlock outputs
// along W (convolution) and kTapBlock kw taps (weight gradient) are kept in registers, plus the weight (or grad)
// vector: 16 + 1 of 32 registers for avx512 and its emulation, 12 + 1 of 16 otherwise; with 32 registers a 7-wide
// kernel also keeps its row of 7 weights (conv_block<T, WB, 7, Cols>: 16 + 7 + 1).

namespace dwconv3d_kernels {

using ::uxnet::cpu::dwconv3d::Geometry;
using ::uxnet::cpu::dwconv3d::KernelTable;
using ::uxnet::cpu::dwconv3d::PlaneLayout;

constexpr int kOutBlock = kVectorRegisters >= 32 ? 16 : 12;
constexpr int kTapBlock = kVectorRegisters >= 32 ? 16 : 12;

// Prefetches the `elems` contiguous values of the input row the step after (kd, kh) of conv_block reads.
template <typename T>
inline void prefetch_next_row(const Geometry& g, const T* const* in_planes, PlaneLayout layout, int64_t h, int64_t kd,
                              int64_t kh, int64_t kh0, int64_t kh1, int64_t row_off, int64_t col0, int64_t elems) {
  const T* next = nullptr;
  if (kh + 1 < kh1) {
    next = in_planes[kd] + (row_off + layout.row_stride);
  } else {
    for (int64_t nd = kd + 1; nd < g.KD && next == nullptr; ++nd) {
      if (in_planes[nd] != nullptr) next = in_planes[nd] + ((h + kh0 - g.pad_h()) * layout.row_stride + col0);
    }
  }
  if (next == nullptr) return;
  const char* bytes = reinterpret_cast<const char*>(next);
  for (int64_t b = 0; b < elems * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 0, 3);
}

// `WB` consecutive outputs along W (starting at w0) of output row h, all lanes of one channel block, stored
// out_stride apart. With the kernel width known at compile time (FixedKW > 0) the row's KW weight vectors stay in
// registers and each input vector of the row is loaded once and multiplied into every output it reaches
// (WB + KW - 1 loads for WB * KW FMAs, against WB + 1 per kw otherwise, where the loads bound the loop; needs
// WB + KW + 1 vector registers). Each output sums its taps in the same order (kw ascending) either way, so the bits
// are the same. `Cols` says where the row's input columns lie (params.h): in a blocked plane, `lanes` apart with zero
// columns past the W borders (a compile-time stride), or in place, voxel_stride apart, where a block that reaches
// past a W border (kInPlaceEdge) skips the taps on the columns outside the volume. A blocked plane adds their products
// with its zero columns instead, which leaves each sum's value unchanged (x + w * 0 == x): equal results. Planes are
// read in place only by the register-row form (KernelTable::in_place_kw), the one that measured faster that way.
enum class Columns { kBlocked, kInPlace, kInPlaceEdge };

template <typename T, int WB, int FixedKW, Columns Cols>
inline void conv_block(const Geometry& g, const T* const* in_planes, PlaneLayout layout, const T* weight,
                       const T* bias, int64_t h, int64_t w0, int64_t kh0, int64_t kh1, T* out_px,
                       int64_t out_stride) {
  static_assert(Cols == Columns::kBlocked || FixedKW > 0, "in place only with the kernel row in registers");
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t KW = FixedKW > 0 ? FixedKW : g.KW;
  constexpr bool Edge = Cols == Columns::kInPlaceEdge;
  const int64_t vs = Cols == Columns::kBlocked ? L : layout.voxel_stride;
  const int64_t span = WB + KW - 1;  // input columns q = 0 .. span - 1 are voxels w0 - pad_w + q
  const int64_t q_lo = Edge && w0 < g.pad_w() ? g.pad_w() - w0 : 0;
  const int64_t q_hi = Edge && g.W + g.pad_w() - w0 < span ? g.W + g.pad_w() - w0 : span;
  const int64_t col0 = (layout.w_origin(g) + w0 - g.pad_w()) * vs;  // negative at the left border of an unpadded plane
  // Whether input column q lies inside the volume (the taps on the columns outside are skipped).
  auto inside = [&](int64_t q) { return !Edge || (q >= q_lo && q < q_hi); };
  V acc[WB];
  const V init = bias ? load<V>(bias) : zero<V>();
#pragma GCC unroll 16
  for (int j = 0; j < WB; ++j) acc[j] = init;
  for (int64_t kd = 0; kd < g.KD; ++kd) {
    const T* plane = in_planes[kd];
    if (plane == nullptr) continue;
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const int64_t row_off = (h + kh - g.pad_h()) * layout.row_stride + col0;
      const T* wk = weight + (kd * g.KH + kh) * KW * L;
      // The KD * KH rows one block reads of a blocked plane do not fit L1 together (beside the weights): fetch the
      // row of the next (kd, kh) step while this one computes. (Measured: no gain on planes read in place.)
      if (Cols == Columns::kBlocked) {
        prefetch_next_row(g, in_planes, layout, h, kd, kh, kh0, kh1, row_off, col0, span * vs);
      }
      if constexpr (FixedKW > 0) {
        V wv[FixedKW];
#pragma GCC unroll 32
        for (int kw = 0; kw < FixedKW; ++kw) wv[kw] = load<V>(wk + kw * L);
        const T* column = plane + (row_off + q_lo * vs);  // q_lo == 0 except at the left border
#pragma GCC unroll 64
        for (int q = 0; q < WB + FixedKW - 1; ++q) {
          if (!inside(q)) continue;
          const V xv = load<V>(column);
          column += vs;
#pragma GCC unroll 32
          for (int kw = 0; kw < FixedKW; ++kw) {
            const int j = q - kw;
            if (j >= 0 && j < WB) acc[j] = fma(wv[kw], xv, acc[j]);
          }
        }
      } else {
        for (int64_t kw = 0; kw < KW; ++kw) {
          const V wv = load<V>(wk + kw * L);
          const T* p = plane + (row_off + kw * L);
#pragma GCC unroll 16
          for (int j = 0; j < WB; ++j) acc[j] = fma(wv, load<V>(p + j * L), acc[j]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < WB; ++j) store(out_px + j * out_stride, acc[j]);
}

// The kernel width with weights in registers (the default model's 7x7x7), where the ISA has the registers for it.
constexpr int kRegisterKW = 7;
constexpr bool kWeightsInRegisters = kVectorRegisters >= kOutBlock + kRegisterKW + 1;

// conv_block<T, n, FixedKW, Cols> for a run-time block size 1 <= n <= WB, FixedKW = kRegisterKW where `fixed_kw`
// (always, in place: the driver reads in place only at KernelTable::in_place_kw = kRegisterKW).
template <typename T, int WB, Columns Cols, class... Args>
inline void conv_block_dispatch(int64_t n, bool fixed_kw, Args... args) {
  if constexpr (WB > 1) {
    if (n < WB) return conv_block_dispatch<T, WB - 1, Cols>(n, fixed_kw, args...);
  }
  if constexpr (Cols != Columns::kBlocked) {
    conv_block<T, WB, kRegisterKW, Cols>(args...);
  } else {
    if constexpr (kWeightsInRegisters) {
      if (fixed_kw) return conv_block<T, WB, kRegisterKW, Cols>(args...);
    }
    conv_block<T, WB, 0, Cols>(args...);
  }
}

template <typename T>
void conv_row(const Geometry& g, const T* const* in_planes, PlaneLayout layout, const T* weight, const T* bias,
              int64_t h, T* out_row, int64_t out_stride) {
  const int64_t kh0 = h < g.pad_h() ? g.pad_h() - h : 0;
  const int64_t kh1 = g.H + g.pad_h() - h < g.KH ? g.H + g.pad_h() - h : g.KH;
  const int64_t n_blocks = (g.W + kOutBlock - 1) / kOutBlock;
  const bool fixed_kw = g.KW == kRegisterKW;
  for (int64_t b = 0; b < n_blocks; ++b) {  // near-equal blocks, so the W tail is not a slow 1- or 2-wide block
    const int64_t w0 = b * g.W / n_blocks;
    const int64_t w1 = (b + 1) * g.W / n_blocks;
    T* out_px = out_row + w0 * out_stride;
    if constexpr (kWeightsInRegisters) {  // elsewhere in_place_kw is 0: every plane is blocked
      if (!layout.padded) {
        if (w0 < g.pad_w() || w1 + g.pad_w() > g.W) {
          conv_block_dispatch<T, kOutBlock, Columns::kInPlaceEdge>(w1 - w0, fixed_kw, g, in_planes, layout, weight,
                                                                   bias, h, w0, kh0, kh1, out_px, out_stride);
        } else {
          conv_block_dispatch<T, kOutBlock, Columns::kInPlace>(w1 - w0, fixed_kw, g, in_planes, layout, weight,
                                                               bias, h, w0, kh0, kh1, out_px, out_stride);
        }
        continue;
      }
    }
    conv_block_dispatch<T, kOutBlock, Columns::kBlocked>(w1 - w0, fixed_kw, g, in_planes, layout, weight, bias, h,
                                                         w0, kh0, kh1, out_px, out_stride);
  }
}

// partial[kw0 .. kw0 + KB) += sum over rows h in [h0, h1), w in [0, W) of grad(h, w) * in(h + kh_off, w + kw).
template <typename T, int KB>
inline void weight_grad_block(const Geometry& g, const T* grad_plane, const T* in_plane, int64_t h0,
                                         int64_t h1, int64_t kh_off, int64_t kw0, T* partial_taps) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t row_len = g.row_len();
  V acc[KB];
#pragma GCC unroll 16
  for (int j = 0; j < KB; ++j) acc[j] = zero<V>();
  for (int64_t h = h0; h < h1; ++h) {
    const T* grow = grad_plane + (h * row_len + g.pad_w()) * L;
    const T* xrow = in_plane + ((h + kh_off) * row_len + kw0) * L;
    for (int64_t w = 0; w < g.W; ++w) {
      const V gv = load<V>(grow + w * L);
#pragma GCC unroll 16
      for (int j = 0; j < KB; ++j) acc[j] = fma(gv, load<V>(xrow + (w + j) * L), acc[j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KB; ++j) store(partial_taps + j * L, load<V>(partial_taps + j * L) + acc[j]);
}

template <typename T, int KB, class... Args>
inline void weight_grad_block_dispatch(int64_t n, Args... args) {
  if constexpr (KB > 1) {
    if (n < KB) return weight_grad_block_dispatch<T, KB - 1>(n, args...);
  }
  weight_grad_block<T, KB>(args...);
}

template <typename T>
void weight_grad_plane(const Geometry& g, const T* grad_plane, const T* const* in_planes, T* partial,
                       double* bias_partial) {
  using V = Vec<T>;
  using VD = Vec<double, kLanes<T>>;
  constexpr int64_t L = kLanes<T>;
  const int64_t row_len = g.row_len();
  if (bias_partial != nullptr) {  // rows summed in T, the rows in float64
    VD sum = load<VD>(bias_partial);
    for (int64_t h = 0; h < g.H; ++h) {
      const T* grow = grad_plane + (h * row_len + g.pad_w()) * L;
      V row = zero<V>();
      for (int64_t w = 0; w < g.W; ++w) row += load<V>(grow + w * L);
      sum += to_wide<VD>(row);
    }
    store(bias_partial, sum);
  }
  if (partial == nullptr) return;
  const int64_t kw_blocks = (g.KW + kTapBlock - 1) / kTapBlock;
  for (int64_t kd = 0; kd < g.KD; ++kd) {
    const T* in_plane = in_planes[kd];
    if (in_plane == nullptr) continue;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t kh_off = kh - g.pad_h();
      const int64_t h0 = kh_off < 0 ? -kh_off : 0;
      const int64_t h1 = g.H - kh_off < g.H ? g.H - kh_off : g.H;
      if (h0 >= h1) continue;
      T* partial_row = partial + (kd * g.KH + kh) * g.KW * L;
      for (int64_t b = 0; b < kw_blocks; ++b) {
        const int64_t kw0 = b * g.KW / kw_blocks;
        const int64_t kw1 = (b + 1) * g.KW / kw_blocks;
        weight_grad_block_dispatch<T, kTapBlock>(kw1 - kw0, g, grad_plane, in_plane, h0, h1, kh_off, kw0,
                                                 partial_row + kw0 * L);
      }
    }
  }
}

template <typename T>
const KernelTable<T>& table() {
  static const KernelTable<T> kernels{::uxnet::cpu::simd::isa_name(kIsa), kLanes<T>,
                                      kWeightsInRegisters ? kRegisterKW : 0, &conv_row<T>,
                                      &weight_grad_plane<T>};
  return kernels;
}

}  // namespace dwconv3d_kernels
