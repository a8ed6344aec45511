// uxnet::conv3d_3x3x3_backward on the CPU.
//   grad_x      = the same Winograd convolution of grad_out with the kernel flipped along every axis and its
//                 channel axes swapped (read in place: Filter::kFlippedTransposed), out-of-volume taps skipped
//                 where a weight is non-finite (driver.h);
//   grad_weight = Winograd as well (winograd_grad_weight below; few tiles with wide filters: streamed_grad_weight),
//                 in the compute dtype (bfloat16 inputs: in float32, rounded once); ATen's convolution_backward
//                 (oneDNN) where an input window or an output-gradient tile is non-finite (ATen's then places NaN
//                 and Inf exactly as the reference does; its own bfloat16 path returned stray Infs under PyTorch's
//                 fill_uninitialized_memory, so it runs in float32 too);
//   grad_bias   = the sum of grad_out over (N, D, H, W), in float64.
#include <ATen/Parallel.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
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

// v and m of one block of tiles: about half the L3 share of a core (fewer, longer passes of the tile loop), or as
// large as the accumulator du where that is larger: every block reads and writes all of du (64 C_in C_out values),
// so for wide layers at low resolution (384 -> 384 @ 12^3: du 38 MB, 216 tiles) small blocks would stream du ten
// times or more.
constexpr int64_t kGradBlockBytes = 4 << 20;

Strides cl_strides(const at::Tensor& t) { return Strides{t.stride(0), t.stride(2), t.stride(3), t.stride(4)}; }

// The weight gradient (C_out, C_in, 3, 3, 3), contiguous, and the view the kernels write it through.
at::Tensor weight_grad_like(const at::Tensor& x, const Geometry& g) {
  return at::empty({g.Cout, g.Cin, 3, 3, 3}, x.options().memory_format(at::MemoryFormat::Contiguous));
}

template <typename T>
FilterView<T> weight_view(at::Tensor& dw) {
  return FilterView<T>{dw.data_ptr<T>(), kTaps, kTaps * dw.size(1), false};
}

// Wide layers with few tiles: v and m of every tile at most this large run streamed_grad_weight.
constexpr int64_t kStreamedGradBytes = 64 << 20;
// Input channels per slice of du in streamed_grad_weight: kPoints x slice x cols values, about a quarter of the L2.
constexpr int64_t kGradSliceBytes = 512 << 10;

// dW by Winograd for wide layers with few tiles: v and m of every tile in one point-major block, then per slice (a
// column panel and a range of input channels) du = sum over tiles of v^T m in a thread's scratch and its inverse
// transform straight into dW: du (64 C_in C_out values, 38 MB at 384 -> 384) is never written whole, nor summed over
// blocks of tiles. The same bits as the blocked form below. Undefined on a non-finite window or tile (as below).
template <typename T>
at::Tensor streamed_grad_weight(const KernelTable<T>& kernels, const Geometry& g, const at::Tensor& xc,
                                const at::Tensor& gc) {
  const int64_t tiles = g.tiles();
  const Block<T> block = point_major_block(g, 0, tiles, Scratch::get<T>(Scratch::kV, kPoints * tiles * g.Cin),
                                           Scratch::get<T>(Scratch::kM, kPoints * tiles * g.cout_padded()));
  std::vector<uint8_t> bad_x(static_cast<size_t>(tiles)), bad_g(static_cast<size_t>(tiles));
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    kernels.transform_input(g, xc.data_ptr<T>(), cl_strides(xc), block, begin, end, bad_x.data());
    kernels.transform_grad_output(g, gc.data_ptr<T>(), cl_strides(gc), block, begin, end, bad_g.data());
  });
  for (int64_t t = 0; t < tiles; ++t) {
    if (bad_x[t] || bad_g[t]) return at::Tensor();
  }
  const int64_t slice = std::clamp<int64_t>(
      kGradSliceBytes / (kPoints * g.cols * static_cast<int64_t>(sizeof(T))), 1, g.Cin);
  const int64_t slices = (g.Cin + slice - 1) / slice;
  at::Tensor dw = weight_grad_like(xc, g);
  const FilterView<T> dwv = weight_view<T>(dw);
  at::parallel_for(0, g.panels() * slices, 1, [&](int64_t begin, int64_t end) {
    T* du = Scratch::get<T>(Scratch::kU, kPoints * slice * g.cols);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item % g.panels(), c0 = (item / g.panels()) * slice;
      kernels.weight_grad_panel(g, block, panel, c0, std::min(g.Cin, c0 + slice), du, dwv);
    }
  });
  return dw;
}

// dW by Winograd (docs/PERFORMANCE.md): per block of tiles, the input transform v (as the forward), the output
// gradient's transform m = A dy A^T, and du[p] += v[p]^T m[p] (threads split by points, tiles summed in order:
// the same bits for any thread count); then dW = G^T du G. Undefined when an input window or an output-gradient
// tile is non-finite (the caller then runs ATen's, which places NaN and Inf as the reference does).
template <typename T>
at::Tensor winograd_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, int64_t cout) {
  const KernelTable<T>& kernels = kernels_for<T>(selected_isa_for("uxnet::conv3d_3x3x3_backward"));
  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast3d;
  const at::Tensor xc = x.contiguous(cl), gc = grad_out.contiguous(cl);
  const Geometry g = make_geometry(x.size(0), x.size(1), cout, x.size(2), x.size(3), x.size(4), kernels.cols);
  const int64_t per_tile = kPoints * (g.Cin + g.cout_padded()) * static_cast<int64_t>(sizeof(T));
  const int64_t du_bytes = kPoints * g.Cin * g.cout_padded() * static_cast<int64_t>(sizeof(T));
  const int64_t per_block = std::clamp<int64_t>(std::max(kGradBlockBytes, du_bytes) / per_tile, 16, 1024);
  const int64_t tiles = g.tiles();
  if (du_bytes > kGradBlockBytes && tiles * per_tile <= kStreamedGradBytes) {
    return streamed_grad_weight(kernels, g, xc, gc);
  }
  const int64_t block_tiles = std::min(per_block, tiles);
  std::vector<T> v(static_cast<size_t>(kPoints * block_tiles * g.Cin));
  std::vector<T> m(static_cast<size_t>(kPoints * block_tiles * g.cout_padded()));
  std::vector<uint8_t> bad_x(static_cast<size_t>(block_tiles)), bad_g(static_cast<size_t>(block_tiles));
  at::Tensor du = at::zeros({kPoints, g.Cin, g.cout_padded()}, x.options().memory_format(at::MemoryFormat::Contiguous));
  T* dup = du.data_ptr<T>();
  const T* xp = xc.data_ptr<T>();
  const T* gp = gc.data_ptr<T>();
  for (int64_t first = 0; first < tiles; first += block_tiles) {
    const Block<T> block = point_major_block(g, first, std::min(block_tiles, tiles - first), v.data(), m.data());
    at::parallel_for(0, block.count, 1, [&](int64_t begin, int64_t end) {
      kernels.transform_input(g, xp, cl_strides(xc), block, begin, end, bad_x.data());
      kernels.transform_grad_output(g, gp, cl_strides(gc), block, begin, end, bad_g.data());
    });
    for (int64_t t = 0; t < block.count; ++t) {
      if (bad_x[t] || bad_g[t]) return at::Tensor();
    }
    at::parallel_for(0, kPoints, 1,
                     [&](int64_t begin, int64_t end) { kernels.multiply_grad(g, block, dup, begin, end); });
  }
  at::Tensor dw = weight_grad_like(x, g);
  const FilterView<T> dwv = weight_view<T>(dw);
  at::parallel_for(0, g.Cin, 1,
                   [&](int64_t begin, int64_t end) { kernels.transform_weight_grad(g, dup, dwv, begin, end); });
  return dw;
}

at::Tensor winograd_grad_weight(const at::Tensor& grad_out, const at::Tensor& x, int64_t cout) {
  return x.scalar_type() == at::kDouble ? winograd_grad_weight<double>(grad_out, x, cout)
                                        : winograd_grad_weight<float>(grad_out, x, cout);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3d_3x3x3_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         std::array<bool, 3> mask) {
  constexpr const char* op = "uxnet::conv3d_3x3x3_backward";
  checks::conv3d_3x3x3_inputs(op, x, weight, c10::nullopt);
  checks::shape(op, grad_out, "grad_out", {x.size(0), weight.size(0), x.size(2), x.size(3), x.size(4)});
  checks::same_dtype(op, grad_out, "grad_out", x, "x");
  checks::same_device(op, grad_out, "grad_out", x);
  const auto empty_grad = [&] { return at::empty({0}, x.options()); };
  const bool nothing_to_sum = x.numel() == 0 || grad_out.numel() == 0;

  const at::ScalarType compute = compute_dtype(x.scalar_type());
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  at::Tensor grad_x = empty_grad();
  at::Tensor grad_weight = empty_grad();
  if (mask[1] && !nothing_to_sum) {
    grad_weight = winograd_grad_weight(grad_out.to(compute), x.to(compute), weight.size(0));
    if (!grad_weight.defined()) {
      // A non-finite input window or output-gradient tile: ATen's (NCDHW), which places NaN and Inf as the
      // reference does.
      grad_weight = std::get<1>(at::convolution_backward(grad_out.to(compute).contiguous(),
                                                         x.to(compute).contiguous(), weight.to(compute), c10::nullopt,
                                                         {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, false, {0, 0, 0}, 1,
                                                         {false, true, false}));
    }
    grad_weight = grad_weight.to(x.scalar_type()).contiguous();
  }
  if (mask[0]) {
    if (nothing_to_sum) {
      grad_x = at::zeros(x.sizes(), x.options().memory_format(format));
    } else {
      grad_x = to_output(winograd_conv(grad_out.to(compute), weight.to(compute), c10::nullopt,
                                       /*multiply_padding=*/false, at::Tensor(), Filter::kFlippedTransposed),
                         x.scalar_type(), format);
    }
  }
  if (mask[1] && nothing_to_sum) grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_bias = empty_grad();
  if (mask[2]) grad_bias = grad_out.sum({0, 2, 3, 4}, false, at::kDouble).to(x.scalar_type());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
