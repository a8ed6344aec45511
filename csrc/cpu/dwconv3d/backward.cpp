// uxnet::dwconv3d_backward on the CPU.
//   grad_x      = the forward convolution of grad_out with the kernel flipped along every axis (non-finite weights:
//                 nonfinite.h);
//   grad_weight = per-task partial sums of grad_out * shifted x over a fixed partition of (channel block,
//                 slice of the N*D planes), reduced in task order: bit-identical for any thread count;
//   grad_bias   = the same tasks' sums of grad_out, in float64 across rows, planes and tasks.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "common/arg_checks.h"
#include "cpu/common/isa_check.h"
#include "cpu/dwconv3d/drivers.h"
#include "cpu/dwconv3d/nonfinite.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {
namespace {

constexpr const char* kOp = "uxnet::dwconv3d_backward";

// Target number of weight-gradient tasks: enough to keep every core busy, few enough that the partial sums
// stay small. A function of the shapes only, never of the thread count (determinism).
constexpr int64_t kWeightGradTasks = 64;

int64_t weight_grad_groups(const Geometry& g) {
  const int64_t planes = g.N * g.D;
  const int64_t wanted = (kWeightGradTasks + g.Cb - 1) / g.Cb;
  return std::max<int64_t>(1, std::min(planes, wanted));
}

template <typename scalar_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    std::array<bool, 3> mask, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using Tc = compute_t<scalar_t>;
  const KernelTable<Tc>& kernels = kernels_for<Tc>(selected_isa_for(kOp));
  const Geometry g = make_geometry(x, weight, kernels.lanes);

  if (mask[0]) {
    const at::Tensor w = weight.contiguous();
    std::vector<Tc> w_flipped(static_cast<size_t>(g.Cb * g.taps() * g.lanes));
    block_weight(w.data_ptr<scalar_t>(), g, /*flip=*/true, w_flipped.data());
    const std::vector<uint8_t> bad_taps = nonfinite_taps(w.data_ptr<scalar_t>(), g);
    if (!bad_taps.empty()) zero_nonfinite_taps(bad_taps, g, /*flipped=*/true, w_flipped.data());
    conv_volume(kernels, g, grad_out.data_ptr<scalar_t>(), strides_of(grad_out), w_flipped.data(),
                static_cast<const Tc*>(nullptr), grad_x.data_ptr<scalar_t>(), strides_of(grad_x));
    if (!bad_taps.empty()) poison_reached_voxels(bad_taps, g, grad_x.data_ptr<scalar_t>(), strides_of(grad_x));
  }
  if (!mask[1] && !mask[2]) return;

  const int64_t groups = weight_grad_groups(g);
  const int64_t V = g.lanes;
  const int64_t taps = g.taps();
  const int64_t task_elems = taps * V;
  std::vector<Tc> partial(mask[1] ? static_cast<size_t>(g.Cb * groups * task_elems) : 0);
  std::vector<double> bias_partial(mask[2] ? static_cast<size_t>(g.Cb * groups * V) : 0);
  weight_grad_partials(kernels, g, grad_out.data_ptr<scalar_t>(), strides_of(grad_out), x.data_ptr<scalar_t>(),
                       strides_of(x), groups, mask[1] ? partial.data() : nullptr,
                       mask[2] ? bias_partial.data() : nullptr);

  // Reduce the partials in task order (fixed), one output element per (channel, tap).
  scalar_t* gw = mask[1] ? grad_weight.data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = mask[2] ? grad_bias.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first_task = (c / V) * groups;
      if (gw) {
        const Tc* base = partial.data() + first_task * task_elems + (c % V);
        for (int64_t t = 0; t < taps; ++t) {
          Tc sum = 0;
          for (int64_t k = 0; k < groups; ++k) sum += base[k * task_elems + t * V];
          gw[c * taps + t] = static_cast<scalar_t>(sum);
        }
      }
      if (gb) {
        double sum = 0;
        for (int64_t k = 0; k < groups; ++k) sum += bias_partial[(first_task + k) * V + c % V];
        gb[c] = static_cast<scalar_t>(sum);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv3d_backward_cpu(const at::Tensor& grad_out,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     std::array<bool, 3> mask) {
  checks::dwconv3d_inputs(kOp, x, weight, c10::nullopt);
  checks::like(kOp, grad_out, "grad_out", x, "x");

  const auto empty_grad = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = mask[0] ? at::empty(grad_out.sizes(),
                                          grad_out.options().memory_format(suggested_memory_format(grad_out)))
                              : empty_grad();
  at::Tensor grad_weight = mask[1] ? at::empty(weight.sizes(), weight.options()) : empty_grad();
  at::Tensor grad_bias = mask[2] ? at::empty({x.size(1)}, x.options()) : empty_grad();

  if (x.numel() == 0) {  // no voxels: grad_x is empty, grad_weight / grad_bias are sums over nothing
    if (mask[1]) grad_weight.zero_();
    if (mask[2]) grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  if (!mask[0] && !mask[1] && !mask[2]) return {grad_x, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kOp, [&] {
    backward_typed<scalar_t>(grad_out, x, weight, mask, grad_x, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("dwconv3d_backward", &uxnet::cpu::dwconv3d::dwconv3d_backward_cpu);
}
