"""Activation checkpointing of UXNet (``UXNet(activation_checkpointing=...)``).

Modes:

* ``"selective"`` (``True``): recompute only what is cheap to recompute. The encoder stages (LayerNorms, the UX
  blocks' depthwise convs and MLPs, the small strided convs: about 2 % of a training step) are recomputed whole.
  A fused UNETR block (``fused_decoder=True``, plain instance norm) drops its one inner tensor, a1 =
  instance_norm_lrelu(conv1(x)), and recomputes it from its input in backward (``UnetResBlock.recompute_a1``): one
  conv1 forward per block. An unfused block (another ``norm_name``, or ``fused_decoder=False``) runs under
  PyTorch's selective activation checkpointing with a policy that keeps every convolution output and recomputes
  the norms, activations, additions and concatenations around them.
* ``"full"``: every encoder stage and every UNETR block keeps only its inputs and is recomputed whole in backward
  (one extra forward of the whole model).

Eval mode and ``torch.no_grad`` are never checkpointed. Random ops (drop path) are replayed exactly.
"""

import functools
from typing import Callable, Union

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("off", "selective", "full")
_CONVOLUTIONS = (torch.ops.aten.convolution.default,)


def checkpointing_mode(value: Union[bool, str]) -> str:
    """``False`` -> "off", ``True`` -> "selective", or one of MODES; ValueError otherwise."""
    if value is False or value is None:
        return "off"
    if value is True:
        return "selective"
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(f"UXNet: activation_checkpointing must be False, True, 'selective' or 'full', got {value!r}")


def run_checkpointed(fn: Callable, *args):
    """``fn(*args)`` under non-reentrant checkpointing when grad is on: only the inputs are kept."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _CONVOLUTIONS else CheckpointPolicy.PREFER_RECOMPUTE


def run_keeping_convolutions(fn: Callable, *args):
    """``fn(*args)`` under selective activation checkpointing: convolution outputs are kept, every other op
    (norms, activations, adds, concatenations) is recomputed in backward."""
    if torch.is_grad_enabled():
        context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_convolutions)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
    return fn(*args)
