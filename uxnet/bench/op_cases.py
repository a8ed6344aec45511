"""The op cases of the benchmarks: dwconv3d, layer_norm_channels_first, ux_mlp, the decoder's
instance_norm_lrelu and instance_norm_add_lrelu with a residual, and conv3d_3x3x3 (C -> C), per shape, mode, dtype,
layout and implementation, and how each one is built, counted (FLOPs, bytes floor) and run.

Every case belongs to a comparison ``group`` (same op, mode, shape, kernel and dtype) in which the PyTorch reference
rows (``is_reference``) are what speedups are measured against, in the same run. Implementations: ``"torch"`` is
the PyTorch reference (``uxnet_kernels.reference``: ``F.conv3d(groups=C)`` for dwconv3d, the official model's
LayerNorm / grouped 1x1x1 convs / GELU for the others), called directly; any other name is a ``uxnet_kernels``
backend, selected with ``use_backend`` after checking it can serve the case.
"""

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference

from .flops import count_flops
from .presets import DTYPES, OPS, Size, case_id, shape_str
from ..timing import InputPool, pool_size

LAYOUTS = ("ncdhw", "cl")
TORCH = "torch"
FAST_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# Activation-sized tensors each mode must read or write at least once (the bytes floor):
# fwd reads the inputs and writes the output; the backward reads grad_out and the saved inputs and writes
# the input gradients (the residual's gradient is grad_out itself).
_MIN_TENSOR_PASSES = {
    ("dwconv3d", "fwd"): 2, ("dwconv3d", "fwd+bwd"): 5,
    ("layer_norm_channels_first", "fwd"): 2, ("layer_norm_channels_first", "fwd+bwd"): 5,
    ("ux_mlp", "fwd"): 3, ("ux_mlp", "fwd+bwd"): 6,
    # backward reads grad_out and the saved output (not the input) and writes grad_z (+ the residual's: grad_out
    # times the activation's slope, a tensor of its own)
    ("instance_norm_lrelu", "fwd"): 2, ("instance_norm_lrelu", "fwd+bwd"): 5,
    ("instance_norm_add_lrelu", "fwd"): 3, ("instance_norm_add_lrelu", "fwd+bwd"): 7,
    ("conv3d_3x3x3", "fwd"): 2, ("conv3d_3x3x3", "fwd+bwd"): 5,
}


@dataclass(frozen=True)
class OpCase:
    op: str
    mode: str
    shape: Tuple[int, ...]
    kernel: int
    dtype: str
    layout: str
    impl: str
    device: str = "cpu"
    variant: str = ""  # instance_norm_add_lrelu on CPU: "donated" (donate_z=True, as UXNet calls it)

    @property
    def group(self) -> str:
        k = f" k{self.kernel}" if self.op == "dwconv3d" else ""
        return f"{self.op} {self.mode} {shape_str(self.shape)}{k} {self.dtype}"

    @property
    def label(self) -> str:
        return f"{self.impl} {self.variant} {self.layout}" if self.variant else f"{self.impl} {self.layout}"

    @property
    def is_reference(self) -> bool:
        return self.impl == TORCH

    @property
    def reference_key(self) -> str:
        """Speedups are against the reference row with the same layout."""
        return self.layout

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        return case_id(f"{self.group} {self.label}")


def backend_verdict(impl: str, op: str, dtype: torch.dtype, layout: str, device: str) -> Tuple[bool, str]:
    """Whether ``impl`` serves ``op`` for such inputs (the op family's verdict: backend available, input supported,
    kernel present)."""
    if impl == TORCH:
        return True, ""
    probe = _layout(torch.empty((1, 2, 3, 3, 3), dtype=dtype, device=device), layout)
    return dispatch.family(op).verdict(impl, probe)


def op_cases(size: Size, device: str = "cpu", dtypes: Optional[Sequence[str]] = None,
             backends: Optional[Sequence[str]] = None, layouts: Sequence[str] = LAYOUTS,
             ops: Sequence[str] = OPS, kernels: Optional[Sequence[int]] = None) -> List[OpCase]:
    """Every op case of ``size``: reference rows plus one row per fast backend of ``device`` (all of them, whether
    available or not: callers skip unavailable ones with :func:`backend_verdict`'s reason)."""
    impls = (TORCH,) + tuple(backends if backends is not None else FAST_BACKENDS.get(device, ()))
    cases = []
    for spec in size.ops:
        if spec.op not in ops or (kernels is not None and spec.op == "dwconv3d" and spec.kernel not in kernels):
            continue
        for dtype in dtypes or size.dtypes:
            for impl in impls:
                for variant in _variants(spec.op, impl, device):
                    for layout in layouts:
                        cases.append(OpCase(spec.op, spec.mode, spec.shape, spec.kernel, dtype, layout, impl, device,
                                            variant))
    return cases


def _variants(op: str, impl: str, device: str) -> Tuple[str, ...]:
    """The block tail is also timed as UXNet runs it: with z donated, which the CPU kernel writes over."""
    if op == "instance_norm_add_lrelu" and impl != TORCH and device == "cpu":
        return ("", "donated")
    return ("",)


def is_slow_reference(case: OpCase, size: Size) -> bool:
    return case.is_reference and (case.op, case.mode, case.shape, case.kernel, case.layout) in size.slow_references


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if layout == "cl" else torch.contiguous_format)


def _op_args(case: OpCase, device: str) -> Tuple[torch.Tensor, ...]:
    """Fresh random inputs of the op, as a UX block feeds it (weights contiguous, activations in the layout)."""
    dt, c = case.torch_dtype, case.shape[1]
    grad = case.mode == "fwd+bwd"

    def act():
        return _layout(torch.randn(case.shape, device=device, dtype=dt), case.layout).requires_grad_(grad)

    def par(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(shape, device=device, dtype=dt)).requires_grad_(grad)

    if case.op == "dwconv3d":
        k = case.kernel
        return act(), par(c, 1, k, k, k, scale=k ** -1.5), par(c, scale=0.1)
    if case.op == "layer_norm_channels_first":
        return act(), par(c, scale=0.1, offset=1.0), par(c, scale=0.1)
    if case.op == "conv3d_3x3x3":
        return act(), par(c, c, 3, 3, 3, scale=(27 * c) ** -0.5), par(c, scale=0.1)
    if case.op == "instance_norm_lrelu":
        return (act(),)
    if case.op == "instance_norm_add_lrelu":
        return act(), act()  # z and the residual
    return (act(), act(), par(c, scale=0.1, offset=1.0), par(c, scale=0.1), par(4 * c, 1, 1, 1, 1, scale=0.5),
            par(4 * c, scale=0.1), par(c, 4, 1, 1, 1, scale=0.5), par(c, scale=0.1), par(c, scale=0.1))


def _op_function(case: OpCase) -> Callable:
    if case.impl == TORCH:
        return getattr(reference, case.op)
    public = getattr(uk, case.op)

    def on_backend(*args):
        with uk.use_backend(case.impl):
            return public(*args)

    def donating_z(z, *others):
        with uk.use_backend(case.impl):
            return public(_ConvOutput.apply(z) if z.requires_grad else z, *others, donate_z=True)

    return donating_z if case.variant == "donated" else on_backend


class _ConvOutput(torch.autograd.Function):
    """z as a conv hands it to the block tail: not a leaf, so it can be donated, and without a copy (it shares the
    pooled leaf's memory, and its gradient goes to the leaf as is)."""

    @staticmethod
    def forward(ctx, z):
        return z.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _with_backward(forward: Callable) -> Callable:
    """forward + backward: the gradients of every input that requires grad (as a training step needs them),
    for the last argument as grad_out; torch.autograd.grad, so nothing accumulates into .grad between calls."""

    def run(*args):
        inputs, grad_out = args[:-1], args[-1]
        out = forward(*inputs)
        wrt = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        return torch.autograd.grad(out, wrt, grad_out)

    return run


def build_op_case(case: OpCase) -> Tuple[Callable, InputPool]:
    """(fn, pool): ``fn(*pool.next())`` runs the case once (not synchronised; see timing.timed_call)."""
    fn = _op_function(case)

    def make_args():
        args = _op_args(case, case.device)
        if case.mode == "fwd+bwd":
            grad_out = _layout(torch.randn(case.shape, device=case.device, dtype=case.torch_dtype), case.layout)
            return args + (grad_out,)
        return args

    fn = _with_backward(fn) if case.mode == "fwd+bwd" else _no_grad(fn)
    return fn, InputPool(make_args, pool_size(_entry_bytes(case)))


def _no_grad(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def _entry_bytes(case: OpCase) -> int:
    elems = sum(a.numel() for a in _op_args(case, "meta")) + (_numel(case.shape) if case.mode == "fwd+bwd" else 0)
    return elems * case.torch_dtype.itemsize


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@functools.lru_cache(maxsize=None)
def op_flops(op: str, mode: str, shape: Tuple[int, ...], kernel: int, dtype: str) -> int:
    """FlopCounterMode's count for the reference op (forward, or forward + backward), on meta tensors."""
    case = OpCase(op, mode, shape, kernel, dtype, "ncdhw", TORCH, "meta")
    args = _op_args(case, "meta")
    if mode == "fwd":
        return count_flops(_no_grad(_op_function(case)), *args)
    grad_out = torch.empty(shape, device="meta", dtype=case.torch_dtype)
    return count_flops(_with_backward(_op_function(case)), *args, grad_out)


def op_min_bytes(case: OpCase) -> int:
    """Bytes of activation tensors the case must at least read and write once (parameters are negligible)."""
    return _MIN_TENSOR_PASSES[(case.op, case.mode)] * _numel(case.shape) * case.torch_dtype.itemsize


__all__ = ["OpCase", "op_cases", "build_op_case", "backend_verdict", "op_flops", "op_min_bytes", "is_slow_reference",
           "LAYOUTS", "TORCH", "FAST_BACKENDS"]
