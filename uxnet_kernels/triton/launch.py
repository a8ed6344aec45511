"""What every Triton op of uxnet_kernels shares on the host side: launching (compiled or interpreted kernels, fake
tensors), layouts, output poisoning and tile arithmetic.

Conventions of the ``uxnet::*_triton`` operators (those of the compiled ops, csrc/uxnet_ops.h): outputs take the
memory format of the first tensor argument (channels_last_3d only for inputs that are exactly that), inputs with
other strides are made contiguous, masked-out gradients are empty (0,) tensors. Parameter gradients are per-program
partial sums reduced with ``torch.sum`` over a fixed-size buffer, so every result is deterministic (no atomics).
No kernel uses ``tl.dot``, so TF32 settings do not apply.

``UXNET_POISON_OUTPUTS=1`` fills every buffer a kernel writes with NaN before the launch (tests use it to prove
the kernels write every element). ``UXNET_TRITON_AUTOTUNE=0`` replaces autotuning by one heuristic config.
"""

import os
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import fix_interpreter_scalar_index, is_interpreted

EMPTY_GRAD_SHAPE = (0,)


@triton.jit
def _mode_probe(x_ptr):
    tl.store(x_ptr, 0.0)


# Whether triton.jit builds interpreted kernels in this process (TRITON_INTERPRET=1 when triton was first used).
INTERPRETED = is_interpreted(_mode_probe)
if INTERPRETED:
    fix_interpreter_scalar_index()


def poison_enabled() -> bool:
    return os.environ.get("UXNET_POISON_OUTPUTS", "0") == "1"


def autotune_enabled() -> bool:
    return not INTERPRETED and os.environ.get("UXNET_TRITON_AUTOTUNE", "1") != "0"


def poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if poison_enabled() and t.is_floating_point() else t


def is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def canonical(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(t as contiguous or exactly channels_last_3d, whether channels_last_3d)."""
    if is_channels_last(t):
        return t, True
    return t.contiguous(), False


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def empty_like_layout(t: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return poisoned(torch.empty_like(t, dtype=dtype, memory_format=fmt))


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The (0,) placeholder of a gradient that was not asked for (a new one per output: outputs may not alias)."""
    return like.new_empty(EMPTY_GRAD_SHAPE)


def as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def is_fake(*tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake as is_fake_tensor

    return any(t is not None and is_fake_tensor(t) for t in tensors)


def launcher(kernel, *tensors):
    """The kernel as launched inside a triton_op: ``wrap_triton`` for compiled kernels; interpreted kernels run
    as they are (wrap_triton cannot trace them) and are skipped on fake tensors (shape propagation only)."""
    if INTERPRETED:
        if is_fake(*tensors):
            return None
        return kernel
    return wrap_triton(kernel)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def split_tile(volume: int, d: int, h: int, w: int) -> Tuple[int, int, int]:
    """A BLOCK_D x BLOCK_H x BLOCK_W tile of about `volume` outputs, filling W, then H, then D."""
    bw = min(pow2(w), volume)
    bh = min(pow2(h), max(volume // bw, 1))
    bd = min(pow2(d), max(volume // (bw * bh), 1))
    return bd, bh, bw
