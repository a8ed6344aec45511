// CPU kernels of uxnet::ux_mlp and uxnet::ux_mlp_backward: the UX block tail
// residual + gamma * pwconv2(GELU(pwconv1(LN(y)))) fused into one pass per voxel, NCDHW-contiguous or
// channels_last_3d, float32 / bfloat16 (float32 math and stats) and float64. The per-tile kernels
// (ln_mlp_ux_mlp_kernels.h) are compiled for AVX-512, AVX2+FMA and the baseline ISA; the one matching the CPU
// is picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ln_mlp_common.h"
#include "cpu/ln_mlp_host.h"
#include "uxnet_ops.h"

#define UXNET_LN_MLP_KERNELS_HEADER "cpu/ln_mlp_ux_mlp_kernels.h"
#include "cpu/ln_mlp_isa_variants.inc"
#undef UXNET_LN_MLP_KERNELS_HEADER

namespace uxnet {

namespace {

using ln_mlp::UxMlpBackwardArgs;
using ln_mlp::UxMlpForwardArgs;

constexpr const char* kForwardOp = "uxnet::ux_mlp";
constexpr const char* kBackwardOp = "uxnet::ux_mlp_backward";

template <typename scalar_t, typename acc_t>
void run_forward(const UxMlpForwardArgs<scalar_t, acc_t>& args) {
  using Fn = ln_mlp::ChunkKernel<UxMlpForwardArgs<scalar_t, acc_t>>;
  ln_mlp::run_chunks(args, args.tiling.channels_last
                               ? UXNET_LN_MLP_ISA_KERNEL(Fn, ux_mlp_forward_chunks<scalar_t, acc_t, true>)
                               : UXNET_LN_MLP_ISA_KERNEL(Fn, ux_mlp_forward_chunks<scalar_t, acc_t, false>));
}

template <typename scalar_t, typename acc_t>
void run_backward(const UxMlpBackwardArgs<scalar_t, acc_t>& args) {
  using Fn = ln_mlp::ChunkKernel<UxMlpBackwardArgs<scalar_t, acc_t>>;
  ln_mlp::run_chunks(args, args.tiling.channels_last
                               ? UXNET_LN_MLP_ISA_KERNEL(Fn, ux_mlp_backward_chunks<scalar_t, acc_t, true>)
                               : UXNET_LN_MLP_ISA_KERNEL(Fn, ux_mlp_backward_chunks<scalar_t, acc_t, false>));
}

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
  ln_mlp::check_kernel_dtype(op, y);
  const int64_t C = y.size(1);
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&p.ln_weight, "ln_weight"}, {&p.ln_bias, "ln_bias"}, {&p.b2, "b2"}};
  for (const auto& [t, name] : vectors) {
    check_channels_first_inputs(op, y, *t, name);
    ln_mlp::check_param_shape(op, *t, name, {C});
  }
  const std::pair<const at::Tensor*, const char*> tables[] = {{&p.w1, "w1"}, {&p.b1, "b1"}, {&p.w2, "w2"}};
  for (const auto& [t, name] : tables) {
    check_channels_first_inputs(op, y, *t, name);
    ln_mlp::check_param_shape(op, *t, name, {C, 4});
  }
  if (p.has_gamma()) {
    check_channels_first_inputs(op, y, *p.gamma, "gamma");
    ln_mlp::check_param_shape(op, *p.gamma, "gamma", {C});
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
  return ln_mlp::param_table<acc_t>(table);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ux_mlp_cpu(
    const at::Tensor& y, const c10::optional<at::Tensor>& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const c10::optional<at::Tensor>& gamma, double eps) {
  const MlpParams params{ln_weight, ln_bias, w1, b1, w2, b2, gamma};
  check_params(kForwardOp, y, params);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    ln_mlp::check_like(kForwardOp, *residual, "residual", y, "y");
  }
  TORCH_CHECK(eps > 0, kForwardOp, ": expected eps > 0, got ", eps);
  const at::MemoryFormat format = suggested_memory_format(y);
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(format));
  at::Tensor mean = ln_mlp::empty_stats(y);
  at::Tensor rstd = ln_mlp::empty_stats(y);
  if (y.numel() == 0) {
    mean.fill_(NAN);  // statistics over zero channels are undefined, as for the reference mean
    rstd.fill_(NAN);
    return {out, mean, rstd};
  }
  const at::Tensor yc = y.contiguous(format);
  const at::Tensor rc = has_residual ? residual->contiguous(format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "uxnet_ux_mlp_cpu", [&] {
    using acc_t = ln_mlp::acc_type<scalar_t>;
    const at::Tensor table = pack_params<acc_t>(params);
    UxMlpForwardArgs<scalar_t, acc_t> args{yc.data_ptr<scalar_t>(),
                                           has_residual ? rc.data_ptr<scalar_t>() : nullptr,
                                           table.data_ptr<acc_t>(),
                                           out.data_ptr<scalar_t>(),
                                           mean.data_ptr<acc_t>(),
                                           rstd.data_ptr<acc_t>(),
                                           static_cast<acc_t>(eps),
                                           ln_mlp::make_tiling(yc, format == at::MemoryFormat::ChannelsLast3d)};
    run_forward(args);
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
  ln_mlp::check_like(kBackwardOp, grad_out, "grad_out", y, "y");
  ln_mlp::check_stats(kBackwardOp, y, mean, "mean");
  ln_mlp::check_stats(kBackwardOp, y, rstd, "rstd");
  const at::MemoryFormat format = suggested_memory_format(grad_out);
  const int64_t C = y.size(1);
  at::Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(format));
  at::Tensor sums = at::zeros({ln_mlp::kMlpParams, C}, y.options().dtype(at::kDouble));
  if (y.numel() != 0) {
    const at::Tensor gc = grad_out.contiguous(format);
    const at::Tensor yc = y.contiguous(format);
    const ln_mlp::VoxelTiling tiling = ln_mlp::make_tiling(yc, format == at::MemoryFormat::ChannelsLast3d);
    at::Tensor partials = ln_mlp::empty_partials(y, tiling, ln_mlp::kMlpParams);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "uxnet_ux_mlp_backward_cpu", [&] {
      using acc_t = ln_mlp::acc_type<scalar_t>;
      const at::Tensor table = pack_params<acc_t>(params);
      const at::Tensor mean_c = mean.contiguous();
      const at::Tensor rstd_c = rstd.contiguous();
      UxMlpBackwardArgs<scalar_t, acc_t> args{gc.data_ptr<scalar_t>(),   yc.data_ptr<scalar_t>(),
                                              table.data_ptr<acc_t>(),   mean_c.data_ptr<acc_t>(),
                                              rstd_c.data_ptr<acc_t>(),  grad_y.data_ptr<scalar_t>(),
                                              partials.data_ptr<double>(), tiling};
      run_backward(args);
    });
    sums = ln_mlp::sum_partials_in_order(partials);
  }
  const at::Tensor grads = sums.to(y.scalar_type());
  auto rows = [&](int64_t first, int64_t count) {
    return count == 1 ? grads[first].clone() : grads.narrow(0, first, count).t().contiguous();
  };
  at::Tensor grad_gamma = params.has_gamma() ? rows(ln_mlp::kGamma, 1) : y.new_empty({0});
  return {grad_y,           rows(ln_mlp::kLnWeight, 1), rows(ln_mlp::kLnBias, 1), rows(ln_mlp::kW1, 4),
          rows(ln_mlp::kB1, 4), rows(ln_mlp::kW2, 4),   rows(ln_mlp::kB2, 1),     grad_gamma};
}

}  // namespace
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("ux_mlp", &uxnet::ux_mlp_cpu);
  m.impl("ux_mlp_backward", &uxnet::ux_mlp_backward_cpu);
}
