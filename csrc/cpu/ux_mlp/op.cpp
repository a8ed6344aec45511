// CPU ops uxnet::ux_mlp and uxnet::ux_mlp_backward: the UX block tail
// residual + gamma * pwconv2(GELU(pwconv1(LN(y)))) fused into one pass per voxel, NCDHW-contiguous or
// channels_last_3d, float32 / bfloat16 (float32 math and stats) and float64. Checks, allocation and threading
// here; the chunk kernels (kernels.h, compiled per ISA variant in kernels.cpp) run with the variant
// simd::selected_isa() picks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "common/arg_checks.h"
#include "cpu/common/host.h"
#include "cpu/common/isa_check.h"
#include "cpu/ux_mlp/params.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace ux_mlp {
namespace {

constexpr const char* kForwardOp = "uxnet::ux_mlp";
constexpr const char* kBackwardOp = "uxnet::ux_mlp_backward";

struct MlpParams {
  const at::Tensor& ln_weight;
  const at::Tensor& ln_bias;
  const at::Tensor& w1;
  const at::Tensor& b1;
  const at::Tensor& w2;
  const at::Tensor& b2;
  const c10::optional<at::Tensor>& gamma;

  bool has_gamma() const { return gamma.has_value() && gamma->defined(); }
};

void check_params(const char* op, const at::Tensor& y, const MlpParams& p) {
  host::check_kernel_dtype(op, y);
  checks::channels_first_input(op, y, "y");
  const int64_t C = y.size(1);
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&p.ln_weight, "ln_weight"}, {&p.ln_bias, "ln_bias"}, {&p.b2, "b2"}};
  for (const auto& [t, name] : vectors) {
    checks::channel_param(op, y, "y", *t, name);
    checks::shape(op, *t, name, {C});
  }
  const std::pair<const at::Tensor*, const char*> tables[] = {{&p.w1, "w1"}, {&p.b1, "b1"}, {&p.w2, "w2"}};
  for (const auto& [t, name] : tables) {
    checks::channel_param(op, y, "y", *t, name);
    checks::shape(op, *t, name, {C, 4});
  }
  if (p.has_gamma()) {
    checks::channel_param(op, y, "y", *p.gamma, "gamma");
    checks::shape(op, *p.gamma, "gamma", {C});
  }
}

// [kMlpParams][C] table in the math type: ln_weight, ln_bias, w1^T, b1^T, w2^T, b2, gamma (ones if None).
template <typename acc_t>
at::Tensor pack_params(const MlpParams& p) {
  const int64_t C = p.ln_weight.size(0);
  const at::Tensor gamma = p.has_gamma() ? *p.gamma : at::ones_like(p.b2);
  const at::Tensor table = at::cat({p.ln_weight.view({1, C}), p.ln_bias.view({1, C}), p.w1.t(), p.b1.t(),
                                    p.w2.t(), p.b2.view({1, C}), gamma.view({1, C})},
                                   0);
  return host::param_table<acc_t>(table);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ux_mlp_cpu(
    const at::Tensor& y, const c10::optional<at::Tensor>& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const c10::optional<at::Tensor>& gamma, double eps) {
  const MlpParams params{ln_weight, ln_bias, w1, b1, w2, b2, gamma};
  check_params(kForwardOp, y, params);
  const simd::Isa isa = selected_isa_for(kForwardOp);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    checks::like(kForwardOp, *residual, "residual", y, "y");
  }
  checks::positive_eps(kForwardOp, eps);
  const at::MemoryFormat format = suggested_memory_format(y);
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(format));
  at::Tensor mean = host::empty_stats(y);
  at::Tensor rstd = host::empty_stats(y);
  if (y.numel() == 0) {
    mean.fill_(NAN);  // statistics over zero channels are undefined, as for the reference mean
    rstd.fill_(NAN);
    return {out, mean, rstd};
  }
  const at::Tensor yc = y.contiguous(format);
  const at::Tensor rc = has_residual ? residual->contiguous(format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "uxnet_ux_mlp_cpu", [&] {
    using acc_t = host::acc_type<scalar_t>;
    using kernel_t = host::kernel_type<scalar_t>;
    const at::Tensor table = pack_params<acc_t>(params);
    const ForwardArgs<kernel_t, acc_t> args{host::kernel_data<scalar_t>(yc),
                                            has_residual ? host::kernel_data<scalar_t>(rc) : nullptr,
                                            table.data_ptr<acc_t>(),
                                            host::kernel_data_mut<scalar_t>(out),
                                            mean.data_ptr<acc_t>(),
                                            rstd.data_ptr<acc_t>(),
                                            static_cast<acc_t>(eps),
                                            host::make_tiling(yc, format, /*row_blocks=*/false)};
    host::run_chunks(args, kernels<kernel_t, acc_t>(isa, args.tiling.channels_last, args.tiling.channels).forward);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ux_mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& ln_weight,
                    const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const c10::optional<at::Tensor>& gamma, const at::Tensor& mean,
                    const at::Tensor& rstd) {
  const MlpParams params{ln_weight, ln_bias, w1, b1, w2, b2, gamma};
  check_params(kBackwardOp, y, params);
  const simd::Isa isa = selected_isa_for(kBackwardOp);
  checks::like(kBackwardOp, grad_out, "grad_out", y, "y");
  checks::voxel_stats(kBackwardOp, y, mean, "mean");
  checks::voxel_stats(kBackwardOp, y, rstd, "rstd");
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const int64_t C = y.size(1);
  at::Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(format));
  at::Tensor sums = at::zeros({kMlpParams, C}, y.options().dtype(at::kDouble));
  if (y.numel() != 0) {
    const at::Tensor gc = grad_out.contiguous(format);
    const at::Tensor yc = y.contiguous(format);
    const voxel_tiling::VoxelTiling tiling = host::make_tiling(yc, format, /*row_blocks=*/false);
    at::Tensor partials = host::empty_partials(y, tiling, kMlpParams);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "uxnet_ux_mlp_backward_cpu", [&] {
      using acc_t = host::acc_type<scalar_t>;
      using kernel_t = host::kernel_type<scalar_t>;
      const at::Tensor table = pack_params<acc_t>(params);
      const at::Tensor mean_c = mean.contiguous();
      const at::Tensor rstd_c = rstd.contiguous();
      const BackwardArgs<kernel_t, acc_t> args{host::kernel_data<scalar_t>(gc),
                                               host::kernel_data<scalar_t>(yc),
                                               table.data_ptr<acc_t>(),
                                               mean_c.data_ptr<acc_t>(),
                                               rstd_c.data_ptr<acc_t>(),
                                               host::kernel_data_mut<scalar_t>(grad_y),
                                               partials.data_ptr<double>(),
                                               tiling};
      host::run_chunks(args, kernels<kernel_t, acc_t>(isa, tiling.channels_last, tiling.channels).backward);
    });
    sums = host::sum_partials_in_order(partials);
  }
  const at::Tensor grads = sums.to(y.scalar_type());
  auto rows = [&](int64_t first, int64_t count) {
    return count == 1 ? grads[first].clone() : grads.narrow(0, first, count).t().contiguous();
  };
  at::Tensor grad_gamma = params.has_gamma() ? rows(kGamma, 1) : y.new_empty({0});
  return {grad_y,       rows(kLnWeight, 1), rows(kLnBias, 1), rows(kW1, 4),
          rows(kB1, 4), rows(kW2, 4),       rows(kB2, 1),     grad_gamma};
}

}  // namespace
}  // namespace ux_mlp
}  // namespace cpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("ux_mlp", &uxnet::cpu::ux_mlp::ux_mlp_cpu);
  m.impl("ux_mlp_backward", &uxnet::cpu::ux_mlp::ux_mlp_backward_cpu);
}
