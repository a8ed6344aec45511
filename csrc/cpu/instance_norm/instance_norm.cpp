// CPU kernels of uxnet::instance_norm_lrelu and uxnet::instance_norm_add_lrelu (+ backward): instance norm
// (statistics per (n, c) over D*H*W, no affine) fused with LeakyReLU and, for the residual-block tail, the residual
// add or the normalised 1x1x1 projection shortcut. NCDHW-contiguous or channels_last_3d; float32, bfloat16 (float32
// math, float32 statistics) and float64. The backward recovers the normalised values from the saved output by
// inverting the LeakyReLU; the shortcut convolution (ATen's) is recomputed instead of saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/instance_norm/instance_norm_kernels.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace {

using instance_norm::Layout;
using instance_norm::ResidualMode;
using instance_norm::Tensors;

constexpr const char* kForwardOp = "uxnet::instance_norm_lrelu";
constexpr const char* kBackwardOp = "uxnet::instance_norm_lrelu_backward";
constexpr const char* kAddForwardOp = "uxnet::instance_norm_add_lrelu";
constexpr const char* kAddBackwardOp = "uxnet::instance_norm_add_lrelu_backward";
// channels_last_3d: voxels per chunk of the per-channel sums (chunks depend on the shape only).
constexpr int64_t kMaxChunksPerItem = 64;
constexpr int64_t kMinChunkVoxels = 256;

template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

at::ScalarType stats_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 5, op, ": expected ", name, " of shape (N, C, D, H, W), got ", x.dim(),
              "-d tensor of shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": the CPU kernel supports float32, bfloat16 and float64 inputs, got ", dtype);
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), " (the shape of ",
              like_name, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", t.device());
}

void check_slope_eps(const char* op, double slope, double eps) {
  TORCH_CHECK(slope > 0 && std::isfinite(slope), op,
              ": expected a finite negative_slope > 0 (the backward inverts the LeakyReLU), got ", slope);
  TORCH_CHECK(eps > 0, op, ": expected eps > 0, got ", eps);
}

void check_stats(const char* op, const at::Tensor& x, const at::Tensor& stats, const char* name) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) == x.size(1), op, ": expected ",
              name, " of shape (", x.size(0), ", ", x.size(1), ") (N, C), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == stats_dtype(x), op, ": expected ", name, " dtype ", stats_dtype(x), " for ",
              x.scalar_type(), " inputs, got ", stats.scalar_type());
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
  const int64_t by_count = (l.voxels + kMaxChunksPerItem - 1) / kMaxChunksPerItem;
  return std::max(by_count, kMinChunkVoxels);
}

// channels_last_3d: runs fn(n, v0, v1, chunk) over every (batch item, voxel chunk), in parallel.
template <typename Fn>
void for_each_voxel_chunk(const Layout& l, Fn fn) {
  const int64_t per_chunk = chunk_voxels(l);
  const int64_t chunks = (l.voxels + per_chunk - 1) / per_chunk;
  at::parallel_for(0, l.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, k = i % chunks;
      fn(n, k * per_chunk, std::min(l.voxels, (k + 1) * per_chunk), k);
    }
  });
}

int64_t voxel_chunks(const Layout& l) {
  const int64_t per_chunk = chunk_voxels(l);
  return (l.voxels + per_chunk - 1) / per_chunk;
}

// Per-(n, c) mean and rstd of x (canonical layout).
template <typename scalar_t>
void compute_stats(const at::Tensor& x, const Layout& l, double eps, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* rp = rstd.data_ptr<acc_t>();
  const int64_t C = l.channels;
  if (!l.channels_last) {
    at::parallel_for(0, l.batch * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        double shift, sums[2];
        instance_norm::plane_shifted_sums(xp + p * l.voxels, l.voxels, &shift, sums);
        instance_norm::finalize_stats(shift, sums[0], sums[1], l.voxels, eps, mp + p, rp + p);
      }
    });
    return;
  }
  const int64_t chunks = voxel_chunks(l);
  std::vector<double> partial(static_cast<size_t>(l.batch * chunks * 2 * C), 0.0);
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t k) {
    double* s = partial.data() + (n * chunks + k) * 2 * C;
    instance_norm::voxel_shifted_sums(xp + n * l.voxels * C, C, v0, v1, s, s + C);
  });
  for (int64_t n = 0; n < l.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        s1 += partial[(n * chunks + k) * 2 * C + c];
        s2 += partial[(n * chunks + k) * 2 * C + C + c];
      }
      instance_norm::finalize_stats(instance_norm::to_double(xp[n * l.voxels * C + c]), s1, s2, l.voxels, eps,
                                    mp + n * C + c, rp + n * C + c);
    }
  }
}

template <typename scalar_t>
void run_forward(const Tensors<scalar_t, acc_type<scalar_t>>& t) {
  const Layout& l = t.layout;
  if (!l.channels_last) {
    at::parallel_for(0, l.batch * l.channels, 1,
                     [&](int64_t begin, int64_t end) { instance_norm::forward_planes(t, begin, end); });
  } else {
    for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t) {
      instance_norm::forward_voxels(t, n, v0, v1);
    });
  }
}

template <typename scalar_t>
void run_backward(const Tensors<scalar_t, acc_type<scalar_t>>& t) {
  using acc_t = acc_type<scalar_t>;
  using Coefficients = instance_norm::BackwardCoefficients<acc_t>;
  const Layout& l = t.layout;
  const int64_t C = l.channels;
  if (!l.channels_last) {
    at::parallel_for(0, l.batch * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        double sums[3];
        instance_norm::backward_plane_sums(t, p, sums);
        instance_norm::backward_plane_apply(t, p, instance_norm::backward_coefficients<acc_t>(sums, l.voxels));
      }
    });
    return;
  }
  const int64_t chunks = voxel_chunks(l);
  std::vector<double> partial(static_cast<size_t>(l.batch * chunks * 3 * C), 0.0);
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t k) {
    instance_norm::backward_voxel_sums(t, n, v0, v1, partial.data() + (n * chunks + k) * 3 * C);
  });
  std::vector<Coefficients> coefficients(static_cast<size_t>(l.batch * C));
  for (int64_t n = 0; n < l.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double sums[3] = {0.0, 0.0, 0.0};
      for (int64_t k = 0; k < chunks; ++k) {
        for (int j = 0; j < 3; ++j) sums[j] += partial[((n * chunks + k) * 3 + j) * C + c];
      }
      coefficients[n * C + c] = instance_norm::backward_coefficients<acc_t>(sums, l.voxels);
    }
  }
  for_each_voxel_chunk(l, [&](int64_t n, int64_t v0, int64_t v1, int64_t) {
    instance_norm::backward_voxel_apply(t, n, v0, v1, coefficients.data() + n * C);
  });
}

at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(stats_dtype(x)));
}

// sum_i conv3d(x_i, w_i) in `format`: the projection shortcut before its instance norm.
at::Tensor shortcut_projection(at::TensorList inputs, at::TensorList weights, at::MemoryFormat format) {
  at::Tensor sum = at::conv3d(inputs[0], weights[0]);
  for (size_t i = 1; i < inputs.size(); ++i) sum.add_(at::conv3d(inputs[i], weights[i]));
  return sum.contiguous(format);
}

template <typename scalar_t>
Tensors<scalar_t, acc_type<scalar_t>> forward_tensors(const at::Tensor& zc, const at::Tensor& r, ResidualMode mode,
                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                      const at::Tensor& r_mean, const at::Tensor& r_rstd,
                                                      at::Tensor& out, double slope, const Layout& l) {
  using acc_t = acc_type<scalar_t>;
  const bool norm = mode == ResidualMode::normalized;
  return {zc.data_ptr<scalar_t>(),
          nullptr,
          nullptr,
          mode == ResidualMode::none ? nullptr : r.data_ptr<scalar_t>(),
          mean.data_ptr<acc_t>(),
          rstd.data_ptr<acc_t>(),
          norm ? r_mean.data_ptr<acc_t>() : nullptr,
          norm ? r_rstd.data_ptr<acc_t>() : nullptr,
          out.data_ptr<scalar_t>(),
          nullptr,
          mode,
          static_cast<acc_t>(slope),
          l};
}

// out = lrelu(IN(z) + r_hat); fills mean/rstd of z, and r_mean/r_rstd of r when mode is normalized.
void forward(const at::Tensor& z, const at::Tensor& r, ResidualMode mode, double slope, double eps,
             at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, at::Tensor& r_mean, at::Tensor& r_rstd) {
  const at::MemoryFormat format = suggested_memory_format(z);
  const at::Tensor zc = z.contiguous(format);
  const Layout l = layout_of(zc, format);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "uxnet_instance_norm_forward_cpu", [&] {
    compute_stats<scalar_t>(zc, l, eps, mean, rstd);
    if (mode == ResidualMode::normalized) compute_stats<scalar_t>(r, l, eps, r_mean, r_rstd);
    run_forward<scalar_t>(forward_tensors<scalar_t>(zc, r, mode, mean, rstd, r_mean, r_rstd, out, slope, l));
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
  forward(x, unused, ResidualMode::none, negative_slope, eps, out, mean, rstd, unused, unused);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> instance_norm_add_lrelu_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& residual, at::TensorList shortcut_inputs,
    at::TensorList shortcut_weights, double negative_slope, double eps) {
  check_input(kAddForwardOp, z, "z");
  check_slope_eps(kAddForwardOp, negative_slope, eps);
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(has_residual != !shortcut_inputs.empty(), kAddForwardOp,
              ": expected either residual or shortcut_inputs/shortcut_weights");
  const at::MemoryFormat format = suggested_memory_format(z);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(format));
  at::Tensor mean = empty_stats(z);
  at::Tensor rstd = empty_stats(z);
  at::Tensor r_mean = has_residual ? z.new_empty({0}, z.options().dtype(stats_dtype(z))) : empty_stats(z);
  at::Tensor r_rstd = has_residual ? z.new_empty({0}, z.options().dtype(stats_dtype(z))) : empty_stats(z);
  at::Tensor r;
  if (has_residual) {
    check_like(kAddForwardOp, *residual, "residual", z, "z");
    r = residual->contiguous(format);
  } else {
    check_shortcut(kAddForwardOp, z, shortcut_inputs, shortcut_weights);
  }
  if (z.numel() == 0) {
    for (at::Tensor* s : {&mean, &rstd, &r_mean, &r_rstd}) s->fill_(NAN);
    return {out, mean, rstd, r_mean, r_rstd};
  }
  if (!has_residual) r = shortcut_projection(shortcut_inputs, shortcut_weights, format);
  forward(z, r, has_residual ? ResidualMode::plain : ResidualMode::normalized, negative_slope, eps,
          out, mean, rstd, r_mean, r_rstd);
  return {out, mean, rstd, r_mean, r_rstd};
}

// grad_z (and grad_r for a residual) from grad_out and the saved output.
void backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& r,
              ResidualMode mode, const at::Tensor& rstd, const at::Tensor& r_mean, const at::Tensor& r_rstd,
              double slope, at::Tensor& grad_z, at::Tensor& grad_r) {
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const at::Tensor gc = grad_out.contiguous(format);
  const at::Tensor oc = out.contiguous(format);
  const at::Tensor rc = mode == ResidualMode::none ? r : r.contiguous(format);
  const Layout l = layout_of(gc, format);
  const bool norm = mode == ResidualMode::normalized;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "uxnet_instance_norm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor rstd_c = rstd.contiguous();
    const at::Tensor r_mean_c = norm ? r_mean.contiguous() : r_mean;
    const at::Tensor r_rstd_c = norm ? r_rstd.contiguous() : r_rstd;
    Tensors<scalar_t, acc_t> t{nullptr,
                               oc.data_ptr<scalar_t>(),
                               gc.data_ptr<scalar_t>(),
                               mode == ResidualMode::none ? nullptr : rc.data_ptr<scalar_t>(),
                               nullptr,
                               rstd_c.data_ptr<acc_t>(),
                               norm ? r_mean_c.data_ptr<acc_t>() : nullptr,
                               norm ? r_rstd_c.data_ptr<acc_t>() : nullptr,
                               grad_z.data_ptr<scalar_t>(),
                               mode == ResidualMode::none ? nullptr : grad_r.data_ptr<scalar_t>(),
                               mode,
                               static_cast<acc_t>(slope),
                               l};
    run_backward<scalar_t>(t);
  });
}

at::Tensor instance_norm_lrelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& rstd,
                                            double negative_slope) {
  check_input(kBackwardOp, out, "out");
  check_like(kBackwardOp, grad_out, "grad_out", out, "out");
  check_stats(kBackwardOp, out, rstd, "rstd");
  check_slope_eps(kBackwardOp, negative_slope, 1.0);
  at::Tensor grad_x = at::empty(out.sizes(), out.options().memory_format(suggested_memory_format(grad_out)));
  if (out.numel() == 0) return grad_x;
  at::Tensor none, unused;
  backward(grad_out, out, none, ResidualMode::none, rstd, none, none, negative_slope, grad_x, unused);
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
instance_norm_add_lrelu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                     const std::optional<at::Tensor>& residual, at::TensorList shortcut_inputs,
                                     at::TensorList shortcut_weights, const at::Tensor& rstd,
                                     const at::Tensor& shortcut_mean, const at::Tensor& shortcut_rstd,
                                     double negative_slope) {
  check_input(kAddBackwardOp, out, "out");
  check_like(kAddBackwardOp, grad_out, "grad_out", out, "out");
  check_stats(kAddBackwardOp, out, rstd, "rstd");
  check_slope_eps(kAddBackwardOp, negative_slope, 1.0);
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(has_residual != !shortcut_inputs.empty(), kAddBackwardOp,
              ": expected either residual or shortcut_inputs/shortcut_weights");
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  at::Tensor grad_z = at::empty(out.sizes(), out.options().memory_format(format));
  at::Tensor grad_r = at::empty(out.sizes(), out.options().memory_format(format));
  std::vector<at::Tensor> grad_inputs, grad_weights;
  at::Tensor r;
  if (has_residual) {
    check_like(kAddBackwardOp, *residual, "residual", out, "out");
    r = *residual;
  } else {
    check_shortcut(kAddBackwardOp, out, shortcut_inputs, shortcut_weights);
    check_stats(kAddBackwardOp, out, shortcut_mean, "shortcut_mean");
    check_stats(kAddBackwardOp, out, shortcut_rstd, "shortcut_rstd");
  }
  if (out.numel() > 0) {
    if (!has_residual) r = shortcut_projection(shortcut_inputs, shortcut_weights, format);
    backward(grad_out, out, r, has_residual ? ResidualMode::plain : ResidualMode::normalized,
             rstd, shortcut_mean, shortcut_rstd, negative_slope, grad_z, grad_r);
  } else {
    grad_r.zero_();
  }
  if (has_residual) return {grad_z, grad_r, grad_inputs, grad_weights};
  for (size_t i = 0; i < shortcut_inputs.size(); ++i) {
    const at::Tensor& x = shortcut_inputs[i];
    const at::Tensor& w = shortcut_weights[i];
    auto grads = at::convolution_backward(grad_r, x, w, std::nullopt, {1, 1, 1}, {0, 0, 0}, {1, 1, 1}, false,
                                          {0, 0, 0}, 1, {true, true, false});
    grad_inputs.push_back(std::get<0>(grads).contiguous(suggested_memory_format(x)));
    grad_weights.push_back(std::get<1>(grads).contiguous());
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
}
