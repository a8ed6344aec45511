"""instance_norm_add_lrelu: the UNETR residual-block tail ``leaky_relu(instance_norm(z) + r)``, r a residual or a
normalised 1x1x1 projection shortcut, keeping only its output, its inputs' owners and per-(n, c) statistics; on CPU
it can write its output over z (``donate_z``).

Operators: ``uxnet::instance_norm_add_lrelu`` / ``uxnet::instance_norm_add_lrelu_backward`` and
``uxnet::instance_norm_add_lrelu_inplace`` (C++: csrc/cpu/instance_norm), ``uxnet::instance_norm_add_lrelu_triton`` /
``..._triton_backward`` (uxnet_kernels/triton/instance_norm.py).
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import EMPTY_GRAD_SHAPE, empty_like, empty_result, instance_stats_like, refuse_double_backward

OP = "instance_norm_add_lrelu"
DONATED = "donated"


def reference(
    z: torch.Tensor,
    residual: Optional[torch.Tensor],
    shortcut_inputs: Sequence[torch.Tensor] = (),
    shortcut_weights: Sequence[torch.Tensor] = (),
    negative_slope: float = 0.01,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The residual-block tail ``leaky_relu(instance_norm(z) + r)`` of the official decoder.

    r is ``residual`` (shaped like z), or, for a projection shortcut, ``instance_norm(sum_i conv3d(x_i, w_i))``
    over ``shortcut_inputs`` x_i (N, C_i, D, H, W) and bias-free 1x1x1 ``shortcut_weights`` w_i (C, C_i, 1, 1, 1)
    (one pair for the official ``conv3``; the channel halves of a concatenated input for a split one).
    """
    if residual is None:
        projected = sum(F.conv3d(x, w) for x, w in zip(shortcut_inputs, shortcut_weights))
        residual = F.instance_norm(projected, eps=eps)
    return F.leaky_relu(F.instance_norm(z, eps=eps) + residual, negative_slope)


def check_args(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps) -> None:
    validation.check_tensor(OP, "z", z, 5, "(N, C, D, H, W)")
    validation.check_spatial_size(OP, "z", z)
    n, c, *spatial = z.shape
    if residual is not None:
        if shortcut_inputs or shortcut_weights:
            validation.fail(OP, "expected either residual or shortcut_inputs/shortcut_weights, got both")
        validation.check_tensor(OP, "residual", residual, 5, "(N, C, D, H, W)")
        if residual.shape != z.shape:
            validation.fail(OP, f"expected residual of shape {tuple(z.shape)} (the shape of z), "
                                f"got {tuple(residual.shape)}")
        validation.check_same_dtype_device(OP, "z", z, residual=residual)
    else:
        if not isinstance(shortcut_inputs, (list, tuple)) or not isinstance(shortcut_weights, (list, tuple)):
            validation.fail(OP, "expected shortcut_inputs and shortcut_weights to be lists of tensors")
        if len(shortcut_inputs) == 0 or len(shortcut_inputs) != len(shortcut_weights):
            validation.fail(OP, "expected a residual, or as many shortcut_weights as shortcut_inputs (at least one), "
                                f"got {len(shortcut_inputs)} inputs and {len(shortcut_weights)} weights")
        size = ", ".join(map(str, spatial))
        for i, (x, w) in enumerate(zip(shortcut_inputs, shortcut_weights)):
            validation.check_tensor(OP, f"shortcut_inputs[{i}]", x, 5, f"({n}, C_{i}, {size})")
            if x.shape[1] == 0:
                validation.fail(OP, f"expected shortcut_inputs[{i}] with at least one channel, got shape "
                                    f"{tuple(x.shape)}")
            if x.shape[0] != n or list(x.shape[2:]) != spatial:
                validation.fail(OP, f"expected shortcut_inputs[{i}] of shape ({n}, C_{i}, {size}) (batch and spatial "
                                    f"size of z), got {tuple(x.shape)}")
            validation.check_tensor(OP, f"shortcut_weights[{i}]", w, 5, f"({c}, {x.shape[1]}, 1, 1, 1)")
            if tuple(w.shape) != (c, x.shape[1], 1, 1, 1):
                validation.fail(OP, f"expected shortcut_weights[{i}] of shape ({c}, {x.shape[1]}, 1, 1, 1) (a 1x1x1 "
                                    f"conv from shortcut_inputs[{i}] to the {c} channels of z), got {tuple(w.shape)}")
            validation.check_same_dtype_device(OP, "z", z, **{f"shortcut_inputs[{i}]": x,
                                                              f"shortcut_weights[{i}]": w})
    validation.check_slope_eps(OP, negative_slope, eps)


def _grads(ctx, grad_out, backward_op):
    """(grad_z, grad_residual or None, grad_shortcut_inputs, grad_shortcut_weights) from what the forward saved."""
    out, residual, rstd, shortcut_mean, shortcut_rstd, *shortcut = ctx.saved_tensors
    refuse_double_backward(OP, grad_out, out, residual, *shortcut)
    k = ctx.num_shortcut
    grad_z, grad_residual, grad_inputs, grad_weights = backward_op(
        grad_out, out, residual, shortcut[:k], shortcut[k:], rstd, shortcut_mean, shortcut_rstd, ctx.negative_slope)
    return grad_z, grad_residual if ctx.has_residual else None, list(grad_inputs), list(grad_weights)


def autograd_rule(backward_op):
    """(backward, setup_context) for a forward ``(z, residual?, shortcut_inputs, shortcut_weights, negative_slope,
    eps) -> (out, mean, rstd, shortcut_mean, shortcut_rstd)`` whose backward op has the schema of
    ``uxnet::instance_norm_add_lrelu_backward``. Kept: the output, the residual or the shortcut inputs and weights
    (held by the block's convolutions anyway) and the statistics; neither z nor the shortcut convolution's output."""

    def setup_context(ctx, inputs, output):
        _z, residual, shortcut_inputs, shortcut_weights, negative_slope, _eps = inputs
        out, mean, rstd, shortcut_mean, shortcut_rstd = output
        ctx.mark_non_differentiable(mean, rstd, shortcut_mean, shortcut_rstd)
        ctx.negative_slope = negative_slope
        ctx.has_residual = residual is not None
        ctx.num_shortcut = len(shortcut_inputs)
        ctx.save_for_backward(out, residual, rstd, shortcut_mean, shortcut_rstd, *shortcut_inputs,
                              *shortcut_weights)

    def backward(ctx, grad_out, *_grad_stats):
        grad_z, grad_residual, grad_inputs, grad_weights = _grads(ctx, grad_out, backward_op)
        return grad_z, grad_residual, grad_inputs, grad_weights, None, None

    return backward, setup_context


def inplace_function(inplace_op, backward_op) -> type:
    """An autograd.Function for ``inplace_op`` (the op with its output written over z, returning the statistics),
    differentiated by the same ``backward_op`` as :func:`autograd_rule`.

    ``apply(z, residual, negative_slope, eps, *shortcut_inputs, *shortcut_weights)`` returns z, marked dirty: its
    autograd history becomes this op's, and anything that saved z's old value for its backward fails there with
    autograd's in-place version error instead of using the overwritten values."""

    class InstanceNormAddLReLUInplace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, residual, negative_slope, eps, *shortcut):
            k = len(shortcut) // 2
            _mean, rstd, shortcut_mean, shortcut_rstd = inplace_op(z, residual, list(shortcut[:k]),
                                                                   list(shortcut[k:]), negative_slope, eps)
            ctx.mark_dirty(z)
            ctx.negative_slope = negative_slope
            ctx.has_residual = residual is not None
            ctx.num_shortcut = k
            ctx.save_for_backward(z, residual, rstd, shortcut_mean, shortcut_rstd, *shortcut)
            return z

        @staticmethod
        def backward(ctx, grad_out):
            grad_z, grad_residual, grad_inputs, grad_weights = _grads(ctx, grad_out, backward_op)
            return grad_z, grad_residual, None, None, *grad_inputs, *grad_weights

    return InstanceNormAddLReLUInplace


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::instance_norm_add_lrelu")
    def _fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        shortcut_stats = instance_stats_like(z)
        if not shortcut_inputs:
            shortcut_stats = tuple(t.new_empty(EMPTY_GRAD_SHAPE) for t in shortcut_stats)
        return (empty_like(z), *instance_stats_like(z), *shortcut_stats)

    @torch.library.register_fake("uxnet::instance_norm_add_lrelu_backward")
    def _backward_fake(grad_out, out, residual, shortcut_inputs, shortcut_weights, rstd, shortcut_mean,
                       shortcut_rstd, negative_slope):
        grad_residual = empty_like(grad_out) if residual is not None else grad_out.new_empty(EMPTY_GRAD_SHAPE)
        return (empty_like(grad_out), grad_residual, [empty_like(x) for x in shortcut_inputs],
                [torch.empty_like(w, memory_format=torch.contiguous_format) for w in shortcut_weights])

    @torch.library.register_fake("uxnet::instance_norm_add_lrelu_inplace")
    def _inplace_fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return _fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)[1:]

    backward, setup = autograd_rule(torch.ops.uxnet.instance_norm_add_lrelu_backward)
    torch.library.register_autograd("uxnet::instance_norm_add_lrelu", backward, setup_context=setup)


def _register_triton() -> None:
    from ..triton import instance_norm as _kernels  # noqa: F401  (defines the uxnet::instance_norm_*_triton operators)

    backward, setup = autograd_rule(torch.ops.uxnet.instance_norm_add_lrelu_triton_backward)
    torch.library.register_autograd("uxnet::instance_norm_add_lrelu_triton", backward, setup_context=setup)


def _compiled(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
    return torch.ops.uxnet.instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope,
                                                   eps)[0]


def _triton(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
    return torch.ops.uxnet.instance_norm_add_lrelu_triton(z, residual, shortcut_inputs, shortcut_weights,
                                                          negative_slope, eps)[0]


def _cpu_variants():
    """The CPU implementation's "donated" variant (its output written over z), when the in-place kernel exists."""
    if not BACKENDS["cpu"].has_kernel("instance_norm_add_lrelu_inplace")[0]:
        return ()
    function = inplace_function(torch.ops.uxnet.instance_norm_add_lrelu_inplace,
                                torch.ops.uxnet.instance_norm_add_lrelu_backward)

    def donated(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return function.apply(z, residual, negative_slope, eps, *shortcut_inputs, *shortcut_weights)

    return ((DONATED, donated),)


if _extension.LOADED:
    _register_compiled()
if BACKENDS["triton"].available()[0]:
    _register_triton()

FAMILY = dispatch.register(dispatch.OpFamily(OP, [
    dispatch.Implementation("reference", reference),
    dispatch.Implementation("cpu", _compiled, BACKENDS["cpu"].has_kernel(OP), _cpu_variants()),
    dispatch.Implementation("triton", _triton),
]))


def why_z_is_kept(impl: dispatch.Implementation, z: torch.Tensor, *others: Optional[torch.Tensor]) -> str:
    """Why z's memory cannot take the output ("" when it can): z must not be a view, nor a leaf that autograd refuses
    to modify, nor share memory with the ``others`` (which the op reads, and its backward may keep), and the
    implementation needs a donated variant. Never while torch.compile traces: the compiler plans its own buffers, and
    Dynamo (torch 2.13) mis-traces the in-place autograd.Function inside activation checkpointing."""
    if torch.compiler.is_compiling():
        return "torch.compile plans buffers itself"
    if z._base is not None:
        return "z is a view"
    if z.requires_grad and z.is_leaf:
        return "z is a leaf that requires grad"
    # Storage identity, not data_ptr: fake tensors (uxnet memory's predictions) all report data_ptr 0.
    if any(t is not None and torch._C._is_alias_of(t, z) for t in others):
        return "another input shares z's memory"
    if impl.variant(DONATED) is None:
        return f"backend {impl.backend!r} has no in-place block-tail kernel"
    return ""


def instance_norm_add_lrelu(
    z: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    shortcut_inputs: Sequence[torch.Tensor] = (),
    shortcut_weights: Sequence[torch.Tensor] = (),
    negative_slope: float = 0.01,
    eps: float = 1e-5,
    *,
    donate_z: bool = False,
) -> torch.Tensor:
    """The UNETR residual-block tail ``leaky_relu(instance_norm(z) + r, negative_slope)`` in one op.

    r is ``residual`` (the block input), or a projection shortcut ``instance_norm(sum_i conv3d(x_i, w_i))`` with
    bias-free 1x1x1 convolutions (the block's ``conv3`` + ``norm3``; several pairs compute the conv of a channel
    concatenation of the x_i without materialising it). Autograd keeps the output, ``residual`` or the shortcut
    inputs (which the block's first convolution keeps anyway) and per-(n, c) statistics; the shortcut convolution
    is recomputed in backward (a 1x1x1 conv, about 1/27 of the block's 3x3x3 conv) instead of keeping its output.

    Under ``torch.autocast`` the projection shortcut is a convolution, so its inputs and weights are cast to the
    autocast dtype; z and the residual are then brought to their promoted dtype, the dtype of the official
    ``instance_norm(z) + r`` (a float32 residual stream stays float32). Statistics in float32.

    Args:
        z: (N, C, D, H, W), floating, contiguous or channels_last_3d (the block's second conv output).
        residual: like z, or None when the shortcut is given.
        shortcut_inputs: tensors (N, C_i, D, H, W); empty when residual is given.
        shortcut_weights: one (C, C_i, 1, 1, 1) weight per shortcut input.
        negative_slope: LeakyReLU slope, > 0.
        eps: instance-norm epsilon, > 0 (for z and the shortcut).
        donate_z: the caller will not use z (or any alias of it) again, as a conv output that no backward needs,
            so the output may be written over z's memory: one full-size tensor less to allocate (and, on CPU, to
            page in). The CPU backend then writes in place and returns z itself (z's autograd history becomes this
            op's). Other backends, torch.compile (which plans its own buffers), a z that is a view or a leaf
            requiring grad, a z sharing memory with ``residual`` or a shortcut input, and an autocast output dtype
            other than z's (a float32 residual stream) leave z alone and return a new tensor (the reason is logged
            at DEBUG on ``uxnet_kernels.dispatch``). If autograd saved z's old values for another backward, that
            backward fails with autograd's in-place version error, never silently.

    Returns:
        Tensor shaped like z (z itself when donated and written in place).

    Raises:
        ValueError: wrong rank or shapes, both or neither of residual and shortcut, dtype or device mismatch,
            non-floating dtypes, negative_slope <= 0, eps <= 0.
    """
    shortcut_inputs, shortcut_weights = list(shortcut_inputs), list(shortcut_weights)
    amp_dtype = autocast.active_dtype(z)
    if amp_dtype is None:
        return _run(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps, donate_z)
    shortcut_inputs = [autocast.cast(amp_dtype, t) for t in shortcut_inputs]
    shortcut_weights = [autocast.cast(amp_dtype, t) for t in shortcut_weights]
    compute = z.dtype
    for t in [residual] if residual is not None else shortcut_inputs:
        if isinstance(t, torch.Tensor) and t.dtype in autocast.CASTABLE and compute in autocast.CASTABLE:
            compute = torch.promote_types(compute, t.dtype)
    with autocast.disabled(z):
        return _run(autocast.cast(compute, z), autocast.cast(compute, residual),
                    [autocast.cast(compute, t) for t in shortcut_inputs],
                    [autocast.cast(compute, t) for t in shortcut_weights], negative_slope, eps,
                    donate_z and compute == z.dtype)


def _run(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps, donate_z):
    check_args(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)
    if z.numel() == 0:
        return empty_result(z if residual is None else z + residual, *shortcut_inputs, *shortcut_weights)
    impl = dispatch.select(FAMILY, z)
    run = impl.run
    if donate_z:
        why = why_z_is_kept(impl, z, residual, *shortcut_inputs)
        if not why:
            run = impl.variant(DONATED)
        elif not torch.compiler.is_compiling():
            dispatch.logger.debug("%s: donate_z declined (%s)", OP, why)
    return run(z, residual, shortcut_inputs, shortcut_weights, float(negative_slope), float(eps))
