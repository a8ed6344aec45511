// Raw-pointer parameters and kernel tables of the CPU 3x3x3 convolution (stride 1, padding 1, groups 1), computed
// with Winograd's F(2x2x2, 3x3x3) minimal filtering (no torch headers).
//
// The output is cut into 2x2x2 tiles; tile t reads the 4x4x4 input window starting one voxel before it. Per tile
// and channel the input window becomes 64 transformed values, the 3x3x3 filter 64 transformed taps, and output
// tile = A^T [ (B^T x B) . (G w G^T) ] A (each product along all three axes). For a block of tiles the elementwise
// products summed over input channels are 64 matrix products, one per transformed point p:
//   m[tile][p][co] = sum over ci of v[tile][p][ci] * u[p][ci][co]
// The products run on the ISA's own register-blocked micro-kernel over u packed per point in column panels of
// `cols` output channels ([p][panel][ci][cols], zero past C_out); m rows are C_out rounded up to whole panels.
// Activations are channels-last (channel stride 1) with int64 strides for n, d, h, w; every offset is int64_t.
#pragma once

#include <cstdint>

#include "cpu/simd/config.h"
#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {

constexpr int64_t kTaps = 27;    // 3x3x3 filter
constexpr int64_t kPoints = 64;  // 4x4x4 transformed points per tile and channel

// Element (n, c, d, h, w) of a channels-last activation is at n * n + d * d + h * h + w * w + c.
struct Strides {
  int64_t n, d, h, w;
};

struct Geometry {
  int64_t N, Cin, Cout, D, H, W;
  int64_t TD, TH, TW;  // tiles along each axis: ceil(size / 2)
  int64_t cols;        // output channels per column panel of the micro-kernel (KernelTable::cols)
  int64_t cin_row;     // elements of a row of v: C_in (bf16 pairs: rounded up to even, the extra channel zero)
  int64_t tiles() const { return N * TD * TH * TW; }
  int64_t panels() const { return (Cout + cols - 1) / cols; }
  int64_t cout_padded() const { return panels() * cols; }
};

inline Geometry make_geometry(int64_t N, int64_t Cin, int64_t Cout, int64_t D, int64_t H, int64_t W,
                              int64_t cols) {
  return Geometry{N, Cin, Cout, D, H, W, (D + 1) / 2, (H + 1) / 2, (W + 1) / 2, cols, Cin};
}

// A filter in the memory of a (C_out', C_in', 3, 3, 3) contiguous weight, as the kernels read and write it: element
// (ci, tap, co) of the pass's filter at w[ci * ci_stride + co * co_stride + tap] (taps in kd, kh, kw order; 26 - tap
// when `flip`, the filter flipped along every axis). The weight itself: ci_stride 27, co_stride 27 C_in; the input
// gradient's filter (flipped, channel axes swapped): ci_stride 27 C_in', co_stride 27, flip.
template <typename T>
struct FilterView {
  T* w;
  int64_t ci_stride, co_stride;
  bool flip;
  int64_t at(int64_t ci, int64_t co, int64_t tap) const {
    return ci * ci_stride + co * co_stride + (flip ? kTaps - 1 - tap : tap);
  }
};

// One block of tiles [first, first + count) and its buffers: v[t][p] (cin_row values of VT) at v + t * v_tile +
// p * v_point, m[t][p] (cout_padded values of T) at m + t * m_tile + p * m_point. The forward is tile-major (a
// tile's transforms read or write one contiguous run); the weight gradient point-major (its products run over the
// tiles of one point: consecutive rows).
template <typename T, typename VT = T>
struct Block {
  int64_t first, count;
  VT* v;
  T* m;
  int64_t v_tile, v_point, m_tile, m_point;
};

template <typename T, typename VT>
Block<T, VT> tile_major_block(const Geometry& g, int64_t first, int64_t count, VT* v, T* m) {
  return Block<T, VT>{first, count, v, m, kPoints * g.cin_row, g.cin_row, kPoints * g.cout_padded(), g.cout_padded()};
}

template <typename T, typename VT>
Block<T, VT> point_major_block(const Geometry& g, int64_t first, int64_t count, VT* v, T* m) {
  return Block<T, VT>{first, count, v, m, g.cin_row, count * g.cin_row, g.cout_padded(), count * g.cout_padded()};
}

// bfloat16 products: v in bf16, m in float32.
using PairBlock = Block<float, simd::bf16>;

// One ISA's kernels for compute type T (float or double). Ranges [begin, end) index tiles of the block (or, for
// transform_weight, input channels), so a block can be split across threads.
template <typename T>
struct KernelTable {
  const char* isa;
  int64_t lanes;
  int64_t cols;  // output channels per column panel
  // u[p][co / cols][ci][co % cols] = (G w G^T)[p] of the filter w, 0 for the padding columns past C_out.
  void (*transform_weight)(const Geometry& g, const FilterView<const T>& w, T* u, int64_t ci_begin, int64_t ci_end);
  // The same for one column panel and the input channels [ci_begin, ci_end) (a slice that stays in cache):
  // u[p * point_stride + (ci - ci_begin) * cols + c] for the output channel panel * cols + c.
  void (*transform_weight_panel)(const Geometry& g, const FilterView<const T>& w, int64_t panel, int64_t ci_begin,
                                 int64_t ci_end, T* u, int64_t point_stride);
  // block.v[t][p][ci] = (B^T x B)[p] of tile first + t's input window (zero outside the volume);
  // nonfinite[t] = 1 where that window holds a NaN or an Inf (or the transform overflowed), else 0.
  void (*transform_input)(const Geometry& g, const T* x, Strides xs, const Block<T>& block, int64_t begin,
                          int64_t end, uint8_t* nonfinite);
  // block.m[p] = block.v[p] u[p] for the points [p_begin, p_end).
  void (*multiply)(const Geometry& g, const Block<T>& block, const T* u, int64_t p_begin, int64_t p_end);
  // The products of one panel over the input channels [ci_begin, ci_end) of a slice from transform_weight_panel:
  // block.m[p][panel's columns] = (ci_begin > 0: +=) block.v[p][ci_begin, ci_end) u[p], points [p_begin, p_end).
  void (*multiply_panel)(const Geometry& g, const Block<T>& block, const T* u, int64_t point_stride, int64_t panel,
                         int64_t ci_begin, int64_t ci_end, int64_t p_begin, int64_t p_end);
  // The output voxels of tiles first + [begin, end) (those inside the volume) = A^T m A (+ bias[co] unless null).
  void (*transform_output)(const Geometry& g, const Block<T>& block, const T* bias, int64_t begin, int64_t end,
                           T* out, Strides os);
  // The output voxels of one tile by direct summation over ci and the 27 taps; w_direct[tap][ci][co].
  // multiply_padding: taps outside the volume add 0 * w (the forward's zero padding, NaN for an infinite w);
  // otherwise they are skipped (the input gradient, whose reference scatters only in-range contributions).
  void (*direct_tile)(const Geometry& g, const T* x, Strides xs, const T* w_direct, const T* bias,
                      bool multiply_padding, int64_t tile, T* out, Strides os);
  // The weight gradient dW = sum over tiles of G^T [ (B^T x B) (A dy A^T) ] G, per (ci, co):
  // block.m[t][p][co] = (A dy A^T)[p] of tile first + t's output gradient dy (C_out channels; zero outside the
  // volume and past C_out); nonfinite[t] as for transform_input.
  void (*transform_grad_output)(const Geometry& g, const T* dy, Strides ys, const Block<T>& block, int64_t begin,
                                int64_t end, uint8_t* nonfinite);
  // du[p][ci][co] (row stride cout_padded) += sum over the block's tiles, in order, of v[t][p][ci] m[t][p][co], for
  // the points [p_begin, p_end).
  void (*multiply_grad)(const Geometry& g, const Block<T>& block, T* du, int64_t p_begin, int64_t p_end);
  // dw(ci, tap, co) = (G^T du G)[tap] for ci in [ci_begin, ci_end).
  void (*transform_weight_grad)(const Geometry& g, const T* du, const FilterView<T>& dw, int64_t ci_begin,
                                int64_t ci_end);
  // Both for one panel and the input channels [ci_begin, ci_end) of a block holding every tile, through `du`
  // (scratch of kPoints * (ci_end - ci_begin) * cols values, stays in cache): dw(ci, tap, panel's output channels).
  void (*weight_grad_panel)(const Geometry& g, const Block<T>& block, int64_t panel, int64_t ci_begin, int64_t ci_end,
                            T* du, const FilterView<T>& dw);
};

// The forward with bfloat16 products: inputs and weights transformed in float32 and rounded to bf16, the matrix
// products in pairs of input channels (vec.h's dot_bf16: vdpbf16ps, float32 accumulation), the output transform in
// float32 and the output rounded to bf16 once. u[p][panel][ci / 2][cols] holds pairs (channel 2k in the low half;
// an odd C_in's last pair has a zero high half), m rows are float32.
struct PairKernelTable {
  const char* isa;
  int64_t cols;
  void (*transform_weight)(const Geometry& g, const float* w, uint32_t* u, int64_t pair_begin, int64_t pair_end);
  void (*transform_input)(const Geometry& g, const simd::bf16* x, Strides xs, const PairBlock& block, int64_t begin,
                          int64_t end, uint8_t* nonfinite);
  void (*multiply)(const Geometry& g, const PairBlock& block, const uint32_t* u, int64_t p_begin, int64_t p_end);
  void (*transform_output)(const Geometry& g, const PairBlock& block, const float* bias, int64_t begin, int64_t end,
                           simd::bf16* out, Strides os);
};

const KernelTable<float>& kernels_f32(simd::Isa isa);
// The bf16-product kernels of `isa`, or nullptr where it does not run them: the avx512 variant on CPUs with
// AVX512_BF16 (native vdpbf16ps) and avx512-emulated (its exact emulation, for tests); avx2 and generic compute
// bf16 inputs in float32 (an emulated dot product is slower than their float32 FMA).
const PairKernelTable* pair_kernels(simd::Isa isa);
const KernelTable<double>& kernels_f64(simd::Isa isa);

template <typename T>
const KernelTable<T>& kernels_for(simd::Isa isa) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return kernels_f64(isa);
  } else {
    return kernels_f32(isa);
  }
}

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
