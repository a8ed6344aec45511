"""The autograd rules shared by every implementation of the ops (compiled C++/CUDA and Triton).

Each op has a forward returning ``out`` (plus ``mean``, ``rstd`` for the normalising ops) and a ``*_backward`` op with
the schema of csrc/registration.cpp; these factories turn a backward op into the ``(backward, setup_context)`` pair
that ``register_autograd`` takes.
"""

from typing import Callable, Tuple

import torch

AutogradRule = Tuple[Callable, Callable]


def refuse_double_backward(op: str, *tensors) -> None:
    """The backward ops have no derivative of their own: building a graph through them (``create_graph=True``, e.g.
    a gradient penalty) would silently give wrong second derivatives, so it is an error instead."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"uxnet_kernels.{op}: double backward (create_graph=True through this op) is not "
                           "supported; use the reference backend (uxnet_kernels.use_backend('reference')) for it")


def dwconv3d_rule(backward_op) -> AutogradRule:
    """backward_op(grad_out, x, weight, output_mask) -> (grad_x, grad_weight, grad_bias)."""

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        refuse_double_backward("dwconv3d", grad_out, x, weight)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_op(grad_out, x, weight, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    return backward, setup_context


def layer_norm_rule(backward_op) -> AutogradRule:
    """backward_op(grad_out, x, weight, mean, rstd, output_mask) -> (grad_x, grad_weight, grad_bias)."""

    def setup_context(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        refuse_double_backward("layer_norm_channels_first", grad_out, x, weight)
        mask = list(ctx.needs_input_grad[:3])
        grads = backward_op(grad_out, x, weight, mean, rstd, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,)

    return backward, setup_context


def ux_mlp_rule(backward_op) -> AutogradRule:
    """backward_op(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd) -> 8 grads (see schema).

    The residual's gradient is grad_out itself; the hidden activations are recomputed by the backward op."""

    def setup_context(ctx, inputs, output):
        y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, _eps = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has_residual = residual is not None
        ctx.has_gamma = gamma is not None
        ctx.save_for_backward(y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        saved = ctx.saved_tensors
        refuse_double_backward("ux_mlp", grad_out, *saved)
        grad_y, g_lnw, g_lnb, g_w1, g_b1, g_w2, g_b2, g_gamma = backward_op(grad_out, *saved)
        grad_residual = grad_out if ctx.has_residual else None
        return (grad_y, grad_residual, g_lnw, g_lnb, g_w1, g_b1, g_w2, g_b2, g_gamma if ctx.has_gamma else None, None)

    return backward, setup_context


def instance_norm_lrelu_rule(backward_op) -> AutogradRule:
    """backward_op(grad_out, out, rstd, negative_slope) -> grad_x.

    Only the output and rstd are kept: the backward inverts the LeakyReLU to recover the normalised input."""

    def setup_context(ctx, inputs, output):
        _x, negative_slope, _eps = inputs
        out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(out, rstd)

    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        out, rstd = ctx.saved_tensors
        refuse_double_backward("instance_norm_lrelu", grad_out, out)
        return backward_op(grad_out, out, rstd, ctx.negative_slope), None, None

    return backward, setup_context


def instance_norm_add_lrelu_rule(backward_op) -> AutogradRule:
    """backward_op(grad_out, out, residual, shortcut_inputs, shortcut_weights, rstd, shortcut_mean, shortcut_rstd,
    negative_slope) -> (grad_z, grad_residual, grad_shortcut_inputs, grad_shortcut_weights).

    Kept: the output, the residual or the shortcut inputs and weights (held by the block's convolutions anyway)
    and the statistics; neither z nor the shortcut convolution's output."""

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
        grad_z, grad_residual, grad_inputs, grad_weights = _add_lrelu_grads(ctx, grad_out, backward_op)
        return grad_z, grad_residual, grad_inputs, grad_weights, None, None

    return backward, setup_context


def _add_lrelu_grads(ctx, grad_out, backward_op):
    """(grad_z, grad_residual or None, grad_shortcut_inputs, grad_shortcut_weights) from what the setup saved."""
    out, residual, rstd, shortcut_mean, shortcut_rstd, *shortcut = ctx.saved_tensors
    refuse_double_backward("instance_norm_add_lrelu", grad_out, out, residual, *shortcut)
    k = ctx.num_shortcut
    grad_z, grad_residual, grad_inputs, grad_weights = backward_op(
        grad_out, out, residual, shortcut[:k], shortcut[k:], rstd, shortcut_mean, shortcut_rstd, ctx.negative_slope)
    return grad_z, grad_residual if ctx.has_residual else None, list(grad_inputs), list(grad_weights)


def instance_norm_add_lrelu_inplace_function(inplace_op, backward_op) -> type:
    """An autograd.Function for ``inplace_op`` (instance_norm_add_lrelu with its output written over z, returning
    the statistics), differentiated by the same ``backward_op`` as :func:`instance_norm_add_lrelu_rule`.

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
            grad_z, grad_residual, grad_inputs, grad_weights = _add_lrelu_grads(ctx, grad_out, backward_op)
            return grad_z, grad_residual, None, None, *grad_inputs, *grad_weights

    return InstanceNormAddLReLUInplace
