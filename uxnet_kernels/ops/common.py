"""Pieces that several op families share: empty results, output layouts, fake-tensor shapes, autograd guards."""

from typing import Optional

import torch

# Gradients that were not asked for come back from the backward operators as (0,) tensors.
EMPTY_GRAD_SHAPE = (0,)


def empty_result(like: torch.Tensor, *params: Optional[torch.Tensor]) -> torch.Tensor:
    """A zero-size output shaped like ``like`` that still connects every parameter to autograd (empty or zero
    gradients flow back)."""
    out = like * 0
    for p in params:
        if p is not None:
            out = out + p.sum() * 0
    return out


def output_memory_format(like: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels give their outputs: channels_last_3d only for inputs that are exactly that."""
    if like.dim() == 5 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def empty_like(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty_like(like, dtype=dtype, memory_format=output_memory_format(like))


def grad_or_empty(wanted: bool, like: torch.Tensor) -> torch.Tensor:
    """A gradient shaped like ``like`` (contiguous) when wanted, else the (0,) placeholder."""
    return torch.empty_like(like, memory_format=torch.contiguous_format) if wanted else like.new_empty(EMPTY_GRAD_SHAPE)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are float32, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def voxel_stats_like(x: torch.Tensor):
    """Empty (mean, rstd) of the channels-first norms: (N, D, H, W)."""
    n, _, d, h, w = x.shape
    return x.new_empty((n, d, h, w), dtype=stats_dtype(x)), x.new_empty((n, d, h, w), dtype=stats_dtype(x))


def instance_stats_like(x: torch.Tensor):
    """Empty (mean, rstd) of the instance norms: (N, C)."""
    return x.new_empty(x.shape[:2], dtype=stats_dtype(x)), x.new_empty(x.shape[:2], dtype=stats_dtype(x))


def refuse_double_backward(op: str, *tensors) -> None:
    """The backward ops have no derivative of their own: building a graph through them (``create_graph=True``, e.g.
    a gradient penalty) would silently give wrong second derivatives, so it is an error instead."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"uxnet_kernels.{op}: double backward (create_graph=True through this op) is not "
                           "supported; use the reference backend (uxnet_kernels.use_backend('reference')) for it")


def convolution_autograd_rule(op: str, backward_op):
    """(backward, setup_context) for a convolution ``(x, weight, bias?) -> out`` whose ``backward_op(grad_out, x,
    weight, output_mask) -> (grad_x, grad_weight, grad_bias)`` returns (0,) placeholders for gradients not asked
    for. Saves x and weight."""

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        refuse_double_backward(op, grad_out, x, weight)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_op(grad_out, x, weight, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    return backward, setup_context
