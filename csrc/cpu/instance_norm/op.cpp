// CPU kernels of uxnet::instance_norm_lrelu and uxnet::instance_norm_add_lrelu (+ backward): instance norm
// (statistics per (n, c) over D*H*W, no affine) fused with LeakyReLU and, for the residual-block tail, the residual
// add or the normalised 1x1x1 projection shortcut. NCDHW-contiguous or channels_last_3d; float32, bfloat16 (float32
// math, float32 statistics) and float64. The backward recovers the normalised values from the saved output by
// inverting the LeakyReLU; the shortcut's 1x1x1 convolutions (matrix products, ATen's BLAS) are recomputed instead
// of saved. Checks, allocation, the shortcut products and threading here; the kernels (kernels.h, compiled per
// ISA variant in kernels.cpp) run with the variant simd::selected_isa() picks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/arg_checks.h"
#include "cpu/common/host.h"
#include "cpu/common/isa_check.h"
#include "cpu/instance_norm/params.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace {

namespace host = cpu::host;
namespace simd = cpu::simd;
using cpu::instance_norm::Args;
using cpu::instance_norm::finalize_stats;
using cpu::instance_norm::kBackwardSums;
using cpu::instance_norm::kernels;
using cpu::instance_norm::Layout;
using cpu::instance_norm::ResidualMode;
using cpu::instance_norm::StatsArgs;

constexpr const char* kForwardOp = "uxnet::instance_norm_lrelu";
constexpr const char* kBackwardOp = "uxnet::instance_norm_lrelu_backward";
constexpr const char* kAddForwardOp = "uxnet::instance_norm_add_lrelu";
constexpr const char* kAddBackwardOp = "uxnet::instance_norm_add_lrelu_backward";
constexpr const char* kInplaceForwardOp = "uxnet::instance_norm_add_lrelu_inplace";
// channels_last_3d: the voxels of an item are cut into at most this many chunks of at least kMinChunkVoxels (a
// partition that depends on the shape only: the unit of parallel work and of the ordered float64 reduction).
constexpr int64_t kMaxChunksPerItem = 64;
constexpr int64_t kMinChunkVoxels = 256;

void check_input(const char* op, const at::Tensor& x, const char* name) {
  checks::five_dim(op, x, name);
  host::check_kernel_dtype(op, x);
}

void check_slope_eps(const char* op, double slope, double eps) {
  TORCH_CHECK(slope > 0 && std::isfinite(slope), op,
              ": expected a finite negative_slope > 0 (the backward inverts the LeakyReLU), got ", slope);
  checks::positive_eps(op, eps);
}

// The saved statistics of the instance-norm ops: per (n, c).
void check_stats(const char* op, const at::Tensor& x, const at::Tensor& stats, const char* name) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) == x.size(1), op, ": expected ",
              name, " of shape (", x.size(0), ", ", x.size(1), ") (N, C), got ", stats.sizes());
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  TORCH_CHECK(stats.scalar_type() == dtype, op, ": expected ", name, " dtype ", dtype, " for ", x.scalar_type(),
              " inputs, got ", stats.scalar_type());
}

void check_shortcut(const char* op, const at::Tensor& z, at::TensorList inputs, at::TensorList weights) {
  TORCH_CHECK(inputs.size() == weights.size() && !inputs.empty(), op,
              ": expected as many shortcut_weights as shortcut_inputs (at least one), got ", inputs.size(), " and ",
              weights.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& x = inputs[i];
    const at::Tensor& w = weights[i];
    check_input(op, x, "shortcut input");
    TORCH_CHECK(x.size(0) == z.size(0) && x.sizes().slice(2) == z.sizes().slice(2), op, ": expected shortcut_inputs[",
                i, "] with the batch and spatial size of z ", z.sizes(), ", got ", x.sizes());
    TORCH_CHECK(w.dim() == 5 && w.size(0) == z.size(1) && w.size(1) == x.size(1) && w.size(2) == 1 &&
                    w.size(3) == 1 && w.size(4) == 1,
                op, ": expected shortcut_weights[", i, "] of shape (", z.size(1), ", ", x.size(1),
                ", 1, 1, 1), got ", w.sizes());
    TORCH_CHECK(x.scalar_type() == z.scalar_type() && w.scalar_type() == z.scalar_type(), op,
                ": expected shortcut tensors of dtype ", z.scalar_type(), " (the dtype of z)");
    TORCH_CHECK(x.device() == z.device() && w.device() == z.device(), op, ": expected shortcut tensors on ",
                z.device());
  }
}

Layout layout_of(const at::Tensor& x, at::MemoryFormat format) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4), format == at::MemoryFormat::ChannelsLast3d};
}

int64_t chunk_voxels(const Layout& l) {
  return std::max((l.voxels + kMaxChunksPerItem - 1) / kMaxChunksPerItem, kMinChunkVoxels);
}

int64_t voxel_chunks(const Layout& l) { return (l.voxels + chunk_voxels(l) - 1) / chunk_voxels(l); }

// channels_last_3d: fn(n, v0, v1, chunk) for every (batch item, voxel chunk), in parallel.
template <typename Fn>
void for_each_voxel_chunk(const Layout& l, Fn fn) {
  const int64_t per_chunk = chunk_voxels(l);
  const int64_t chunks = voxel_chunks(l);
  at::parallel_for(0, l.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, k = i % chunks;
      fn(n, k * per_chunk, std::min(l.voxels, (k + 1) * per_chunk), k);
    }
  });
}

// NCDHW: fn(p0, p1) over the N * C planes, in parallel.
template <typename Fn>
void for_each_plane_range(const Layout& l, Fn fn) {
  at::parallel_for(0, l.batch * l.channels, 1, fn);
}

// channels_last_3d: per-(n, c) mean and rstd of x (kernel storage type).
template <typename kernel_t, typename acc_t>
void compute_stats_voxels(simd::Isa isa, const kernel_t* x, const Layout& l, double eps, acc_t* mean, acc_t* rstd) {
  const auto& k = kernels<kernel_t, acc_t>(isa);
  const StatsArgs<kernel_t, acc_t> args{x, mean, rstd, eps, l};
  const int64_t C = l.channels, chunks = voxel_chunks(l);
  std::vector<double> partial(static_cast<size_t>(l.batch * chunks * 2 * C), 0.0);
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t chunk) {
    k.stats_voxels(args, n, v0, v1, partial.data() + (n * chunks + chunk) * 2 * C);
  });
  for (int64_t n = 0; n < l.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        s1 += partial[(n * chunks + chunk) * 2 * C + c];
        s2 += partial[(n * chunks + chunk) * 2 * C + C + c];
      }
      finalize_stats(simd::convert<double>(x[n * l.voxels * C + c]), s1, s2, l.voxels, eps, mean + n * C + c,
                     rstd + n * C + c);
    }
  }
}

template <typename kernel_t, typename acc_t>
void run_forward(simd::Isa isa, const Args<kernel_t, acc_t>& a) {
  const auto& k = kernels<kernel_t, acc_t>(isa);
  const Layout& l = a.layout;
  if (!l.channels_last) {
    for_each_plane_range(l, [&](int64_t p0, int64_t p1) { k.forward_planes(a, p0, p1); });
    return;
  }
  compute_stats_voxels(isa, a.z, l, a.eps, a.mean, a.rstd);
  if (a.mode == ResidualMode::normalized) compute_stats_voxels(isa, a.r, l, a.eps, a.r_mean, a.r_rstd);
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t) { k.forward_voxels(a, n, v0, v1); });
}

template <typename kernel_t, typename acc_t>
void run_backward(simd::Isa isa, const Args<kernel_t, acc_t>& a) {
  const auto& k = kernels<kernel_t, acc_t>(isa);
  const Layout& l = a.layout;
  if (!l.channels_last) {
    for_each_plane_range(l, [&](int64_t p0, int64_t p1) { k.backward_planes(a, p0, p1); });
    return;
  }
  const int64_t C = l.channels, chunks = voxel_chunks(l);
  std::vector<double> partial(static_cast<size_t>(l.batch * chunks * kBackwardSums * C), 0.0);
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t chunk) {
    k.backward_sums_voxels(a, n, v0, v1, partial.data() + (n * chunks + chunk) * kBackwardSums * C);
  });
  // coefficients [N][3][C]: a = mean(gs), b = mean(gs * xhat), b_r = mean(gs * r_hat), summed in chunk order
  std::vector<acc_t> coefficients(static_cast<size_t>(l.batch * kBackwardSums * C));
  const double inv = 1.0 / static_cast<double>(l.voxels);
  for (int64_t n = 0; n < l.batch; ++n) {
    for (int64_t j = 0; j < kBackwardSums * C; ++j) {
      double sum = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[(n * chunks + chunk) * kBackwardSums * C + j];
      coefficients[n * kBackwardSums * C + j] = static_cast<acc_t>(sum * inv);
    }
  }
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t) {
    k.backward_apply_voxels(a, n, v0, v1, coefficients.data() + n * kBackwardSums * C);
  });
}

at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(stats_dtype(x.scalar_type())));
}

// The 1x1x1 convolutions of the projection shortcut as matrix products on (N, C, V) views of the 5-D tensors
// (flatten(2) is a view in both layouts: rows of V voxels for NCDHW, columns for channels_last_3d), so nothing but
// the results is allocated (a convolution library would add scratch at the peak of the backward).
at::Tensor as_matrix(const at::Tensor& w) { return w.view({w.size(0), w.size(1)}); }  // (C, C_i, 1, 1, 1) -> (C, C_i)

// a (C', C_in) @ b[n] (C_in, V) for every n into out (N, C', V) (accumulate: added to it). One matrix product per
// sample: matmul's 2-D @ 3-D broadcast would transpose b into a contiguous (N * V, C_in) copy and the result back.
void ncdhw_product(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  // Below autograd: the op's own autograd rule differentiates it (and out= products reject inputs requiring grad).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (int64_t n = 0; n < b.size(0); ++n) {
    at::Tensor out_n = out.select(0, n);
    if (accumulate) {
      out_n.addmm_(a, b.select(0, n));
    } else {
      at::mm_out(out_n, a, b.select(0, n));
    }
  }
}

// (N, C', V) product as a 5-D tensor shaped like `like` with C' channels, in `format`; accumulate: added to `into`
// (a tensor of that shape and format) instead of a new tensor.
at::Tensor product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& like, int64_t channels,
                   at::MemoryFormat format, const at::Tensor* into = nullptr) {
  const int64_t n = like.size(0), d = like.size(2), h = like.size(3), w = like.size(4);
  if (format == at::MemoryFormat::ChannelsLast3d) {  // a (N, V, C_in) @ b (C_in, C') -> (N * V, C')
    // One 2-D product (a view of a for channels_last_3d inputs). at::matmul would pick between that and a batched
    // product by whether its operands require grad, so the rounding would depend on the caller's autograd state.
    at::Tensor result = at::mm(a.reshape({-1, a.size(2)}), b).view({n, d, h, w, channels}).permute({0, 4, 1, 2, 3});
    if (into == nullptr) return result.contiguous(format);
    return into->add_(result);
  }
  at::Tensor result = into ? *into : at::empty({n, channels, d, h, w}, like.options());
  at::Tensor rows = result.view({n, channels, d * h * w});
  ncdhw_product(a, b, rows, into != nullptr);  // a (C', C_in) @ b (N, C_in, V) -> (N, C', V)
  return result;
}

// sum_i conv3d(x_i, w_i) in `format`.
at::Tensor shortcut_projection(const at::Tensor& z, at::TensorList inputs, at::TensorList weights,
                               at::MemoryFormat format) {
  const bool cl = format == at::MemoryFormat::ChannelsLast3d;
  at::Tensor sum;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor x = inputs[i].flatten(2);  // (N, C_i, V)
    const at::Tensor w = as_matrix(weights[i]);
    const at::Tensor* into = i == 0 ? nullptr : &sum;
    sum = cl ? product(x.transpose(1, 2), w.t(), z, z.size(1), format, into)
             : product(w, x, z, z.size(1), format, into);
  }
  return sum;
}

// The gradients of input x and weight w of one shortcut convolution from grad_proj, the projection's gradient.
std::pair<at::Tensor, at::Tensor> shortcut_backward(const at::Tensor& grad_proj, const at::Tensor& x_in,
                                                    const at::Tensor& w_in) {
  const at::Tensor g = grad_proj.flatten(2);  // (N, C, V)
  const at::Tensor x = x_in.flatten(2);       // (N, C_i, V)
  const at::Tensor w = as_matrix(w_in);
  const at::MemoryFormat format = suggested_memory_format(x_in);
  at::Tensor grad_x = format == at::MemoryFormat::ChannelsLast3d
                          ? product(g.transpose(1, 2), w, x_in, x_in.size(1), format)
                          : product(w.t(), g, x_in, x_in.size(1), format);
  at::Tensor grad_w = at::matmul(g, x.transpose(1, 2)).sum(0).view(w_in.sizes());
  return {grad_x, grad_w};
}

// out = lrelu(IN(z) + r_hat); fills mean/rstd of z, and r_mean/r_rstd of r when mode is normalized (r is then the
// shortcut projection, already in z's layout).
void forward(const char* op, const at::Tensor& z, const at::Tensor& r, ResidualMode mode, double slope, double eps,
             at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, at::Tensor& r_mean, at::Tensor& r_rstd) {
  const simd::Isa isa = cpu::selected_isa_for(op);
  const at::MemoryFormat format = suggested_memory_format(z);
  const at::Tensor zc = z.contiguous(format);
  const Layout l = layout_of(zc, format);
  const bool norm = mode == ResidualMode::normalized;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "uxnet_instance_norm_forward_cpu", [&] {
    using acc_t = host::acc_type<scalar_t>;
    using kernel_t = host::kernel_type<scalar_t>;
    const Args<kernel_t, acc_t> args{host::kernel_data<scalar_t>(zc),
                                     nullptr,
                                     nullptr,
                                     mode == ResidualMode::none ? nullptr : host::kernel_data<scalar_t>(r),
                                     mean.data_ptr<acc_t>(),
                                     rstd.data_ptr<acc_t>(),
                                     norm ? r_mean.data_ptr<acc_t>() : nullptr,
                                     norm ? r_rstd.data_ptr<acc_t>() : nullptr,
                                     host::kernel_data_mut<scalar_t>(out),
                                     nullptr,
                                     mode,
                                     static_cast<acc_t>(slope),
                                     eps,
                                     l};
    run_forward(isa, args);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_lrelu_cpu(const at::Tensor& x, double negative_slope,
                                                                       double eps) {
  check_input(kForwardOp, x, "x");
  check_slope_eps(kForwardOp, negative_slope, eps);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(suggested_memory_format(x)));
  at::Tensor mean = empty_stats(x);
  at::Tensor rstd = empty_stats(x);
  if (x.numel() == 0) {
    mean.fill_(NAN);  // statistics over zero voxels are undefined
    rstd.fill_(NAN);
    return {out, mean, rstd};
  }
  at::Tensor unused;
  forward(kForwardOp, x, unused, ResidualMode::none, negative_slope, eps, out, mean, rstd, unused, unused);
  return {out, mean, rstd};
}

using AddStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // mean, rstd, shortcut mean, rstd

// The block tail of z into `out` (shaped like z in suggested_memory_format(z)). `out` may be z itself: both kernels
// read each element of z (and of the residual) before writing the output element at the same place, and the
// statistics pass over z runs first.
AddStats add_lrelu_into(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& residual,
                        at::TensorList shortcut_inputs, at::TensorList shortcut_weights, double negative_slope,
                        double eps, at::Tensor& out) {
  check_input(op, z, "z");
  check_slope_eps(op, negative_slope, eps);
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(has_residual != !shortcut_inputs.empty(), op,
              ": expected either residual or shortcut_inputs/shortcut_weights");
  const at::MemoryFormat format = suggested_memory_format(z);
  at::Tensor mean = empty_stats(z);
  at::Tensor rstd = empty_stats(z);
  at::Tensor r_mean = has_residual ? z.new_empty({0}, z.options().dtype(stats_dtype(z.scalar_type()))) : empty_stats(z);
  at::Tensor r_rstd = has_residual ? z.new_empty({0}, z.options().dtype(stats_dtype(z.scalar_type()))) : empty_stats(z);
  at::Tensor r;
  if (has_residual) {
    checks::like(op, *residual, "residual", z, "z");
    r = residual->contiguous(format);
  } else {
    check_shortcut(op, z, shortcut_inputs, shortcut_weights);
  }
  if (z.numel() == 0) {
    for (at::Tensor* s : {&mean, &rstd, &r_mean, &r_rstd}) s->fill_(NAN);
    return {mean, rstd, r_mean, r_rstd};
  }
  if (!has_residual) r = shortcut_projection(z, shortcut_inputs, shortcut_weights, format);
  forward(op, z, r, has_residual ? ResidualMode::plain : ResidualMode::normalized, negative_slope, eps, out, mean,
          rstd, r_mean, r_rstd);
  return {mean, rstd, r_mean, r_rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> instance_norm_add_lrelu_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& residual, at::TensorList shortcut_inputs,
    at::TensorList shortcut_weights, double negative_slope, double eps) {
  check_input(kAddForwardOp, z, "z");
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(suggested_memory_format(z)));
  auto [mean, rstd, r_mean, r_rstd] =
      add_lrelu_into(kAddForwardOp, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps, out);
  return {out, mean, rstd, r_mean, r_rstd};
}

// The same op writing its output over z: the fused residual-block tail without a fresh output tensor (z, the
// block's second conv output, is needed by nothing else). A z that is not dense in its memory format is computed
// into a temporary and copied back.
AddStats instance_norm_add_lrelu_inplace_cpu(at::Tensor& z, const std::optional<at::Tensor>& residual,
                                             at::TensorList shortcut_inputs, at::TensorList shortcut_weights,
                                             double negative_slope, double eps) {
  check_input(kInplaceForwardOp, z, "z");
  if (z.is_contiguous(suggested_memory_format(z))) {
    return add_lrelu_into(kInplaceForwardOp, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps, z);
  }
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(suggested_memory_format(z)));
  AddStats stats =
      add_lrelu_into(kInplaceForwardOp, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps, out);
  z.copy_(out);
  return stats;
}

// grad_z (and grad_r for a residual) from grad_out and the saved output.
void backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& r,
              ResidualMode mode, const at::Tensor& rstd, const at::Tensor& r_mean, const at::Tensor& r_rstd,
              double slope, at::Tensor& grad_z, at::Tensor& grad_r) {
  const simd::Isa isa = cpu::selected_isa_for(op);
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const at::Tensor gc = grad_out.contiguous(format);
  const at::Tensor oc = out.contiguous(format);
  const at::Tensor rc = mode == ResidualMode::none ? r : r.contiguous(format);
  const Layout l = layout_of(gc, format);
  const bool norm = mode == ResidualMode::normalized;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "uxnet_instance_norm_backward_cpu", [&] {
    using acc_t = host::acc_type<scalar_t>;
    using kernel_t = host::kernel_type<scalar_t>;
    at::Tensor rstd_c = rstd.contiguous();
    at::Tensor r_mean_c = norm ? r_mean.contiguous() : r_mean;
    at::Tensor r_rstd_c = norm ? r_rstd.contiguous() : r_rstd;
    const Args<kernel_t, acc_t> args{nullptr,
                                     host::kernel_data<scalar_t>(oc),
                                     host::kernel_data<scalar_t>(gc),
                                     mode == ResidualMode::none ? nullptr : host::kernel_data<scalar_t>(rc),
                                     nullptr,
                                     rstd_c.data_ptr<acc_t>(),
                                     norm ? r_mean_c.data_ptr<acc_t>() : nullptr,
                                     norm ? r_rstd_c.data_ptr<acc_t>() : nullptr,
                                     host::kernel_data_mut<scalar_t>(grad_z),
                                     mode == ResidualMode::none ? nullptr : host::kernel_data_mut<scalar_t>(grad_r),
                                     mode,
                                     static_cast<acc_t>(slope),
                                     0.0,
                                     l};
    run_backward(isa, args);
  });
}

at::Tensor instance_norm_lrelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& rstd,
                                            double negative_slope) {
  check_input(kBackwardOp, out, "out");
  checks::like(kBackwardOp, grad_out, "grad_out", out, "out");
  check_stats(kBackwardOp, out, rstd, "rstd");
  check_slope_eps(kBackwardOp, negative_slope, 1.0);
  at::Tensor grad_x = at::empty(out.sizes(), out.options().memory_format(suggested_memory_format(grad_out)));
  if (out.numel() == 0) return grad_x;
  at::Tensor none, unused;
  backward(kBackwardOp, grad_out, out, none, ResidualMode::none, rstd, none, none, negative_slope, grad_x, unused);
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
instance_norm_add_lrelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                     const std::optional<at::Tensor>& residual, at::TensorList shortcut_inputs,
                                     at::TensorList shortcut_weights, const at::Tensor& rstd,
                                     const at::Tensor& shortcut_mean, const at::Tensor& shortcut_rstd,
                                     double negative_slope) {
  check_input(kAddBackwardOp, out, "out");
  checks::like(kAddBackwardOp, grad_out, "grad_out", out, "out");
  check_stats(kAddBackwardOp, out, rstd, "rstd");
  check_slope_eps(kAddBackwardOp, negative_slope, 1.0);
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(has_residual != !shortcut_inputs.empty(), kAddBackwardOp,
              ": expected either residual or shortcut_inputs/shortcut_weights");
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  at::Tensor grad_z = at::empty(out.sizes(), out.options().memory_format(format));
  at::Tensor grad_r;  // the residual's gradient, or the shortcut projection's (written over the projection)
  std::vector<at::Tensor> grad_inputs, grad_weights;
  at::Tensor r;
  if (has_residual) {
    checks::like(kAddBackwardOp, *residual, "residual", out, "out");
    r = *residual;
  } else {
    check_shortcut(kAddBackwardOp, out, shortcut_inputs, shortcut_weights);
    check_stats(kAddBackwardOp, out, shortcut_mean, "shortcut_mean");
    check_stats(kAddBackwardOp, out, shortcut_rstd, "shortcut_rstd");
  }
  if (out.numel() == 0) {
    grad_r = at::zeros(out.sizes(), out.options().memory_format(format));
  } else if (has_residual) {
    grad_r = at::empty(out.sizes(), out.options().memory_format(format));
    backward(kAddBackwardOp, grad_out, out, r, ResidualMode::plain, rstd, shortcut_mean, shortcut_rstd,
             negative_slope, grad_z, grad_r);
  } else {
    // The recomputed projection is our own temporary: each element is read before its gradient is written at
    // the same place, so the gradient overwrites it (one full-size buffer less at the peak of the backward).
    grad_r = shortcut_projection(out, shortcut_inputs, shortcut_weights, format);
    backward(kAddBackwardOp, grad_out, out, grad_r, ResidualMode::normalized, rstd, shortcut_mean, shortcut_rstd,
             negative_slope, grad_z, grad_r);
  }
  if (has_residual) return {grad_z, grad_r, grad_inputs, grad_weights};
  for (size_t i = 0; i < shortcut_inputs.size(); ++i) {
    auto grads = shortcut_backward(grad_r, shortcut_inputs[i], shortcut_weights[i]);
    grad_inputs.push_back(std::move(grads.first));
    grad_weights.push_back(std::move(grads.second));
  }
  return {grad_z, out.new_empty({0}), grad_inputs, grad_weights};
}

}  // namespace
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("instance_norm_lrelu", &uxnet::instance_norm_lrelu_cpu);
  m.impl("instance_norm_lrelu_backward", &uxnet::instance_norm_lrelu_backward_cpu);
  m.impl("instance_norm_add_lrelu", &uxnet::instance_norm_add_lrelu_cpu);
  m.impl("instance_norm_add_lrelu_backward", &uxnet::instance_norm_add_lrelu_backward_cpu);
  m.impl("instance_norm_add_lrelu_inplace", &uxnet::instance_norm_add_lrelu_inplace_cpu);
}
