// uxnet::conv3d_3x3x3 on the CPU, and the Winograd driver (driver.h) it shares with the input gradient.
//
// Per call: transform the weights (u, kPoints x C_in x C_out, packed in the micro-kernel's column panels, read
// from the weight's own memory), then for each block of tiles sized to stay in L2: input transform into v, the
// kPoints matrix products m = v u (the ISA's register-blocked micro-kernel), output transform into the output
// (+ bias). Blocks run in parallel; volumes with few blocks run as one block whose transforms are split across
// threads by tiles and whose products by points, and volumes with few tiles transform the filter one cache-sized
// slice at a time right before its products (streamed_tiles).
// Every output element is computed by the same operations whatever the thread count (bitwise reproducible).
// (Measured against one batched at::bmm_out per block, MKL sgemm, on the same blocks: the micro-kernel was faster
// at every shape of docs/PERFORMANCE.md; MKL repacked u for every block and ran small-M products slowly.)
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#include "common/arg_checks.h"
#include "cpu/common/isa_check.h"
#include "cpu/conv3d_3x3x3/driver.h"
#include "cpu/conv3d_3x3x3/params.h"
#include "cpu/conv3d_3x3x3/scratch.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {
namespace {

constexpr const char* kOp = "uxnet::conv3d_3x3x3";
// v and m of one block together: about the L2 of one core (1 MiB on Zen 4).
constexpr int64_t kBlockBytes = 1 << 20;
constexpr int64_t kMinBlockTiles = 16;
constexpr int64_t kMaxBlockTiles = 256;
// Fewer blocks than this: one block, threaded inside (a function of the shapes only, never of the thread count).
constexpr int64_t kMinParallelBlocks = 16;
// Fewer tiles than this: few tiles (streams_filter, few_tiles_large_filter).
constexpr int64_t kFewTiles = 64;

// v of VT, m of T.
template <typename VT, typename T>
int64_t block_tiles(const Geometry& g) {
  const int64_t per_tile = kPoints * (g.cin_row * static_cast<int64_t>(sizeof(VT)) +
                                      g.cout_padded() * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(kBlockBytes / per_tile, kMinBlockTiles, kMaxBlockTiles);
}

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(2), t.stride(3), t.stride(4)}; }

// The filter of a Winograd pass in a contiguous weight's memory: the weight's own, or for Filter::kFlippedTransposed
// the input gradient's (the weight flipped along every axis, its channel axes swapped), read in place.
template <typename T>
FilterView<const T> filter_view(const at::Tensor& weight, Filter filter) {
  const int64_t cin = weight.size(1);
  if (filter == Filter::kFlippedTransposed) return FilterView<const T>{weight.data_ptr<T>(), kTaps * cin, kTaps, true};
  return FilterView<const T>{weight.data_ptr<T>(), kTaps, kTaps * cin, false};
}

bool flips(Filter filter) { return filter == Filter::kFlippedTransposed; }

// The filter as transformed points u [kPoints][panels][C_in][cols] into `u` (kPoints * C_in * cout_padded); weight
// contiguous.
template <typename T>
void transform_weight_into(const KernelTable<T>& kernels, const Geometry& g, const at::Tensor& weight, Filter filter,
                           T* u) {
  const FilterView<const T> w = filter_view<T>(weight, filter);
  at::parallel_for(0, g.Cin, 1, [&](int64_t begin, int64_t end) { kernels.transform_weight(g, w, u, begin, end); });
}

// u in this thread's scratch (a packed weight from conv3d_3x3x3_pack_weight skips this).
template <typename T>
const T* transformed_weight(const KernelTable<T>& kernels, const Geometry& g, const at::Tensor& weight,
                            Filter filter) {
  T* u = Scratch::get<T>(Scratch::kU, kPoints * g.Cin * g.cout_padded());
  transform_weight_into(kernels, g, weight, filter, u);
  return u;
}

// Kernels: a KernelTable<T> or the PairKernelTable; x of X, u of U, v of VT, m and bias of T, out of O.
template <typename Kernels, typename X, typename U, typename T, typename VT, typename O>
void run_block(const Kernels& kernels, const Geometry& g, const X* x, Strides xs, const U* u, const T* bias,
               const Block<T, VT>& block, bool threaded, uint8_t* nonfinite, O* out, Strides os) {
  const auto split = [&](int64_t n, auto&& fn) {
    if (threaded) {
      at::parallel_for(0, n, 1, fn);
    } else {
      fn(0, n);
    }
  };
  split(block.count, [&](int64_t begin, int64_t end) {
    kernels.transform_input(g, x, xs, block, begin, end, nonfinite + block.first);
  });
  split(kPoints, [&](int64_t begin, int64_t end) { kernels.multiply(g, block, u, begin, end); });
  split(block.count,
        [&](int64_t begin, int64_t end) { kernels.transform_output(g, block, bias, begin, end, out, os); });
}

// Every tile through the blocked Winograd pass; returns which tiles hold non-finite input windows.
template <typename VT, typename Kernels, typename X, typename U, typename T, typename O>
std::vector<uint8_t> winograd_tiles(const Kernels& kernels, const Geometry& g, const X* xp, Strides xs, const U* up,
                                    const T* bias, O* op, Strides os) {
  const int64_t tiles = g.tiles();
  std::vector<uint8_t> nonfinite(static_cast<size_t>(tiles));
  const int64_t per_block = block_tiles<VT, T>(g);
  const int64_t blocks = (tiles + per_block - 1) / per_block;
  if (blocks < kMinParallelBlocks) {
    const Block<T, VT> block =
        tile_major_block(g, 0, tiles, Scratch::get<VT>(Scratch::kV, kPoints * tiles * g.cin_row),
                         Scratch::get<T>(Scratch::kM, kPoints * tiles * g.cout_padded()));
    run_block(kernels, g, xp, xs, up, bias, block, /*threaded=*/true, nonfinite.data(), op, os);
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<VT[]> v(new VT[kPoints * per_block * g.cin_row]);
      std::unique_ptr<T[]> m(new T[kPoints * per_block * g.cout_padded()]);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * per_block;
        const Block<T, VT> block = tile_major_block(g, first, std::min(per_block, tiles - first), v.get(), m.get());
        run_block(kernels, g, xp, xs, up, bias, block, /*threaded=*/false, nonfinite.data(), op, os);
      }
    });
  }
  return nonfinite;
}

// Input channels per slice of the transformed filter in streamed_tiles: kPoints x slice x cols values, about half
// the L2 of a core (the block's m rows of one panel share the rest).
constexpr int64_t kSliceBytes = 1 << 20;

template <typename T>
int64_t slice_channels(const Geometry& g) {
  return std::clamp<int64_t>(kSliceBytes / (kPoints * g.cols * static_cast<int64_t>(sizeof(T))), 1, g.Cin);
}

// Every tile as one block (volumes with few tiles), with the filter transformed one slice (one column panel, a range
// of input channels) at a time right before its products, in a thread's scratch: the transformed filter is never
// written whole (151 MB for 768 -> 768 channels), so it costs one read of the filter, not a write and a read of
// 64 / 27 times it. Threads split the products by panels (and by points where there are few panels); an output
// value gets the operations of `multiply`, so the bits match winograd_tiles'. Returns which tiles hold non-finite
// input windows.
template <typename T>
std::vector<uint8_t> streamed_tiles(const KernelTable<T>& kernels, const Geometry& g, const T* xp, Strides xs,
                                    const at::Tensor& weight, Filter filter, const T* bias, T* op, Strides os) {
  const int64_t tiles = g.tiles();
  std::vector<uint8_t> nonfinite(static_cast<size_t>(tiles));
  const Block<T> block = point_major_block(g, 0, tiles, Scratch::get<T>(Scratch::kV, kPoints * tiles * g.cin_row),
                                          Scratch::get<T>(Scratch::kM, kPoints * tiles * g.cout_padded()));
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    kernels.transform_input(g, xp, xs, block, begin, end, nonfinite.data());
  });
  const FilterView<const T> w = filter_view<T>(weight, filter);
  const int64_t slice = slice_channels<T>(g);
  const int64_t groups = std::max<int64_t>(1, 4 / g.panels());  // point groups per panel
  at::parallel_for(0, g.panels() * groups, 1, [&](int64_t begin, int64_t end) {
    T* u = Scratch::get<T>(Scratch::kU, kPoints * slice * g.cols);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item / groups, group = item % groups;
      for (int64_t c0 = 0; c0 < g.Cin; c0 += slice) {
        const int64_t c1 = std::min(g.Cin, c0 + slice), point_stride = (c1 - c0) * g.cols;
        kernels.transform_weight_panel(g, w, panel, c0, c1, u, point_stride);
        kernels.multiply_panel(g, block, u, point_stride, panel, c0, c1, group * kPoints / groups,
                               (group + 1) * kPoints / groups);
      }
    }
  });
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    kernels.transform_output(g, block, bias, begin, end, op, os);
  });
  return nonfinite;
}

// Whether a call without a packed filter streams it (streamed_tiles): few tiles, where the products are short
// against the transform of the filter (measured, docs/PERFORMANCE.md: 768 -> 768 @ 6^3, 27 tiles, faster than the
// whole transformed filter and than oneDNN; 384 -> 384 @ 12^3, 216 tiles, slower than the whole filter, which its
// products reuse across point-major runs of tiles).
bool streams_filter(const Geometry& g) { return g.tiles() < kFewTiles; }

// The filter of the pass as a (C_out, C_in, 3, 3, 3) tensor (the direct kernels' input).
at::Tensor filter_weight(const at::Tensor& weight, Filter filter) {
  return flips(filter) ? weight.flip({2, 3, 4}).transpose(0, 1) : weight;
}

template <typename T>
void direct_tiles(const KernelTable<T>& kernels, const Geometry& g, const at::Tensor& x, const at::Tensor& weight,
                  const T* bias, bool multiply_padding, const std::vector<int64_t>& tiles, at::Tensor& out) {
  const at::Tensor w_direct = weight.permute({2, 3, 4, 1, 0}).contiguous();  // [kd][kh][kw][C_in][C_out]
  const T* xp = x.data_ptr<T>();
  const T* wp = w_direct.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const Strides xs = strides_of(x), os = strides_of(out);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) kernels.direct_tile(g, xp, xs, wp, bias, multiply_padding, tiles[i], op, os);
  });
}

template <typename T>
void winograd_typed(const at::Tensor& x, const at::Tensor& weight, Filter filter, const T* bias,
                    bool multiply_padding, const at::Tensor& packed, at::Tensor& out) {
  const KernelTable<T>& kernels = kernels_for<T>(selected_isa_for(kOp));
  const Geometry g =
      make_geometry(x.size(0), x.size(1), out.size(1), x.size(2), x.size(3), x.size(4), kernels.cols);
  const int64_t tiles = g.tiles();
  std::vector<int64_t> direct;
  if (!all_finite(weight)) {  // every transformed tap of that filter is polluted: all direct
    direct.resize(static_cast<size_t>(tiles));
    for (int64_t t = 0; t < tiles; ++t) direct[t] = t;
    direct_tiles(kernels, g, x, filter_weight(weight, filter), bias, multiply_padding, direct, out);
    return;
  }
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::vector<uint8_t> nonfinite;
  if (!packed.defined() && streams_filter(g)) {
    nonfinite = streamed_tiles(kernels, g, xp, strides_of(x), weight, filter, bias, op, strides_of(out));
  } else {
    const T* up = packed.defined() ? packed.data_ptr<T>() : transformed_weight(kernels, g, weight, filter);
    nonfinite = winograd_tiles<T>(kernels, g, xp, strides_of(x), up, bias, op, strides_of(out));
  }
  for (int64_t t = 0; t < tiles; ++t) {
    if (nonfinite[t]) direct.push_back(t);
  }
  if (!direct.empty()) {
    direct_tiles(kernels, g, x, filter_weight(weight, filter), bias, multiply_padding, direct, out);
  }
}

}  // namespace

// Few tiles and large filters: transforming the weights per call (64 / 27 times the filter) is a large share of the
// call. In float32 / float64 the filter is streamed (streamed_tiles; 768 -> 768 @ 6^3: 26 ms against 15 ms packed
// and 51 ms for oneDNN, docs/PERFORMANCE.md), so a packed one saves little for its memory there (151 MB for that
// layer); bf16 products have no streamed form, and ATen's bf16 convolution (oneDNN) is faster than their per-call
// transform.
constexpr int64_t kLargeFilterBytes = 8 << 20;

// Whether every element of a dense float / double tensor is finite (one parallel pass, no temporaries).
bool all_finite(const at::Tensor& t) {
  std::atomic<bool> finite{true};
  const auto scan = [&](const auto* data) {
    at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      bool ok = true;
      for (int64_t i = begin; i < end; ++i) ok &= std::isfinite(data[i]);
      if (!ok) finite = false;
    });
  };
  if (t.scalar_type() == at::kDouble) {
    scan(t.data_ptr<double>());
  } else if (t.scalar_type() == at::kBFloat16) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
    at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      bool ok = true;
      for (int64_t i = begin; i < end; ++i) ok &= (bits[i] & 0x7f80u) != 0x7f80u;  // exponent all ones: Inf, NaN
      if (!ok) finite = false;
    });
  } else {
    scan(t.data_ptr<float>());
  }
  return finite;
}

bool few_tiles_large_filter(int64_t n, int64_t d, int64_t h, int64_t w, int64_t cout, int64_t cin,
                            int64_t element_size) {
  const int64_t tiles = n * ((d + 1) / 2) * ((h + 1) / 2) * ((w + 1) / 2);
  const int64_t u_bytes = kPoints * cout * cin * element_size;
  return tiles < kFewTiles && u_bytes >= kLargeFilterBytes;
}

bool prefers_direct(const at::Tensor& x, const at::Tensor& weight) {
  return weight.scalar_type() == at::kBFloat16 &&
         few_tiles_large_filter(x.size(0), x.size(2), x.size(3), x.size(4), weight.size(0), weight.size(1),
                                static_cast<int64_t>(weight.element_size()));
}

at::ScalarType compute_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_output(const at::Tensor& result, at::ScalarType dtype, at::MemoryFormat format) {
  if (result.scalar_type() == dtype && result.is_contiguous(format)) return result;
  return at::empty(result.sizes(), result.options().dtype(dtype).memory_format(format)).copy_(result);
}

namespace {

const PairKernelTable* selected_pair_kernels() { return pair_kernels(selected_isa_for(kOp)); }

Geometry pair_geometry(const PairKernelTable& kernels, int64_t n, int64_t cin, int64_t cout, int64_t d, int64_t h,
                       int64_t w) {
  Geometry g = make_geometry(n, cin, cout, d, h, w, kernels.cols);
  g.cin_row = cin + (cin & 1);
  return g;
}

// u of the bf16 products: [kPoints][panels][C_in / 2 rounded up][cols] pairs.
void transform_weight_pairs_into(const PairKernelTable& kernels, const Geometry& g, const at::Tensor& weight,
                                 uint32_t* u) {
  const at::Tensor w = weight.to(at::kFloat).permute({1, 2, 3, 4, 0}).contiguous();  // [C_in][kd][kh][kw][C_out]
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, g.cin_row / 2, 1,
                   [&](int64_t begin, int64_t end) { kernels.transform_weight(g, wp, u, begin, end); });
}

// Whether a bfloat16 x and weight run the bf16 products (pairs: the selected ISA's kernels, or null): channels, a
// finite filter, and a Winograd shape or a packed weight (see prefers_direct). Anything else computes as before (few
// tiles with large filters by ATen's bf16 convolution, the rest in float32).
bool runs_pairs(const PairKernelTable* pairs, const at::Tensor& x, const at::Tensor& weight, bool packed) {
  return pairs != nullptr && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
         x.numel() > 0 && weight.numel() > 0 && (packed || !prefers_direct(x, weight)) &&
         all_finite(weight.contiguous());
}

// F.conv3d(x, weight, bias, padding=1) with bf16 products; x, weight bf16; the result channels-last bf16. A tile with
// a non-finite input window: the whole convolution in float32 (which computes such tiles directly), rounded once.
at::Tensor pair_conv(const PairKernelTable& kernels, const at::Tensor& x_in, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& packed) {
  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast3d;
  const at::Tensor x = x_in.contiguous(cl);
  const Geometry g = pair_geometry(kernels, x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), x.size(4));
  at::Tensor out = at::empty({g.N, g.Cout, g.D, g.H, g.W}, x.options().memory_format(cl));
  const uint32_t* up = nullptr;
  if (packed.defined()) {
    up = reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>());
  } else {
    uint32_t* u = Scratch::get<uint32_t>(Scratch::kU, kPoints * (g.cin_row / 2) * g.cout_padded());
    transform_weight_pairs_into(kernels, g, weight, u);
    up = u;
  }
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  using simd::bf16;
  const std::vector<uint8_t> nonfinite =
      winograd_tiles<bf16>(kernels, g, reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()), strides_of(x), up,
                           b.defined() ? b.data_ptr<float>() : nullptr,
                           reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()), strides_of(out));
  if (std::find(nonfinite.begin(), nonfinite.end(), 1) != nonfinite.end()) {
    const c10::optional<at::Tensor> bf = b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt;
    out.copy_(winograd_conv(x.to(at::kFloat), weight.to(at::kFloat), bf, /*multiply_padding=*/true, at::Tensor()));
  }
  return out;
}

}  // namespace

bool bf16_products() { return selected_pair_kernels() != nullptr; }

at::Tensor winograd_conv(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool multiply_padding, const at::Tensor& packed, Filter filter) {
  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast3d;
  const at::Tensor x = x_in.contiguous(cl);
  const int64_t cout = weight.size(flips(filter) ? 1 : 0);
  at::Tensor out = at::empty({x.size(0), cout, x.size(2), x.size(3), x.size(4)}, x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) {  // no input channels: the bias alone
    if (bias.has_value()) return out.copy_(bias->view({1, cout, 1, 1, 1}).expand_as(out));
    return out.zero_();
  }
  TORCH_INTERNAL_ASSERT(x.size(1) == 1 || x.stride(1) == 1, kOp, ": expected a channels-last input");
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kDouble) {
    winograd_typed<double>(x, w, filter, b.defined() ? b.data_ptr<double>() : nullptr, multiply_padding, packed,
                           out);
  } else {
    winograd_typed<float>(x, w, filter, b.defined() ? b.data_ptr<float>() : nullptr, multiply_padding, packed, out);
  }
  return out;
}

at::Tensor conv3d_3x3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  checks::conv3d_3x3x3_inputs(kOp, x, weight, bias);
  const PairKernelTable* pairs = selected_pair_kernels();
  if (runs_pairs(pairs, x, weight, /*packed=*/false)) {
    return to_output(pair_conv(*pairs, x, weight, bias, at::Tensor()), x.scalar_type(), suggested_memory_format(x));
  }
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && prefers_direct(x, weight) &&
      all_finite(weight.contiguous())) {
    // Few tiles with large filters in bf16: ATen's bf16 convolution (oneDNN) in NCDHW, its faster layout there
    // (768 -> 768 @ 6^3: 18-23 ms, against 26 ms for the float32 streamed filter before any conversion).
    const at::Tensor out = at::convolution(x.contiguous(), weight, bias.has_value() ? *bias : at::Tensor(), {1, 1, 1},
                                           {1, 1, 1}, {1, 1, 1}, false, {0, 0, 0}, 1);
    return to_output(out, x.scalar_type(), suggested_memory_format(x));
  }
  const at::ScalarType compute = compute_dtype(x.scalar_type());
  const c10::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(compute)) : c10::nullopt;
  const at::Tensor result =
      winograd_conv(x.to(compute), weight.to(compute), b, /*multiply_padding=*/true, at::Tensor());
  return to_output(result, x.scalar_type(), suggested_memory_format(x));
}

// Packed weights: (kPoints, panels, C_in, cols) in the compute dtype, or for the bf16 products of a bf16 weight
// (kPoints, panels, ceil(C_in / 2), 2 * cols) bf16 (the pairs).
bool packs_pairs(const at::Tensor& weight) {
  return weight.scalar_type() == at::kBFloat16 && selected_pair_kernels() != nullptr;
}

at::ScalarType packed_dtype(const at::Tensor& weight) {
  return packs_pairs(weight) ? at::kBFloat16 : compute_dtype(weight.scalar_type());
}

std::vector<int64_t> packed_weight_shape(const at::Tensor& weight) {
  if (packs_pairs(weight)) {
    const int64_t cols = selected_pair_kernels()->cols;
    return {kPoints, (weight.size(0) + cols - 1) / cols, (weight.size(1) + 1) / 2, 2 * cols};
  }
  const int64_t cols = compute_dtype(weight.scalar_type()) == at::kDouble
                           ? kernels_for<double>(selected_isa_for(kOp)).cols
                           : kernels_for<float>(selected_isa_for(kOp)).cols;
  return {kPoints, (weight.size(0) + cols - 1) / cols, weight.size(1), cols};
}

// A packed weight's shape gives C_out only up to a panel; where the last panel has padding columns (never read by
// the output transform), its last column at point 0, input channel 0 holds C_out, so a packed weight of another
// filter count is refused exactly (bf16 pairs, T = uint16_t: the bits of that column's even half, an integer).
template <typename T>
T& c_out_slot(const at::Tensor& packed) {
  const int64_t panels = packed.size(1), rows = packed.size(2), cols = packed.size(3);
  const int64_t last = std::is_same<T, uint16_t>::value ? cols - 2 : cols - 1;
  return reinterpret_cast<T*>(packed.data_ptr())[((panels - 1) * rows) * cols + last];
}

template <typename T>
bool records_c_out(const at::Tensor& packed, int64_t cout) {
  const int64_t cols = std::is_same<T, uint16_t>::value ? packed.size(3) / 2 : packed.size(3);
  return cout % cols == 0 || c_out_slot<T>(packed) == static_cast<T>(cout);
}

bool packed_records_c_out(const at::Tensor& packed, int64_t cout) {
  switch (packed.scalar_type()) {
    case at::kDouble: return records_c_out<double>(packed, cout);
    case at::kBFloat16: return records_c_out<uint16_t>(packed, cout);
    default: return records_c_out<float>(packed, cout);
  }
}

at::Tensor conv3d_3x3x3_pack_weight_cpu(const at::Tensor& weight) {
  constexpr const char* op = "uxnet::conv3d_3x3x3_pack_weight";
  checks::floating(op, weight, "weight");
  TORCH_CHECK(weight.dim() == 5 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(4) == 3, op,
              ": expected weight of shape (C_out, C_in, 3, 3, 3), got ", weight.sizes());
  at::Tensor packed = at::empty(packed_weight_shape(weight), weight.options().dtype(packed_dtype(weight)));
  if (packed.numel() == 0) return packed;
  if (packs_pairs(weight)) {
    const PairKernelTable& kernels = *selected_pair_kernels();
    const Geometry g = pair_geometry(kernels, 1, weight.size(1), weight.size(0), 1, 1, 1);
    transform_weight_pairs_into(kernels, g, weight, reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>()));
    if (weight.size(0) % kernels.cols != 0) c_out_slot<uint16_t>(packed) = static_cast<uint16_t>(weight.size(0));
    return packed;
  }
  const at::ScalarType compute = compute_dtype(weight.scalar_type());
  const at::Tensor w = weight.to(compute).contiguous();
  if (compute == at::kDouble) {
    const KernelTable<double>& kernels = kernels_for<double>(selected_isa_for(kOp));
    const Geometry g = make_geometry(1, w.size(1), w.size(0), 1, 1, 1, kernels.cols);
    transform_weight_into(kernels, g, w, Filter::kAsGiven, packed.data_ptr<double>());
  } else {
    const KernelTable<float>& kernels = kernels_for<float>(selected_isa_for(kOp));
    const Geometry g = make_geometry(1, w.size(1), w.size(0), 1, 1, 1, kernels.cols);
    transform_weight_into(kernels, g, w, Filter::kAsGiven, packed.data_ptr<float>());
  }
  if (w.size(0) % packed.size(3) != 0) {
    if (compute == at::kDouble) {
      c_out_slot<double>(packed) = static_cast<double>(w.size(0));
    } else {
      c_out_slot<float>(packed) = static_cast<float>(w.size(0));
    }
  }
  return packed;
}

at::Tensor conv3d_3x3x3_packed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed_weight,
                                   const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "uxnet::conv3d_3x3x3_packed";
  checks::conv3d_3x3x3_inputs(op, x, weight, bias);
  const at::ScalarType compute = compute_dtype(x.scalar_type());
  checks::same_device(op, packed_weight, "packed_weight", x);
  const std::vector<int64_t> expected = packed_weight_shape(weight);
  const at::ScalarType expected_dtype = packed_dtype(weight);
  TORCH_CHECK(packed_weight.scalar_type() == expected_dtype && packed_weight.sizes() == at::IntArrayRef(expected) &&
                  packed_weight.is_contiguous(),
              op, ": packed_weight does not belong to this weight on this ISA (expected a contiguous ", expected_dtype,
              " tensor of shape ", at::IntArrayRef(expected), ", got ", packed_weight.scalar_type(), " ",
              packed_weight.sizes(), "); pack it again with conv3d_3x3x3_pack_weight");
  const bool same_c_out = packed_weight.numel() == 0 || packed_records_c_out(packed_weight, weight.size(0));
  TORCH_CHECK(same_c_out, op, ": packed_weight does not belong to this weight (packed for another number of output "
              "channels than ", weight.size(0), "); pack it again with conv3d_3x3x3_pack_weight");
  if (expected_dtype == at::kBFloat16) {
    const PairKernelTable* pairs = selected_pair_kernels();
    if (runs_pairs(pairs, x, weight, /*packed=*/true)) {
      return to_output(pair_conv(*pairs, x, weight, bias, packed_weight), x.scalar_type(),
                       suggested_memory_format(x));
    }
    return conv3d_3x3x3_cpu(x, weight, bias);  // shapes or values the pairs do not take: as without packing
  }
  const c10::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(compute)) : c10::nullopt;
  const at::Tensor result =
      winograd_conv(x.to(compute), weight.to(compute), b, /*multiply_padding=*/true, packed_weight);
  return to_output(result, x.scalar_type(), suggested_memory_format(x));
}

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
