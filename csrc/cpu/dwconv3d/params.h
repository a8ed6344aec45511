// Raw-pointer parameters and kernel tables of the CPU depthwise 3D convolution (no torch headers).
//
// The kernels never see an at::Tensor. They read input depth planes either in place or from "blocked" copies:
//   in place   a float32 / float64 input in channels_last_3d (any strides with unit channel stride) whose C is a
//              multiple of the lanes, convolved with the kernel width of KernelTable::in_place_kw: the `lanes`
//              channels of block cb of one voxel are already contiguous, so the plane is read where it lies (row
//              and voxel strides of the tensor, no W padding: blocks at the W borders skip the taps outside);
//   blocked    every other input (NCDHW, other strides, C or kernel widths, bf16 / fp16), copied just in time by
//              the drivers (drivers.h) into a small per-thread ring of KD planes:
//                plane[h][w][lane]   channel c = cb * lanes + lane of channel block cb, lanes = SIMD width,
//              with pad_w() zero columns on each side of every W row and zero lanes past C.
// One SIMD vector holds `lanes` channels of one voxel, which is what a depthwise convolution wants (every channel
// has its own filter). Depth and height borders are handled by clipping the kd/kh loops. Weights are blocked as
// weight[cb][kd][kh][kw][lane]. Every offset is int64_t.
#pragma once

#include <cstdint>

#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {

struct Geometry {
  int64_t N, C, D, H, W;  // activation shape
  int64_t KD, KH, KW;     // kernel shape (odd)
  int64_t lanes;          // SIMD lanes of the compute type for the selected ISA
  int64_t Cb;             // ceil(C / lanes)

  int64_t pad_d() const { return KD / 2; }
  int64_t pad_h() const { return KH / 2; }
  int64_t pad_w() const { return KW / 2; }
  int64_t taps() const { return KD * KH * KW; }
  // Row length (in voxels) of a blocked plane, padded by pad_w() columns on each side of W.
  int64_t row_len() const { return W + 2 * pad_w(); }
  int64_t plane_elems() const { return H * row_len() * lanes; }
};

// How a kernel finds voxel (h, w) of an input plane: plane + h * row_stride + (w0 + w) * voxel_stride, where w0
// is pad_w() for a blocked plane (its zero columns make every W offset valid) and 0 for a plane read in place.
struct PlaneLayout {
  int64_t row_stride;
  int64_t voxel_stride;
  bool padded;  // blocked, with pad_w() zero columns each side; otherwise the taps outside [0, W) are skipped

  static PlaneLayout blocked(const Geometry& g) { return {g.row_len() * g.lanes, g.lanes, true}; }
  int64_t w_origin(const Geometry& g) const { return padded ? g.pad_w() : 0; }
};

// One ISA's kernels for compute type T (float or double). in_planes[kd] is the input plane at depth
// d + kd - pad_d() for output depth d (laid out as `layout` says), or null where that depth is outside the volume.
template <typename T>
struct KernelTable {
  const char* isa;
  int64_t lanes;
  // The kernel width whose blocks read planes in place faster than blocked copies (the register-row kernel, on ISAs
  // with the registers for it), or 0. Other widths run faster on the contiguous rows of blocked copies (measured).
  int64_t in_place_kw;
  // out_row[w * out_stride + lane] = bias[lane] + sum over kd, kh, kw of weight[kd][kh][kw][lane] *
  // input(h + kh - pad_h, w + kw - pad_w)[lane], for one output row h. weight: [KD][KH][KW][lanes] of this
  // channel block; bias: [lanes] or null.
  void (*conv_row)(const Geometry& g, const T* const* in_planes, PlaneLayout layout, const T* weight,
                   const T* bias, int64_t h, T* out_row, int64_t out_stride);
  // partial[tap][lane] += sum over the plane of grad(h, w) * input(h + kh - pad_h, w + kw - pad_w) (unless
  // partial is null) and bias_partial[lane] += sum over the plane of grad(h, w) (unless bias_partial is null; in
  // float64: a sum of grad_out alone cancels freely, and its error would be the only one). grad_plane and the
  // input planes are blocked.
  void (*weight_grad_plane)(const Geometry& g, const T* grad_plane, const T* const* in_planes, T* partial,
                            double* bias_partial);
};

// The kernel table of an ISA variant (kernels.cpp).
const KernelTable<float>& kernels_f32(simd::Isa isa);
const KernelTable<double>& kernels_f64(simd::Isa isa);

template <typename T>
const KernelTable<T>& kernels_for(simd::Isa isa) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return kernels_f64(isa);
  } else {
    return kernels_f32(isa);
  }
}

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
