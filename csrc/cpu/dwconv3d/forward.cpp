// uxnet::dwconv3d on the CPU: block the weights, then let the driver (drivers.h) stream x's depth
// planes through the ISA kernels into an output in x's memory format.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

template <typename scalar_t>
void forward_typed(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   at::Tensor& out) {
  using Tc = compute_t<scalar_t>;
  const KernelTable<Tc>& kernels = kernels_for<Tc>(selected_isa_for("uxnet::dwconv3d"));
  const Geometry g = make_geometry(x, weight, kernels.lanes);
  std::vector<Tc> w_blocked(static_cast<size_t>(g.Cb * g.taps() * g.lanes));
  std::vector<Tc> b_blocked(static_cast<size_t>(g.Cb * g.lanes));
  const bool has_bias = bias.has_value() && bias->defined();
  block_weight(weight.contiguous().data_ptr<scalar_t>(), g, /*flip=*/false, w_blocked.data());
  if (has_bias) block_bias(bias->contiguous().data_ptr<scalar_t>(), g, b_blocked.data());
  conv_volume(kernels, g, x.data_ptr<scalar_t>(), strides_of(x), w_blocked.data(),
              has_bias ? b_blocked.data() : nullptr, out.data_ptr<scalar_t>(), strides_of(out));
  const std::vector<uint8_t> bad_taps = nonfinite_taps(weight.contiguous().data_ptr<scalar_t>(), g);
  if (!bad_taps.empty()) poison_channels(bad_taps, g, out.data_ptr<scalar_t>(), strides_of(out));
}

at::Tensor dwconv3d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  checks::dwconv3d_inputs("uxnet::dwconv3d", x, weight, bias);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(suggested_memory_format(x)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "uxnet::dwconv3d",
                                  [&] { forward_typed<scalar_t>(x, weight, bias, out); });
  return out;
}

}  // namespace
}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("dwconv3d", &uxnet::cpu::dwconv3d::dwconv3d_cpu);
}
