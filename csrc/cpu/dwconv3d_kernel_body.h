// The depthwise 3D convolution kernels, written once over a SIMD trait and compiled once per ISA.
//
// Include this file inside an ISA namespace (dwconv3d_isa_*.cpp) after defining
//   UXNET_DW_TARGET   the function attribute of the ISA (e.g. __attribute__((target("avx2,fma")))), or empty;
//   VecF, VecD        SIMD traits for float and double: scalar, reg, lanes, load, store, zero, add, fmadd;
//   kOutBlock         outputs along W kept in registers by the convolution (<= registers - 2);
//   kTapBlock         kw taps kept in registers by the weight-gradient pass;
//   UXNET_DW_ISA_NAME the ISA's name (a string literal).
// It defines table_f32() and table_f64(), the kernel tables of that namespace.
// No at::Tensor and no library calls here: only raw pointers, int64 offsets and the trait's intrinsics.

#include "dwconv3d_params.h"

namespace body {

using uxnet::cpu::dwconv3d::Geometry;
using uxnet::cpu::dwconv3d::KernelTable;

// `WB` consecutive outputs along W (starting at w0) of output row h, all lanes of one channel block.
template <class Vec, int WB>
UXNET_DW_TARGET inline void conv_block(const Geometry& g, const typename Vec::scalar* const* in_planes,
                                       const typename Vec::scalar* weight, const typename Vec::scalar* bias,
                                       int64_t h, int64_t w0, int64_t kh0, int64_t kh1,
                                       typename Vec::scalar* out_px) {
  using T = typename Vec::scalar;
  using R = typename Vec::reg;
  constexpr int64_t V = Vec::lanes;
  const int64_t row_len = g.row_len();
  const int64_t KW = g.KW;
  R acc[WB];
  const R init = bias ? Vec::load(bias) : Vec::zero();
#pragma GCC unroll 16
  for (int j = 0; j < WB; ++j) acc[j] = init;
  for (int64_t kd = 0; kd < g.KD; ++kd) {
    const T* plane = in_planes[kd];
    if (plane == nullptr) continue;
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T* row = plane + ((h + kh - g.pad_h()) * row_len + w0) * V;
      const T* wk = weight + (kd * g.KH + kh) * KW * V;
      // The KD * KH rows one block reads do not fit L1 together; fetch the part of this row that the next
      // block along W (or, past the row's end, the next output row) will read while this block computes.
      const char* ahead = reinterpret_cast<const char*>(row + (WB + KW - 1) * V);
      for (int64_t byte = 0; byte < WB * V * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(ahead + byte, 0, 3);
      }
      for (int64_t kw = 0; kw < KW; ++kw) {
        const R wv = Vec::load(wk + kw * V);
        const T* p = row + kw * V;
#pragma GCC unroll 16
        for (int j = 0; j < WB; ++j) acc[j] = Vec::fmadd(wv, Vec::load(p + j * V), acc[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < WB; ++j) Vec::store(out_px + j * V, acc[j]);
}

// conv_block<Vec, n> for a run-time block size 1 <= n <= WB (no lambdas: they would not inherit the ISA target).
template <class Vec, int WB, class... Args>
UXNET_DW_TARGET inline void conv_block_dispatch(int64_t n, Args... args) {
  if constexpr (WB > 1) {
    if (n < WB) return conv_block_dispatch<Vec, WB - 1>(n, args...);
  }
  conv_block<Vec, WB>(args...);
}

template <class Vec>
UXNET_DW_TARGET void conv_row(const Geometry& g, const typename Vec::scalar* const* in_planes,
                              const typename Vec::scalar* weight, const typename Vec::scalar* bias, int64_t h,
                              typename Vec::scalar* out_row) {
  constexpr int64_t V = Vec::lanes;
  const int64_t kh0 = h < g.pad_h() ? g.pad_h() - h : 0;
  const int64_t kh1 = g.H + g.pad_h() - h < g.KH ? g.H + g.pad_h() - h : g.KH;
  const int64_t n_blocks = (g.W + kOutBlock - 1) / kOutBlock;
  for (int64_t b = 0; b < n_blocks; ++b) {  // near-equal blocks, so the W tail is not a slow 1- or 2-wide block
    const int64_t w0 = b * g.W / n_blocks;
    const int64_t w1 = (b + 1) * g.W / n_blocks;
    conv_block_dispatch<Vec, kOutBlock>(w1 - w0, g, in_planes, weight, bias, h, w0, kh0, kh1, out_row + w0 * V);
  }
}

// partial[kw0 .. kw0 + KB) += sum over rows h in [h0, h1), w in [0, W) of grad(h, w) * in(h + kh_off, w + kw).
template <class Vec, int KB>
UXNET_DW_TARGET inline void weight_grad_block(const Geometry& g, const typename Vec::scalar* grad_plane,
                                              const typename Vec::scalar* in_plane, int64_t h0, int64_t h1,
                                              int64_t kh_off, int64_t kw0, typename Vec::scalar* partial_taps) {
  using T = typename Vec::scalar;
  using R = typename Vec::reg;
  constexpr int64_t V = Vec::lanes;
  const int64_t row_len = g.row_len();
  R acc[KB];
#pragma GCC unroll 16
  for (int j = 0; j < KB; ++j) acc[j] = Vec::zero();
  for (int64_t h = h0; h < h1; ++h) {
    const T* grow = grad_plane + (h * row_len + g.pad_w()) * V;
    const T* xrow = in_plane + ((h + kh_off) * row_len + kw0) * V;
    for (int64_t w = 0; w < g.W; ++w) {
      const R gv = Vec::load(grow + w * V);
#pragma GCC unroll 16
      for (int j = 0; j < KB; ++j) acc[j] = Vec::fmadd(gv, Vec::load(xrow + (w + j) * V), acc[j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KB; ++j) {
    Vec::store(partial_taps + j * V, Vec::add(Vec::load(partial_taps + j * V), acc[j]));
  }
}

template <class Vec, int KB, class... Args>
UXNET_DW_TARGET inline void weight_grad_block_dispatch(int64_t n, Args... args) {
  if constexpr (KB > 1) {
    if (n < KB) return weight_grad_block_dispatch<Vec, KB - 1>(n, args...);
  }
  weight_grad_block<Vec, KB>(args...);
}

template <class Vec>
UXNET_DW_TARGET void weight_grad_plane(const Geometry& g, const typename Vec::scalar* grad_plane,
                                       const typename Vec::scalar* const* in_planes, typename Vec::scalar* partial,
                                       bool want_weight, bool want_bias) {
  using T = typename Vec::scalar;
  using R = typename Vec::reg;
  constexpr int64_t V = Vec::lanes;
  const int64_t row_len = g.row_len();
  if (want_bias) {
    R sum = Vec::zero();
    for (int64_t h = 0; h < g.H; ++h) {
      const T* grow = grad_plane + (h * row_len + g.pad_w()) * V;
      for (int64_t w = 0; w < g.W; ++w) sum = Vec::add(sum, Vec::load(grow + w * V));
    }
    T* bias_partial = partial + g.taps() * V;
    Vec::store(bias_partial, Vec::add(Vec::load(bias_partial), sum));
  }
  if (!want_weight) return;
  const int64_t kw_blocks = (g.KW + kTapBlock - 1) / kTapBlock;
  for (int64_t kd = 0; kd < g.KD; ++kd) {
    const T* in_plane = in_planes[kd];
    if (in_plane == nullptr) continue;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t kh_off = kh - g.pad_h();
      const int64_t h0 = kh_off < 0 ? -kh_off : 0;
      const int64_t h1 = g.H - kh_off < g.H ? g.H - kh_off : g.H;
      if (h0 >= h1) continue;
      T* partial_row = partial + (kd * g.KH + kh) * g.KW * V;
      for (int64_t b = 0; b < kw_blocks; ++b) {
        const int64_t kw0 = b * g.KW / kw_blocks;
        const int64_t kw1 = (b + 1) * g.KW / kw_blocks;
        weight_grad_block_dispatch<Vec, kTapBlock>(kw1 - kw0, g, grad_plane, in_plane, h0, h1, kh_off, kw0,
                                                   partial_row + kw0 * V);
      }
    }
  }
}

}  // namespace body

const uxnet::cpu::dwconv3d::KernelTable<float>& table_f32() {
  static const uxnet::cpu::dwconv3d::KernelTable<float> table{UXNET_DW_ISA_NAME, VecF::lanes,
                                                              &body::conv_row<VecF>,
                                                              &body::weight_grad_plane<VecF>};
  return table;
}

const uxnet::cpu::dwconv3d::KernelTable<double>& table_f64() {
  static const uxnet::cpu::dwconv3d::KernelTable<double> table{UXNET_DW_ISA_NAME, VecD::lanes,
                                                               &body::conv_row<VecD>,
                                                               &body::weight_grad_plane<VecD>};
  return table;
}
