"""What the benchmarks time: op cases (dwconv3d, layer_norm_channels_first, ux_mlp, and the decoder's
instance_norm_lrelu and instance_norm_add_lrelu with a residual) and model cases (UXNet
inference, training step, re-parameterised inference), for each size preset, and how each one is built.

Every case belongs to a comparison ``group`` (same op, mode, shape, kernel and dtype; or same model workload) in
which the PyTorch reference rows (``is_reference``) are what speedups are measured against, in the same run.
Implementations: ``"torch"`` is the PyTorch reference (``uxnet_kernels.reference``: ``F.conv3d(groups=C)`` for
dwconv3d, the official model's LayerNorm / grouped 1x1x1 convs / GELU for the others), called directly; any other
name is a ``uxnet_kernels`` backend, selected with ``use_backend`` after checking it can serve the case.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference

from . import flops as flops_mod
from .timing import InputPool, pool_size

OPS = ("dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu")
ENCODER_NORM_OPS = OPS[1:3]
DECODER_OPS = OPS[3:]
MODES = ("fwd", "fwd+bwd")
LAYOUTS = ("ncdhw", "cl")
TORCH = "torch"
FAST_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
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
}


def stage_shapes(patch: int, batch: int) -> List[Tuple[int, ...]]:
    """(N, C, D, H, W) of the four UX-Net encoder stages for a patch^3 input: 48/96/192/384 channels at
    patch/2, /4, /8, /16."""
    return [(batch, 48 * 2 ** i) + (patch // 2 ** (i + 1),) * 3 for i in range(4)]


def shape_str(shape: Sequence[int]) -> str:
    n, c, *sp = shape
    spatial = f"{sp[0]}^3" if len(set(sp)) == 1 else "x".join(map(str, sp))
    return f"{n}x{c}x{spatial}"


def _ident(text: str) -> str:
    """A pytest-id / -k friendly form: "1x48x16^3" -> "1x48x16c", spaces -> "-", "+" -> "_"."""
    return text.replace("^3", "c").replace(" ", "-").replace("+", "_")


# --------------------------------------------------------------------------------------------- size presets


@dataclass(frozen=True)
class OpSpec:
    """One op workload before it is crossed with dtypes, layouts and implementations."""

    op: str
    mode: str
    shape: Tuple[int, ...]
    kernel: int = 0  # dwconv3d only


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: Tuple[Tuple[str, object], ...]  # sorted items, hashable
    patch: int
    batch: int

    @property
    def kwargs(self) -> Dict:
        return dict(self.config)


def model_spec(name: str, patch: int, batch: int, **config) -> ModelSpec:
    return ModelSpec(name, tuple(sorted(config.items())), patch, batch)


@dataclass(frozen=True)
class Size:
    name: str
    ops: Tuple[OpSpec, ...]
    models: Tuple[ModelSpec, ...]
    dtypes: Tuple[str, ...]
    budget_s: float  # timing budget per case (rounds = budget / call time, clamped)
    min_rounds: int
    max_rounds: int
    # (op, mode, shape, kernel, layout) of PyTorch reference rows too slow for this preset (minutes per call);
    # they run only on request (--uxnet-include-slow / UXNET_BENCH_SLOW=1 / uxnet bench --include-slow).
    slow_references: Tuple[Tuple, ...] = ()
    note: str = ""
    model_kinds: Tuple[str, ...] = ("inference", "train_step", "reparam_inference")


def _dw(mode, shapes, kernels):
    return [OpSpec("dwconv3d", mode, s, k) for k in kernels for s in shapes]


def _norm_ops(shapes):
    return [OpSpec(op, mode, s) for op in ENCODER_NORM_OPS for mode in MODES for s in shapes]


def _decoder_ops(shapes):
    """The decoder's norm + activation ops at full-resolution decoder shapes (48 channels at the patch size)."""
    return [OpSpec(op, mode, s) for op in DECODER_OPS for mode in MODES for s in shapes]


def _dedupe(specs):
    return tuple(dict.fromkeys(specs))


# A narrow UXNet (same architecture, 1/4 of the width) so that a CPU training step takes seconds, not minutes.
SMALL_MODEL = dict(in_chans=1, out_chans=14, feat_size=(12, 24, 48, 96), hidden_size=192)
DEFAULT_MODEL = dict(flops_mod.DEFAULT_MODEL)

_ISSUE3_FWD = [(1, c, s, s, s) for (_, c, s, _, _) in stage_shapes(96, 1)]  # stage shapes of a 96^3 patch, N=1
_ISSUE3_FWDBWD = [(1, 48, 32, 32, 32), (1, 96, 16, 16, 16)]

SIZES: Dict[str, Size] = {
    # pytest benchmarks/ default: every op case at a 32^3 patch (batch 1); dwconv3d fwd+bwd at k >= 13 at the
    # stage shapes of a 16^3 patch (PyTorch's backward at k=21 takes 30-50 s per call at 48x16^3 here).
    "cpu": Size(
        "cpu",
        _dedupe(_dw("fwd", stage_shapes(32, 1), (3, 7, 13, 21))
                + _dw("fwd+bwd", stage_shapes(32, 1), (3, 7))
                + _dw("fwd+bwd", stage_shapes(16, 1), (13, 21))
                + _dw("fwd", _ISSUE3_FWD, (7,)) + _dw("fwd+bwd", _ISSUE3_FWDBWD, (7,))
                + _norm_ops(stage_shapes(64, 1)) + _decoder_ops([(1, 48, 64, 64, 64)])),
        (model_spec("uxnet-small", 32, 1, **SMALL_MODEL),),
        ("float32",), budget_s=0.5, min_rounds=3, max_rounds=20,
        slow_references=(("dwconv3d", "fwd+bwd", (1, 48, 32, 32, 32), 7, "ncdhw"),),
        note="UX-Net stage shapes of a 32^3 patch (dwconv3d fwd+bwd at k>=13: of a 16^3 patch); decoder ops at "
             "48x64^3; model: UXNet feat_size (12,24,48,96), hidden 192 at 32^3",
    ),
    # The paper's sizes (96^3 patches, batch 2) for a GPU machine.
    "paper": Size(
        "paper",
        _dedupe(_dw("fwd", stage_shapes(96, 2), (3, 7, 13, 21)) + _dw("fwd+bwd", stage_shapes(96, 2), (3, 7, 13, 21))
                + _dw("fwd", _ISSUE3_FWD, (7,)) + _dw("fwd+bwd", _ISSUE3_FWDBWD, (7,))
                + _norm_ops(stage_shapes(96, 2)) + _decoder_ops([(2, 48, 96, 96, 96)])),
        (model_spec("uxnet", 96, 2, **DEFAULT_MODEL),),
        ("float32", "bfloat16"), budget_s=1.0, min_rounds=5, max_rounds=100,
        note="UX-Net stage shapes of a 96^3 patch, batch 2; model: the default UXNet at 96^3, batch 2",
    ),
    # uxnet bench default: a quick version of both (< 3 minutes on 2 loaded cores).
    "quick": Size(
        "quick",
        _dedupe(_dw("fwd", stage_shapes(32, 1)[:2], (7, 13)) + _dw("fwd+bwd", stage_shapes(32, 1)[:2], (7,))
                + _norm_ops(stage_shapes(64, 1)[:1]) + _decoder_ops([(1, 48, 32, 32, 32)])),
        (model_spec("uxnet-small", 32, 1, **SMALL_MODEL),),
        ("float32",), budget_s=0.3, min_rounds=3, max_rounds=10,
        note="dwconv3d k=7/13 at the first two stage shapes of a 32^3 patch; norms and decoder ops at 48x32^3; "
             "model: UXNet feat_size (12,24,48,96), hidden 192 at 32^3",
        model_kinds=("inference", "train_step"),
    ),
}


def tiny_size() -> Size:
    """For smoke tests: one small case of each kind, one round."""
    shape = (1, 8, 8, 8, 8)
    return Size("tiny", (OpSpec("dwconv3d", "fwd", shape, 3), OpSpec("dwconv3d", "fwd+bwd", shape, 3))
                + tuple(_norm_ops([shape])),
                (model_spec("uxnet-tiny", 32, 1, in_chans=1, out_chans=2, feat_size=(4, 8, 16, 32), hidden_size=32,
                            depths=(1, 1, 1, 1)),),
                ("float32",), budget_s=0.0, min_rounds=1, max_rounds=1)


# ----------------------------------------------------------------------------------------------- op cases


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
        return _ident(f"{self.group} {self.label}")


def backend_verdict(impl: str, op: str, dtype: torch.dtype, layout: str, device: str) -> Tuple[bool, str]:
    """Whether ``impl`` serves ``op`` for such inputs (the backend's own ``supports`` answer)."""
    if impl == TORCH:
        return True, ""
    probe = _layout(torch.empty((1, 2, 3, 3, 3), dtype=dtype, device=device), layout)
    return dispatch.get_backend_instance(impl).supports(op, probe)


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
    dt, (n, c, *sp) = case.torch_dtype, case.shape
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
        return flops_mod.count_flops(_no_grad(_op_function(case)), *args)
    grad_out = torch.empty(shape, device="meta", dtype=case.torch_dtype)
    return flops_mod.count_flops(_with_backward(_op_function(case)), *args, grad_out)


def op_min_bytes(case: OpCase) -> int:
    """Bytes of activation tensors the case must at least read and write once (parameters are negligible)."""
    return _MIN_TENSOR_PASSES[(case.op, case.mode)] * _numel(case.shape) * case.torch_dtype.itemsize


# -------------------------------------------------------------------------------------------- model cases

MODEL_KINDS = ("inference", "train_step", "reparam_inference")
REP_BRANCHES = ((3, 1), (3, 2))  # spans 3 and 5: fit inside a 7^3 main kernel


@dataclass(frozen=True)
class ModelCase:
    kind: str  # "inference" | "train_step" | "reparam_inference"
    spec: ModelSpec
    backend: str  # "reference" or "auto"
    dtype: str = "float32"
    device: str = "cpu"
    variant: str = ""  # reparam_inference: "branches" (training-time model in eval) or "reparameterized"

    @property
    def group(self) -> str:
        return f"model {self.kind} {self.spec.name} {self.spec.batch}x{self.spec.patch}^3 {self.dtype}"

    @property
    def label(self) -> str:
        return f"{self.variant + ' ' if self.variant else ''}{self.backend}"

    @property
    def is_reference(self) -> bool:
        return self.backend == "reference" and self.variant in ("", "branches")

    @property
    def reference_key(self) -> str:
        return ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        return _ident(f"{self.group} {self.label}")


def reparameterize_function() -> Tuple[Optional[Callable], str]:
    try:
        from uxnet.reparam import reparameterize
    except ImportError as exc:
        return None, f"uxnet.reparam.reparameterize not available ({exc})"
    return reparameterize, ""


def model_cases(size: Size, device: str = "cpu", dtypes: Optional[Sequence[str]] = None,
                kinds: Optional[Sequence[str]] = None) -> List[ModelCase]:
    cases = []
    for spec in size.models:
        for dtype in dtypes or size.dtypes:
            for kind in size.model_kinds if kinds is None else kinds:
                variants = ("branches", "reparameterized") if kind == "reparam_inference" else ("",)
                for variant in variants:
                    for backend in ("reference", "auto"):
                        cases.append(ModelCase(kind, spec, backend, dtype, device, variant))
    return cases


def auto_verdict(case: ModelCase) -> Tuple[bool, str]:
    """For backend "auto": which backend each op would use; not worth a row when that is "reference" for all."""
    if case.backend != "auto":
        return True, ""
    with uk.use_backend("auto"):
        would_use = uk.backend_report(case.device, case.torch_dtype)["would_use"]
    if set(would_use.values()) == {"reference"}:
        return False, f"backend 'auto' runs every op on 'reference' on {case.device} ({case.dtype}): " \
                      f"no fast backend available"
    return True, ", ".join(f"{op}->{name}" for op, name in would_use.items())


def _build_model(case: ModelCase):
    from uxnet import UXNet

    config = case.spec.kwargs
    if case.kind == "reparam_inference":
        config = dict(config, rep_branches=REP_BRANCHES)
    model = UXNet(**config)
    if case.variant == "reparameterized":
        reparameterize, why = reparameterize_function()
        if reparameterize is None:
            raise RuntimeError(why)
        model = reparameterize(model)
    return model.to(device=case.device, dtype=case.torch_dtype)


def build_model_case(case: ModelCase) -> Tuple[Callable, InputPool]:
    spec = case.spec
    model = _build_model(case)
    in_chans, out_chans = spec.kwargs.get("in_chans", 1), spec.kwargs.get("out_chans", 13)
    shape = (spec.batch, in_chans) + (spec.patch,) * 3

    def make_args():
        x = torch.randn(shape, device=case.device, dtype=case.torch_dtype)
        labels = torch.randint(0, out_chans, (spec.batch,) + (spec.patch,) * 3, device=case.device)
        return x, labels

    if case.kind == "train_step":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x, labels):
            with uk.use_backend(case.backend):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).float(), labels)
                loss.backward()
                optimizer.step()
            return loss

        fn = step
    else:
        model.eval()

        def infer(x, labels):
            with uk.use_backend(case.backend), torch.no_grad():
                return model(x)

        fn = infer
    # The weights dominate what a model touches; two inputs are enough to avoid re-running on the same tensor.
    return fn, InputPool(make_args, 2)


@functools.lru_cache(maxsize=None)
def model_flops(spec: ModelSpec, kind: str) -> int:
    """FlopCounterMode's count of the case's work: forward (inference) or forward + backward (training step)."""
    model = flops_mod.build_meta_model(**spec.kwargs)
    x = torch.empty((spec.batch, spec.kwargs.get("in_chans", 1)) + (spec.patch,) * 3, device="meta")
    if kind != "train_step":
        return flops_mod.model_flops(spec.kwargs, (spec.patch,) * 3, spec.batch, model=model)

    def fwd_bwd(inp):
        model(inp).float().sum().backward()

    return flops_mod.count_flops(fwd_bwd, x)


__all__ = ["OpCase", "ModelCase", "Size", "SIZES", "op_cases", "model_cases", "build_op_case", "build_model_case",
           "backend_verdict", "auto_verdict", "op_flops", "op_min_bytes", "model_flops", "is_slow_reference",
           "stage_shapes", "tiny_size"]
