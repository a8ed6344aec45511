"""The size presets of the benchmarks (``uxnet bench --size``, ``pytest benchmarks/ --uxnet-size``): which op
workloads and model workloads each one times, in which dtypes, with which timing budget; and the names the cases
are made of (ops, modes, dtypes, model case kinds, shapes)."""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .flops import DEFAULT_MODEL

OPS = ("dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu",
       "conv3d_3x3x3")
ENCODER_NORM_OPS = OPS[1:3]
DECODER_OPS = OPS[3:5]
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MODEL_CASE_KINDS = ("inference", "train_step", "reparam_inference")


def stage_shapes(patch: int, batch: int) -> List[Tuple[int, ...]]:
    """(N, C, D, H, W) of the four UX-Net encoder stages for a patch^3 input: 48/96/192/384 channels at
    patch/2, /4, /8, /16."""
    return [(batch, 48 * 2 ** i) + (patch // 2 ** (i + 1),) * 3 for i in range(4)]


def shape_str(shape: Sequence[int]) -> str:
    n, c, *sp = shape
    spatial = f"{sp[0]}^3" if len(set(sp)) == 1 else "x".join(map(str, sp))
    return f"{n}x{c}x{spatial}"


def case_id(text: str) -> str:
    """A pytest-id / -k friendly form: "1x48x16^3" -> "1x48x16c", spaces -> "-", "+" -> "_"."""
    return text.replace("^3", "c").replace(" ", "-").replace("+", "_")


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
    model_kinds: Tuple[str, ...] = MODEL_CASE_KINDS


def _dw(mode, shapes, kernels):
    return [OpSpec("dwconv3d", mode, s, k) for k in kernels for s in shapes]


def _norm_ops(shapes):
    return [OpSpec(op, mode, s) for op in ENCODER_NORM_OPS for mode in MODES for s in shapes]


def _decoder_ops(shapes):
    """The decoder's norm + activation ops at full-resolution decoder shapes (48 channels at the patch size)."""
    return [OpSpec(op, mode, s) for op in DECODER_OPS for mode in MODES for s in shapes]


def _conv3d(shapes):
    """The UNETR blocks' dense 3x3x3 convolution, C -> C (not in the model's path yet)."""
    return [OpSpec("conv3d_3x3x3", mode, s) for mode in MODES for s in shapes]


def _dedupe(specs):
    return tuple(dict.fromkeys(specs))


# A narrow UXNet (same architecture, 1/4 of the width) so that a CPU training step takes seconds, not minutes.
SMALL_MODEL = dict(in_chans=1, out_chans=14, feat_size=(12, 24, 48, 96), hidden_size=192)

_DW_FWD_STAGES_96 = [(1, c, s, s, s) for (_, c, s, _, _) in stage_shapes(96, 1)]  # stage shapes of a 96^3 patch, N=1
_DW_FWDBWD_FIRST_STAGES = [(1, 48, 32, 32, 32), (1, 96, 16, 16, 16)]  # the first two stages at a 32^3 patch

SIZES: Dict[str, Size] = {
    # pytest benchmarks/ default: every op case at a 32^3 patch (batch 1); dwconv3d fwd+bwd at k >= 13 at the
    # stage shapes of a 16^3 patch (PyTorch's backward at k=21 takes 30-50 s per call at 48x16^3 here).
    "cpu": Size(
        "cpu",
        _dedupe(_dw("fwd", stage_shapes(32, 1), (3, 7, 13, 21))
                + _dw("fwd+bwd", stage_shapes(32, 1), (3, 7))
                + _dw("fwd+bwd", stage_shapes(16, 1), (13, 21))
                + _dw("fwd", _DW_FWD_STAGES_96, (7,)) + _dw("fwd+bwd", _DW_FWDBWD_FIRST_STAGES, (7,))
                + _norm_ops(stage_shapes(64, 1)) + _decoder_ops([(1, 48, 64, 64, 64)])
                + _conv3d(stage_shapes(32, 1)[:2])),
        (model_spec("uxnet-small", 32, 1, **SMALL_MODEL),),
        ("float32",), budget_s=0.5, min_rounds=3, max_rounds=20,
        slow_references=(("dwconv3d", "fwd+bwd", (1, 48, 32, 32, 32), 7, "ncdhw"),),
        note="UX-Net stage shapes of a 32^3 patch (dwconv3d fwd+bwd at k>=13: of a 16^3 patch); decoder ops at "
             "48x64^3; conv3d_3x3x3 C -> C at the first two stage shapes; model: UXNet feat_size (12,24,48,96), "
             "hidden 192 at 32^3",
    ),
    # The paper's sizes (96^3 patches, batch 2) for a GPU machine.
    "paper": Size(
        "paper",
        _dedupe(_dw("fwd", stage_shapes(96, 2), (3, 7, 13, 21)) + _dw("fwd+bwd", stage_shapes(96, 2), (3, 7, 13, 21))
                + _dw("fwd", _DW_FWD_STAGES_96, (7,)) + _dw("fwd+bwd", _DW_FWDBWD_FIRST_STAGES, (7,))
                + _norm_ops(stage_shapes(96, 2)) + _decoder_ops([(2, 48, 96, 96, 96)])
                + _conv3d(stage_shapes(96, 2))),
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


__all__ = ["OpSpec", "ModelSpec", "Size", "SIZES", "model_spec", "tiny_size", "stage_shapes", "shape_str", "case_id",
           "OPS", "MODES", "DTYPES", "MODEL_CASE_KINDS", "SMALL_MODEL"]
