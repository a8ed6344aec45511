"""layer_norm_channels_first: LayerNorm over the channels of (N, C, D, H, W), the official channels-first LayerNorm.

Operators: ``uxnet::layer_norm_channels_first`` / ``uxnet::layer_norm_channels_first_backward`` (C++:
csrc/cpu/layer_norm_channels_first, csrc/cuda/layer_norm_channels_first) and
``uxnet::layer_norm_channels_first_triton`` / ``..._triton_backward`` (uxnet_kernels/triton/layer_norm_channels_first.py).
"""

import torch

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import EMPTY_GRAD_SHAPE, empty_like, empty_result, grad_or_empty, refuse_double_backward, voxel_stats_like

OP = "layer_norm_channels_first"
# Device types whose autocast puts layer_norm on the float32 list (PyTorch's autocast_mode.cpp).
FLOAT32_AUTOCAST_DEVICES = ("cuda", "xpu")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, D, H, W), biased variance, as the official ``LayerNorm(channels_first)``."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + eps)
    return weight[:, None, None, None] * normed + bias[:, None, None, None]


def check_args(x, weight, bias, eps) -> None:
    validation.check_tensor(OP, "x", x, 5, "(N, C, D, H, W)")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        validation.check_tensor(OP, name, t, 1, f"({channels},)")
        if t.shape[0] != channels:
            validation.fail(OP, f"expected {name} of shape ({channels},), got {tuple(t.shape)}")
    validation.check_same_dtype_device(OP, "x", x, weight=weight, bias=bias)
    validation.check_eps(OP, eps)


def autograd_rule(backward_op):
    """(backward, setup_context) for a forward ``(x, weight, bias, eps) -> (out, mean, rstd)`` whose
    ``backward_op(grad_out, x, weight, mean, rstd, output_mask) -> (grad_x, grad_weight, grad_bias)``."""

    def setup_context(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        refuse_double_backward(OP, grad_out, x, weight)
        mask = list(ctx.needs_input_grad[:3])
        grads = backward_op(grad_out, x, weight, mean, rstd, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,)

    return backward, setup_context


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::layer_norm_channels_first")
    def _fake(x, weight, bias, eps):
        return (empty_like(x), *voxel_stats_like(x))

    @torch.library.register_fake("uxnet::layer_norm_channels_first_backward")
    def _backward_fake(grad_out, x, weight, mean, rstd, output_mask):
        grad_x = empty_like(grad_out) if output_mask[0] else x.new_empty(EMPTY_GRAD_SHAPE)
        return grad_x, grad_or_empty(output_mask[1], weight), grad_or_empty(output_mask[2], weight)

    backward, setup = autograd_rule(torch.ops.uxnet.layer_norm_channels_first_backward)
    torch.library.register_autograd("uxnet::layer_norm_channels_first", backward, setup_context=setup)


def _register_triton() -> None:
    from ..triton import layer_norm_channels_first as _kernels  # noqa: F401  (defines the *_triton operators)

    backward, setup = autograd_rule(torch.ops.uxnet.layer_norm_channels_first_triton_backward)
    torch.library.register_autograd("uxnet::layer_norm_channels_first_triton", backward, setup_context=setup)


def _compiled(x, weight, bias, eps):
    return torch.ops.uxnet.layer_norm_channels_first(x, weight, bias, eps)[0]


def _triton(x, weight, bias, eps):
    return torch.ops.uxnet.layer_norm_channels_first_triton(x, weight, bias, eps)[0]


if _extension.LOADED:
    _register_compiled()
if BACKENDS["triton"].available()[0]:
    _register_triton()

FAMILY = dispatch.register(dispatch.OpFamily(OP, [
    dispatch.Implementation("reference", reference),
    dispatch.Implementation("cpu", _compiled, BACKENDS["cpu"].has_kernel(OP)),
    dispatch.Implementation("cuda", _compiled, BACKENDS["cuda"].has_kernel(OP)),
    dispatch.Implementation("triton", _triton),
]))


def layer_norm_channels_first(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the channel dim of (N, C, D, H, W), as the official channels-first ``LayerNorm``.

    ``weight[c] * (x - mean) / sqrt(var + eps) + bias[c]`` with mean and biased variance over C per voxel,
    accumulated in float32 (float64 for float64 inputs).

    Under ``torch.autocast`` it behaves as ``F.layer_norm`` on that device: on CUDA (autocast's float32 list) the
    inputs are cast to float32 and the output is float32; on CPU it runs in the dtype of x (weight and bias cast
    to it). The statistics are float32 in every case.

    Args:
        x: (N, C, D, H, W), floating, contiguous or channels_last_3d.
        weight, bias: (C,), same dtype and device as x.
        eps: > 0.

    Returns:
        Tensor shaped like x.

    Raises:
        ValueError: wrong rank, parameter shape/dtype/device mismatch, non-floating dtypes, eps <= 0.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is None:
        return _run(x, weight, bias, eps)
    if x.device.type in FLOAT32_AUTOCAST_DEVICES:
        compute = torch.float32
    else:
        compute = x.dtype if x.dtype in autocast.CASTABLE else None
    with autocast.disabled(x):
        if compute is None:
            return _run(x, weight, bias, eps)
        return _run(autocast.cast(compute, x), autocast.cast(compute, weight), autocast.cast(compute, bias), eps)


def _run(x, weight, bias, eps):
    check_args(x, weight, bias, eps)
    if x.numel() == 0:
        return empty_result(x, weight, bias)
    return dispatch.select(FAMILY, x).run(x, weight, bias, float(eps))
