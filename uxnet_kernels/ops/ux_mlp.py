"""ux_mlp: the UX block tail ``residual + gamma * pwconv2(GELU(pwconv1(LN(y))))`` in one pass per voxel.

Operators: ``uxnet::ux_mlp`` / ``uxnet::ux_mlp_backward`` (C++: csrc/cpu/ux_mlp, csrc/cuda/ux_mlp) and
``uxnet::ux_mlp_triton`` / ``uxnet::ux_mlp_triton_backward`` (uxnet_kernels/triton/ux_mlp.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import empty_like, empty_result, grad_or_empty, refuse_double_backward, voxel_stats_like

OP = "ux_mlp"


def reference(
    y: torch.Tensor,
    residual: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The UX block tail ``residual + gamma * pwconv2(GELU(pwconv1(LN(y))))`` as the official block computes it.

    y, residual: (N, C, D, H, W); ln_weight, ln_bias, b2, gamma: (C,); w1: (4C, 1, 1, 1, 1); b1: (4C,);
    w2: (C, 4, 1, 1, 1). ``residual=None`` omits the residual; ``gamma=None`` omits the layer scale.
    """
    channels = y.shape[1]
    w1 = w1.reshape(4 * channels, 1, 1, 1, 1)
    w2 = w2.reshape(channels, 4, 1, 1, 1)
    normed = F.layer_norm(y.permute(0, 2, 3, 4, 1), (channels,), ln_weight, ln_bias, eps)
    hidden = F.gelu(F.conv3d(normed.permute(0, 4, 1, 2, 3), w1, b1.reshape(-1), groups=channels))
    out = F.conv3d(hidden, w2, b2, groups=channels)
    if gamma is not None:
        out = gamma[:, None, None, None] * out
    return out if residual is None else residual + out


def check_args(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps) -> None:
    validation.check_tensor(OP, "y", y, 5, "(N, C, D, H, W)")
    c = y.shape[1]
    if residual is not None:
        validation.check_tensor(OP, "residual", residual, 5, "(N, C, D, H, W)")
        if residual.shape != y.shape:
            validation.fail(OP, f"expected residual of shape {tuple(y.shape)} (the shape of y), "
                                f"got {tuple(residual.shape)}")
    params = {
        "ln_weight": (ln_weight, c, f"({c},)"),
        "ln_bias": (ln_bias, c, f"({c},)"),
        "w1": (w1, 4 * c, f"({4 * c}, 1, 1, 1, 1) or ({c}, 4)"),
        "b1": (b1, 4 * c, f"({4 * c},) or ({c}, 4)"),
        "w2": (w2, 4 * c, f"({c}, 4, 1, 1, 1) or ({c}, 4)"),
        "b2": (b2, c, f"({c},)"),
        "gamma": (gamma, c, f"({c},)"),
    }
    for name, (t, numel, shapes) in params.items():
        if t is None and name == "gamma":
            continue
        validation.check_tensor(OP, name, t)
        validation.check_numel(OP, name, t, numel, shapes)
    validation.check_same_dtype_device(OP, "y", y, residual=residual, **{k: v[0] for k, v in params.items()})
    validation.check_eps(OP, eps)


def autograd_rule(backward_op):
    """(backward, setup_context) for a forward ``(y, residual?, ln_weight, ln_bias, w1, b1, w2, b2, gamma?, eps) ->
    (out, mean, rstd)`` whose ``backward_op(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd)``
    returns the 8 gradients of ``uxnet::ux_mlp_backward``. The residual's gradient is grad_out itself; the hidden
    activations are recomputed by the backward op."""

    def setup_context(ctx, inputs, output):
        y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, _eps = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has_residual = residual is not None
        ctx.has_gamma = gamma is not None
        ctx.save_for_backward(y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        saved = ctx.saved_tensors
        refuse_double_backward(OP, grad_out, *saved)
        grad_y, g_lnw, g_lnb, g_w1, g_b1, g_w2, g_b2, g_gamma = backward_op(grad_out, *saved)
        grad_residual = grad_out if ctx.has_residual else None
        return (grad_y, grad_residual, g_lnw, g_lnb, g_w1, g_b1, g_w2, g_b2, g_gamma if ctx.has_gamma else None, None)

    return backward, setup_context


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::ux_mlp")
    def _fake(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
        return (empty_like(y), *voxel_stats_like(y))

    @torch.library.register_fake("uxnet::ux_mlp_backward")
    def _backward_fake(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd):
        return (
            empty_like(grad_out),
            *(grad_or_empty(True, p) for p in (ln_weight, ln_bias, w1, b1, w2, b2)),
            grad_or_empty(gamma is not None, ln_weight),
        )

    backward, setup = autograd_rule(torch.ops.uxnet.ux_mlp_backward)
    torch.library.register_autograd("uxnet::ux_mlp", backward, setup_context=setup)


def _register_triton() -> None:
    from ..triton import ux_mlp as _kernels  # noqa: F401  (defines the uxnet::ux_mlp_triton operators)

    backward, setup = autograd_rule(torch.ops.uxnet.ux_mlp_triton_backward)
    torch.library.register_autograd("uxnet::ux_mlp_triton", backward, setup_context=setup)


def _compiled(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
    return torch.ops.uxnet.ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)[0]


def _triton(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
    return torch.ops.uxnet.ux_mlp_triton(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)[0]


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


def ux_mlp(
    y: torch.Tensor,
    residual: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The UX block tail ``residual + gamma * pwconv2(GELU(pwconv1(LN(y))))`` in one pass per voxel.

    pwconv1 is the block's grouped 1x1x1 conv C -> 4C (groups=C), pwconv2 the grouped 1x1x1 conv 4C -> C
    (groups=C), LN a LayerNorm over channels, GELU the exact (erf) GELU. Both convs act per channel, so for
    channel c: ``h_j = GELU(w1[4c+j] * LN(y)_c + b1[4c+j])`` and ``out_c = residual_c + gamma_c * (sum_j w2[c, j] h_j + b2_c)``.

    Under ``torch.autocast`` the two grouped 1x1x1 convolutions make it a convolution: the tail computes in the
    autocast dtype (float32 LayerNorm statistics and accumulation inside the kernel). The output takes the dtype of
    the residual stream: a residual already in the autocast dtype is fused as usual; a wider one (a float32
    residual stream, as PyTorch's type promotion keeps it in the official block) is added after the tail, in its
    own dtype, so the residual stream never loses precision. With no residual the output has the autocast dtype.

    Args:
        y: (N, C, D, H, W), floating, contiguous or channels_last_3d (the output of the block's dwconv).
        residual: like y (the block input), or None for no residual.
        ln_weight, ln_bias: (C,).
        w1: (4C, 1, 1, 1, 1) (``pwconv1.weight``), (4C,) or (C, 4); b1: (4C,) or (C, 4).
        w2: (C, 4, 1, 1, 1) (``pwconv2.weight``) or (C, 4); b2: (C,).
        gamma: (C,) layer scale, or None.
        eps: LayerNorm epsilon, > 0.

    Returns:
        Tensor shaped like y.

    Raises:
        ValueError: wrong rank, parameter element counts not matching C, dtype/device mismatch, eps <= 0.
    """
    amp_dtype = autocast.active_dtype(y)
    if amp_dtype is None:
        return _run(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
    params = [autocast.cast(amp_dtype, t) for t in (ln_weight, ln_bias, w1, b1, w2, b2, gamma)]
    with autocast.disabled(y):
        if y.dtype not in autocast.CASTABLE:
            return _run(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
        y = autocast.cast(amp_dtype, y)
        if residual is None or residual.dtype == amp_dtype or residual.dtype not in autocast.CASTABLE:
            return _run(y, autocast.cast(amp_dtype, residual), *params, eps)
        tail = _run(y, None, *params, eps)
        return residual + tail.to(residual.dtype)


def _run(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
    check_args(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
    if y.numel() == 0:
        return empty_result(y if residual is None else y + residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma)
    c = y.shape[1]
    w1, b1, w2 = (t.reshape(c, 4).contiguous() for t in (w1, b1, w2))
    impl = dispatch.select(FAMILY, y)
    return impl.run(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, float(eps))
