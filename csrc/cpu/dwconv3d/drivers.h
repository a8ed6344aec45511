// The parallel drivers shared by the dwconv3d forward and backward: they read input planes in place or pack them
// just in time into the blocked layout (params.h), call the ISA kernels and write rows into the output tensor.
// Packing and storing take any element strides (NCDHW, channels_last_3d and arbitrary views are read and written
// where they lie) and convert the dtype on the fly (bf16/fp16 computed in float32, float64 in float64). No scratch
// tensor the size of an activation is allocated.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/dwconv3d/params.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {

// Compute type: double for double, float for float / bfloat16 / half.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

struct Strides5 {
  int64_t n, c, d, h, w;
};

inline Strides5 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t lanes) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.D = x.size(2);
  g.H = x.size(3);
  g.W = x.size(4);
  g.KD = weight.size(2);
  g.KH = weight.size(3);
  g.KW = weight.size(4);
  g.lanes = lanes;
  g.Cb = (g.C + lanes - 1) / lanes;
  return g;
}

// dst[cb][kd][kh][kw][lane] <- weight[c][0][kd][kh][kw] (contiguous), optionally flipped along all three axes
// (the grad-input pass is the forward with the flipped kernel). Lanes past C are zero.
template <typename Tin, typename Tc>
void block_weight(const Tin* weight, const Geometry& g, bool flip, Tc* dst) {
  const int64_t V = g.lanes;
  const int64_t taps = g.taps();
  std::fill(dst, dst + g.Cb * taps * V, Tc(0));
  for (int64_t c = 0; c < g.C; ++c) {
    const Tin* wc = weight + c * taps;
    Tc* dc = dst + (c / V) * taps * V + (c % V);
    for (int64_t t = 0; t < taps; ++t) dc[t * V] = static_cast<Tc>(wc[flip ? taps - 1 - t : t]);
  }
}

template <typename Tin, typename Tc>
void block_bias(const Tin* bias, const Geometry& g, Tc* dst) {
  std::fill(dst, dst + g.Cb * g.lanes, Tc(0));
  for (int64_t c = 0; c < g.C; ++c) dst[c] = static_cast<Tc>(bias[c]);
}

// Packs depth plane (n, cb, d) of `src` (any strides, dtype Tin) into a blocked plane (zero W padding, zero
// lanes past C).
template <typename Tin, typename Tc>
void pack_plane(const Tin* src, Strides5 s, const Geometry& g, int64_t n, int64_t cb, int64_t d, Tc* dst) {
  const int64_t V = g.lanes;
  const int64_t pad = g.pad_w();
  const int64_t row_len = g.row_len();
  const int64_t c0 = cb * V;
  const int64_t valid = std::min(V, g.C - c0);
  const Tin* src_plane = src + n * s.n + c0 * s.c + d * s.d;
  for (int64_t h = 0; h < g.H; ++h) {
    const Tin* src_row = src_plane + h * s.h;
    Tc* dst_row = dst + h * row_len * V;
    std::fill(dst_row, dst_row + pad * V, Tc(0));
    std::fill(dst_row + (pad + g.W) * V, dst_row + row_len * V, Tc(0));
    Tc* dst_px = dst_row + pad * V;
    if (s.c == 1) {  // channels_last_3d: the lanes of a voxel are contiguous in the source
      for (int64_t w = 0; w < g.W; ++w) {
        const Tin* sp = src_row + w * s.w;
        Tc* dp = dst_px + w * V;
        for (int64_t l = 0; l < valid; ++l) dp[l] = static_cast<Tc>(sp[l]);
        for (int64_t l = valid; l < V; ++l) dp[l] = Tc(0);
      }
    } else if (s.c < s.w) {  // channels innermost, strided
      for (int64_t w = 0; w < g.W; ++w) {
        const Tin* sp = src_row + w * s.w;
        Tc* dp = dst_px + w * V;
        for (int64_t l = 0; l < valid; ++l) dp[l] = static_cast<Tc>(sp[l * s.c]);
        for (int64_t l = valid; l < V; ++l) dp[l] = Tc(0);
      }
    } else {  // NCDHW-like: W is (nearly) contiguous in the source
      for (int64_t l = 0; l < valid; ++l) {
        const Tin* sp = src_row + l * s.c;
        for (int64_t w = 0; w < g.W; ++w) dst_px[w * V + l] = static_cast<Tc>(sp[w * s.w]);
      }
      for (int64_t l = valid; l < V; ++l) {
        for (int64_t w = 0; w < g.W; ++w) dst_px[w * V + l] = Tc(0);
      }
    }
  }
}

// Stores a computed row (row[w][lane], no padding) as row (n, lanes of cb, d, h) of `dst` (any strides, Tout).
template <typename Tc, typename Tout>
void store_row(const Tc* row, const Geometry& g, int64_t n, int64_t cb, int64_t d, int64_t h, Tout* dst,
               Strides5 s) {
  const int64_t V = g.lanes;
  const int64_t c0 = cb * V;
  const int64_t valid = std::min(V, g.C - c0);
  Tout* dst_row = dst + n * s.n + c0 * s.c + d * s.d + h * s.h;
  if (s.c == 1) {
    for (int64_t w = 0; w < g.W; ++w) {
      Tout* dp = dst_row + w * s.w;
      const Tc* sp = row + w * V;
      for (int64_t l = 0; l < valid; ++l) dp[l] = static_cast<Tout>(sp[l]);
    }
  } else if (s.c < s.w) {
    for (int64_t w = 0; w < g.W; ++w) {
      for (int64_t l = 0; l < valid; ++l) dst_row[w * s.w + l * s.c] = static_cast<Tout>(row[w * V + l]);
    }
  } else {
    for (int64_t l = 0; l < valid; ++l) {
      Tout* dp = dst_row + l * s.c;
      for (int64_t w = 0; w < g.W; ++w) dp[w * s.w] = static_cast<Tout>(row[w * V + l]);
    }
  }
}

// The KD blocked input planes an output depth plane needs, packed just in time into KD slots (one per
// d mod KD), so consecutive output planes re-pack only the one new input plane. Per thread, a few MB at most.
template <typename Tc>
class PlaneRing {
 public:
  explicit PlaneRing(const Geometry& g)
      : g_(g), storage_(static_cast<size_t>(g.KD * g.plane_elems())), keys_(static_cast<size_t>(g.KD), -1) {}

  // planes[kd] = the blocked plane at depth d + kd - pad_d() of (n, cb), or null outside the volume.
  template <typename Tin>
  void gather(const Tin* src, Strides5 s, int64_t n, int64_t cb, int64_t d, const Tc** planes) {
    for (int64_t kd = 0; kd < g_.KD; ++kd) {
      const int64_t di = d + kd - g_.pad_d();
      if (di < 0 || di >= g_.D) {
        planes[kd] = nullptr;
        continue;
      }
      const int64_t slot = di % g_.KD;
      const int64_t key = (n * g_.Cb + cb) * g_.D + di;
      Tc* plane = storage_.data() + slot * g_.plane_elems();
      if (keys_[slot] != key) {
        pack_plane(src, s, g_, n, cb, di, plane);
        keys_[slot] = key;
      }
      planes[kd] = plane;
    }
  }

 private:
  const Geometry& g_;
  std::vector<Tc> storage_;
  std::vector<int64_t> keys_;
};

// Whether a tensor of dtype Tin with strides s holds every channel block of a voxel as `lanes` contiguous values of
// the compute type, so the kernels can read (or write) it in place: float32 / float64 channels_last_3d (or any
// strides with unit channel stride) whose C is a multiple of the lanes.
template <typename Tin, typename Tc>
bool blocks_in_place(const Geometry& g, Strides5 s) {
  return std::is_same<Tin, Tc>::value && s.c == 1 && g.C % g.lanes == 0;
}

// dst = conv(src, weight) + bias; weight blocked [Cb][KD][KH][KW][lanes], bias [Cb][lanes] or null. The N * Cb * D
// output planes are split into one contiguous range per thread (equal to a plane), so the threads finish together.
// src is read in place where blocks_in_place allows and the kernel width is the table's in_place_kw (params.h);
// otherwise the ring packs its planes, re-packing the KD - 1 halo planes only where a range starts or crosses into
// the next channel block. Rows are written straight into dst where blocks_in_place allows, else through a row
// buffer and store_row.
template <typename Tin, typename Tc>
void conv_volume(const KernelTable<Tc>& kernels, const Geometry& g, const Tin* src, Strides5 src_strides,
                 const Tc* weight, const Tc* bias, Tin* dst, Strides5 dst_strides) {
  const bool read_in_place = blocks_in_place<Tin, Tc>(g, src_strides) && g.KW == kernels.in_place_kw;
  const bool write_in_place = blocks_in_place<Tin, Tc>(g, dst_strides);
  const PlaneLayout layout =
      read_in_place ? PlaneLayout{src_strides.h, src_strides.w, /*padded=*/false} : PlaneLayout::blocked(g);
  at::parallel_for(0, g.N * g.Cb * g.D, 1, [&](int64_t begin, int64_t end) {
    std::optional<PlaneRing<Tc>> ring;
    if (!read_in_place) ring.emplace(g);
    std::vector<const Tc*> planes(static_cast<size_t>(g.KD));
    std::vector<Tc> row(write_in_place ? 0 : static_cast<size_t>(g.W * g.lanes));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t d = plane % g.D;
      const int64_t cb = (plane / g.D) % g.Cb;
      const int64_t n = plane / (g.D * g.Cb);
      const Tc* w_cb = weight + cb * g.taps() * g.lanes;
      const Tc* b_cb = bias ? bias + cb * g.lanes : nullptr;
      if (read_in_place) {
        const Tc* volume = reinterpret_cast<const Tc*>(src) + n * src_strides.n + cb * g.lanes;
        for (int64_t kd = 0; kd < g.KD; ++kd) {
          const int64_t di = d + kd - g.pad_d();
          planes[kd] = di < 0 || di >= g.D ? nullptr : volume + di * src_strides.d;
        }
      } else {
        ring->gather(src, src_strides, n, cb, d, planes.data());
      }
      for (int64_t h = 0; h < g.H; ++h) {
        if (write_in_place) {
          Tc* out_row = reinterpret_cast<Tc*>(dst) + n * dst_strides.n + cb * g.lanes + d * dst_strides.d +
                        h * dst_strides.h;
          kernels.conv_row(g, planes.data(), layout, w_cb, b_cb, h, out_row, dst_strides.w);
        } else {
          kernels.conv_row(g, planes.data(), layout, w_cb, b_cb, h, row.data(), g.lanes);
          store_row(row.data(), g, n, cb, d, h, dst, dst_strides);
        }
      }
    }
  });
}

// Weight/bias-gradient partial sums of task t = cb * groups + group, over the group-th of `groups` fixed,
// equal slices of the N * D (n, d) planes of channel block cb: partial[t][taps()][lanes] (weight gradient, null if
// not wanted) and bias_partial[t][lanes] (float64, null if not wanted). The partition depends only on the shapes,
// never on the thread count, and each task sums in a fixed order, so the reduced gradient is bit-identical run to
// run and across thread counts.
template <typename Tin, typename Tc>
void weight_grad_partials(const KernelTable<Tc>& kernels, const Geometry& g, const Tin* grad, Strides5 grad_strides,
                          const Tin* x, Strides5 x_strides, int64_t groups, Tc* partial, double* bias_partial) {
  const int64_t task_elems = g.taps() * g.lanes;
  const int64_t planes_total = g.N * g.D;
  at::parallel_for(0, g.Cb * groups, 1, [&](int64_t begin, int64_t end) {
    PlaneRing<Tc> ring(g);
    std::vector<const Tc*> planes(static_cast<size_t>(g.KD), nullptr);
    std::vector<Tc> grad_plane(static_cast<size_t>(g.plane_elems()));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task / groups;
      const int64_t group = task % groups;
      Tc* part = partial ? partial + task * task_elems : nullptr;
      double* bias_part = bias_partial ? bias_partial + task * g.lanes : nullptr;
      if (part) std::fill(part, part + task_elems, Tc(0));
      if (bias_part) std::fill(bias_part, bias_part + g.lanes, 0.0);
      for (int64_t p = group * planes_total / groups; p < (group + 1) * planes_total / groups; ++p) {
        const int64_t n = p / g.D;
        const int64_t d = p % g.D;
        pack_plane(grad, grad_strides, g, n, cb, d, grad_plane.data());
        if (part) ring.gather(x, x_strides, n, cb, d, planes.data());
        kernels.weight_grad_plane(g, grad_plane.data(), planes.data(), part, bias_part);
      }
    }
  });
}

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
