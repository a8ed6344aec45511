#include "common/arg_checks.h"

#include <c10/util/Exception.h>

#include <vector>

#include "uxnet_ops.h"

namespace uxnet {
namespace checks {

void five_dim(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 5, op, ": expected ", name, " of shape (N, C, D, H, W), got ", t.dim(),
              "-d tensor of shape ", t.sizes());
}

void floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to have a floating dtype (float32, bfloat16, float16 or float64), got ", t.scalar_type());
}

void shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
}

void same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " dtype ", like.scalar_type(),
              " (the dtype of ", like_name, "), got ", t.scalar_type());
}

void same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", t.device());
}

void like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), " (the shape of ",
              like_name, "), got ", t.sizes());
  same_dtype(op, t, name, like, like_name);
  same_device(op, t, name, like);
}

void positive_eps(const char* op, double eps) { TORCH_CHECK(eps > 0, op, ": expected eps > 0, got ", eps); }

void dwconv3d_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias) {
  five_dim(op, x, "x");
  floating(op, x, "x");
  TORCH_CHECK(weight.dim() == 5 && weight.size(1) == 1, op,
              ": expected weight of shape (C, 1, KD, KH, KW), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) == x.size(1), op, ": expected weight with ", x.size(1),
              " output channels (one per input channel), got ", weight.size(0));
  for (int d = 2; d < 5; ++d) {
    TORCH_CHECK(weight.size(d) % 2 == 1, op, ": expected odd kernel sizes, got ", weight.sizes().slice(2));
  }
  same_dtype(op, weight, "weight", x, "x");
  same_device(op, weight, "weight", x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), op, ": expected bias of shape (", x.size(1),
                "), got ", bias->sizes());
    same_dtype(op, *bias, "bias", x, "x");
    same_device(op, *bias, "bias", x);
  }
}

void conv3d_3x3x3_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  five_dim(op, x, "x");
  floating(op, x, "x");
  TORCH_CHECK(weight.dim() == 5 && weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(4) == 3,
              op, ": expected weight of shape (C_out, ", x.size(1), ", 3, 3, 3), got ", weight.sizes());
  same_dtype(op, weight, "weight", x, "x");
  same_device(op, weight, "weight", x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": expected bias of shape (",
                weight.size(0), "), got ", bias->sizes());
    same_dtype(op, *bias, "bias", x, "x");
    same_device(op, *bias, "bias", x);
  }
}

void channels_first_input(const char* op, const at::Tensor& x, const char* name) {
  five_dim(op, x, name);
  floating(op, x, name);
}

void channel_param(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& param,
                   const char* name) {
  TORCH_CHECK(param.size(0) == x.size(1), op, ": expected ", name, " with ", x.size(1),
              " channels along dim 0, got shape ", param.sizes());
  same_dtype(op, param, name, x, x_name);
  same_device(op, param, name, x);
}

void voxel_stats(const char* op, const at::Tensor& x, const at::Tensor& stats, const char* name) {
  const std::vector<int64_t> expected{x.size(0), x.size(2), x.size(3), x.size(4)};
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(expected), op, ": expected ", name, " of shape ",
              at::IntArrayRef(expected), " (N, D, H, W), got ", stats.sizes());
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  TORCH_CHECK(stats.scalar_type() == dtype, op, ": expected ", name, " dtype ", dtype, " for ", x.scalar_type(),
              " inputs, got ", stats.scalar_type());
  same_device(op, stats, name, x);
}

}  // namespace checks
}  // namespace uxnet
