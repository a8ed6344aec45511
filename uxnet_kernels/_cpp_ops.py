"""Fake (meta) implementations and autograd for the compiled ``uxnet::`` ops.

The schemas and device kernels are C++ (csrc/); this module makes the ops traceable by ``torch.compile`` /
``torch.export`` (fake tensors) and differentiable (``register_autograd`` calls the ``*_backward`` ops).
"""

import torch

from ._extension import LOADED
from .autograd_rules import (dwconv3d_rule, instance_norm_add_lrelu_inplace_function, instance_norm_add_lrelu_rule,
                             instance_norm_lrelu_rule, layer_norm_rule, ux_mlp_rule)

EMPTY_GRAD_SHAPE = (0,)


def output_memory_format(like: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels give their outputs: channels_last_3d only for inputs that are exactly that."""
    if like.dim() == 5 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_like(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty_like(like, dtype=dtype, memory_format=output_memory_format(like))


def _stats_like(x: torch.Tensor):
    n, _, d, h, w = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((n, d, h, w), dtype=dtype), x.new_empty((n, d, h, w), dtype=dtype)


def instance_stats_like(x: torch.Tensor):
    """Empty (mean, rstd) of the instance-norm ops: (N, C), float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[:2], dtype=dtype), x.new_empty(x.shape[:2], dtype=dtype)


def _grad_or_empty(wanted: bool, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format) if wanted else like.new_empty(EMPTY_GRAD_SHAPE)


def _register() -> None:
    ops = torch.ops.uxnet

    # ---- dwconv3d -------------------------------------------------------------------------------
    @torch.library.register_fake("uxnet::dwconv3d")
    def _dwconv3d_fake(x, weight, bias):
        return _empty_like(x)

    @torch.library.register_fake("uxnet::dwconv3d_backward")
    def _dwconv3d_backward_fake(grad_out, x, weight, output_mask):
        grad_x = _empty_like(grad_out) if output_mask[0] else x.new_empty(EMPTY_GRAD_SHAPE)
        grad_bias = x.new_empty((x.shape[1],)) if output_mask[2] else x.new_empty(EMPTY_GRAD_SHAPE)
        return grad_x, _grad_or_empty(output_mask[1], weight), grad_bias

    backward, setup = dwconv3d_rule(ops.dwconv3d_backward)
    torch.library.register_autograd("uxnet::dwconv3d", backward, setup_context=setup)

    # ---- layer_norm_channels_first --------------------------------------------------------------------------
    @torch.library.register_fake("uxnet::layer_norm_channels_first")
    def _layer_norm_fake(x, weight, bias, eps):
        return (_empty_like(x), *_stats_like(x))

    @torch.library.register_fake("uxnet::layer_norm_channels_first_backward")
    def _layer_norm_backward_fake(grad_out, x, weight, mean, rstd, output_mask):
        grad_x = _empty_like(grad_out) if output_mask[0] else x.new_empty(EMPTY_GRAD_SHAPE)
        return grad_x, _grad_or_empty(output_mask[1], weight), _grad_or_empty(output_mask[2], weight)

    backward, setup = layer_norm_rule(ops.layer_norm_channels_first_backward)
    torch.library.register_autograd("uxnet::layer_norm_channels_first", backward, setup_context=setup)

    # ---- ux_mlp ---------------------------------------------------------------------------------
    @torch.library.register_fake("uxnet::ux_mlp")
    def _ux_mlp_fake(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
        return (_empty_like(y), *_stats_like(y))

    @torch.library.register_fake("uxnet::ux_mlp_backward")
    def _ux_mlp_backward_fake(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma, mean, rstd):
        grad_gamma = _grad_or_empty(gamma is not None, ln_weight)
        return (
            _empty_like(grad_out),
            _grad_or_empty(True, ln_weight),
            _grad_or_empty(True, ln_bias),
            _grad_or_empty(True, w1),
            _grad_or_empty(True, b1),
            _grad_or_empty(True, w2),
            _grad_or_empty(True, b2),
            grad_gamma,
        )

    backward, setup = ux_mlp_rule(ops.ux_mlp_backward)
    torch.library.register_autograd("uxnet::ux_mlp", backward, setup_context=setup)

    # ---- instance_norm_lrelu --------------------------------------------------------------------
    @torch.library.register_fake("uxnet::instance_norm_lrelu")
    def _instance_norm_lrelu_fake(x, negative_slope, eps):
        return (_empty_like(x), *instance_stats_like(x))

    @torch.library.register_fake("uxnet::instance_norm_lrelu_backward")
    def _instance_norm_lrelu_backward_fake(grad_out, out, rstd, negative_slope):
        return _empty_like(grad_out)

    backward, setup = instance_norm_lrelu_rule(ops.instance_norm_lrelu_backward)
    torch.library.register_autograd("uxnet::instance_norm_lrelu", backward, setup_context=setup)

    # ---- instance_norm_add_lrelu ----------------------------------------------------------------
    @torch.library.register_fake("uxnet::instance_norm_add_lrelu")
    def _instance_norm_add_lrelu_fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        shortcut_stats = instance_stats_like(z)
        if not shortcut_inputs:
            shortcut_stats = tuple(t.new_empty(EMPTY_GRAD_SHAPE) for t in shortcut_stats)
        return (_empty_like(z), *instance_stats_like(z), *shortcut_stats)

    @torch.library.register_fake("uxnet::instance_norm_add_lrelu_backward")
    def _instance_norm_add_lrelu_backward_fake(grad_out, out, residual, shortcut_inputs, shortcut_weights, rstd,
                                               shortcut_mean, shortcut_rstd, negative_slope):
        grad_residual = _empty_like(grad_out) if residual is not None else grad_out.new_empty(EMPTY_GRAD_SHAPE)
        return (_empty_like(grad_out), grad_residual, [_empty_like(x) for x in shortcut_inputs],
                [torch.empty_like(w, memory_format=torch.contiguous_format) for w in shortcut_weights])

    backward, setup = instance_norm_add_lrelu_rule(ops.instance_norm_add_lrelu_backward)
    torch.library.register_autograd("uxnet::instance_norm_add_lrelu", backward, setup_context=setup)

    # ---- instance_norm_add_lrelu_inplace (differentiated through InstanceNormAddLReLUInplace) -----------------
    @torch.library.register_fake("uxnet::instance_norm_add_lrelu_inplace")
    def _instance_norm_add_lrelu_inplace_fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return _instance_norm_add_lrelu_fake(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)[1:]


# The autograd.Function running uxnet::instance_norm_add_lrelu_inplace (None when the extension is not built).
InstanceNormAddLReLUInplace = None

if LOADED:
    _register()
    InstanceNormAddLReLUInplace = instance_norm_add_lrelu_inplace_function(
        torch.ops.uxnet.instance_norm_add_lrelu_inplace, torch.ops.uxnet.instance_norm_add_lrelu_backward)
