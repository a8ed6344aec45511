"""instance_norm_lrelu: ``leaky_relu(instance_norm(x))``, the norm + activation of the UNETR decoder blocks, keeping
only its output and per-(n, c) statistics for backward.

Operators: ``uxnet::instance_norm_lrelu`` / ``uxnet::instance_norm_lrelu_backward`` (C++: csrc/cpu/instance_norm)
and ``uxnet::instance_norm_lrelu_triton`` / ``..._triton_backward`` (uxnet_kernels/triton/instance_norm.py).
"""

import torch
import torch.nn.functional as F

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import empty_like, empty_result, instance_stats_like, refuse_double_backward

OP = "instance_norm_lrelu"


def reference(x: torch.Tensor, negative_slope: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` as the official decoder computes it (``InstanceNorm3d`` without affine or
    running statistics, then ``LeakyReLU``). x: (N, C, D, H, W)."""
    return F.leaky_relu(F.instance_norm(x, eps=eps), negative_slope)


def check_args(x, negative_slope, eps) -> None:
    validation.check_tensor(OP, "x", x, 5, "(N, C, D, H, W)")
    validation.check_spatial_size(OP, "x", x)
    validation.check_slope_eps(OP, negative_slope, eps)


def autograd_rule(backward_op):
    """(backward, setup_context) for a forward ``(x, negative_slope, eps) -> (out, mean, rstd)`` whose
    ``backward_op(grad_out, out, rstd, negative_slope) -> grad_x``. Only the output and rstd are kept: the backward
    inverts the LeakyReLU to recover the normalised input."""

    def setup_context(ctx, inputs, output):
        _x, negative_slope, _eps = inputs
        out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(out, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        out, rstd = ctx.saved_tensors
        refuse_double_backward(OP, grad_out, out)
        return backward_op(grad_out, out, rstd, ctx.negative_slope), None, None

    return backward, setup_context


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::instance_norm_lrelu")
    def _fake(x, negative_slope, eps):
        return (empty_like(x), *instance_stats_like(x))

    @torch.library.register_fake("uxnet::instance_norm_lrelu_backward")
    def _backward_fake(grad_out, out, rstd, negative_slope):
        return empty_like(grad_out)

    backward, setup = autograd_rule(torch.ops.uxnet.instance_norm_lrelu_backward)
    torch.library.register_autograd("uxnet::instance_norm_lrelu", backward, setup_context=setup)


def _register_triton() -> None:
    from ..triton import instance_norm as _kernels  # noqa: F401  (defines the uxnet::instance_norm_*_triton operators)

    backward, setup = autograd_rule(torch.ops.uxnet.instance_norm_lrelu_triton_backward)
    torch.library.register_autograd("uxnet::instance_norm_lrelu_triton", backward, setup_context=setup)


def _compiled(x, negative_slope, eps):
    return torch.ops.uxnet.instance_norm_lrelu(x, negative_slope, eps)[0]


def _triton(x, negative_slope, eps):
    return torch.ops.uxnet.instance_norm_lrelu_triton(x, negative_slope, eps)[0]


if _extension.LOADED:
    _register_compiled()
if BACKENDS["triton"].available()[0]:
    _register_triton()

FAMILY = dispatch.register(dispatch.OpFamily(OP, [
    dispatch.Implementation("reference", reference),
    dispatch.Implementation("cpu", _compiled, BACKENDS["cpu"].has_kernel(OP)),
    dispatch.Implementation("triton", _triton),
]))


def instance_norm_lrelu(x: torch.Tensor, negative_slope: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """``leaky_relu(instance_norm(x), negative_slope)``: the norm + activation of the UNETR decoder blocks.

    Instance norm without affine: per (n, c), ``(x - mean) / sqrt(var + eps)`` with the mean and biased variance
    over D * H * W, accumulated in float32 (float64 for float64 inputs). Autograd keeps only the output (which the
    next convolution keeps anyway) and the per-(n, c) statistics: the backward recovers the normalised values by
    inverting the LeakyReLU (In-Place Activated BatchNorm, Rota Bulo et al. 2018), so the input is not saved.
    Instance norm and LeakyReLU are on no autocast list: under ``torch.autocast`` it runs in the dtype of x
    (normally the autocast dtype, as x is a convolution output), statistics in float32.

    Args:
        x: (N, C, D, H, W), floating, contiguous or channels_last_3d.
        negative_slope: LeakyReLU slope, > 0 (invertible; 0.01 in MONAI's blocks).
        eps: > 0 (1e-5, ``nn.InstanceNorm3d``'s default).

    Returns:
        Tensor shaped like x (same dtype; on the compiled backends, same memory format).

    Raises:
        ValueError: wrong rank, non-floating dtype, negative_slope <= 0 or not finite, eps <= 0.
    """
    if autocast.active_dtype(x) is None:
        return _run(x, negative_slope, eps)
    with autocast.disabled(x):
        return _run(x, negative_slope, eps)


def _run(x, negative_slope, eps):
    check_args(x, negative_slope, eps)
    if x.numel() == 0:
        return empty_result(x)
    return dispatch.select(FAMILY, x).run(x, float(negative_slope), float(eps))
