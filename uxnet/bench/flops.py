"""FLOPs (``torch.utils.flop_counter.FlopCounterMode``) and parameters of UXNet configurations and of the ops.

Counting runs on the meta device: no memory, no time, same count as a real run.

Convention: FlopCounterMode counts 2 FLOPs per multiply-add of every convolution and matmul and nothing else
(no bias, norm or activation). The paper's 639.4 G for the default model is neither this count (1,155.6 G) nor
the multiply-add count (577.8 G); see docs/PERFORMANCE.md.

Our compiled ops ``torch.ops.uxnet.*`` are unknown to FlopCounterMode, which would count 0 for them. We register
formulas that give exactly what it counts for the reference path (``F.conv3d`` with groups=C for dwconv3d; the
two grouped 1x1x1 convolutions of ux_mlp; nothing for LayerNorm, like ``aten.layer_norm``), so a count is the same
whichever backend runs the model.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from uxnet_kernels import _extension

from ..networks.nets.uxnet import UXNet, count_parameters

PAPER_PATCH = (96, 96, 96)
DEFAULT_MODEL = dict(in_chans=1, out_chans=14)  # the paper's BTCV/FLARE-style setting used for Table 1
PAPER_TABLE1 = {"params_m": 53.0, "flops_g": 639.4}
# Table 3 (kernel-size ablation): parameters in millions; the paper gives no FLOPs there.
PAPER_TABLE3_PARAMS_M = {3: 52.5, 5: 52.7, 7: 53.0, 9: 53.6, 11: 54.4, 13: 55.7}


def _dwconv3d_count(x_shape, w_shape) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(x_shape))


def _ux_mlp_count(y_shape) -> int:
    n, c, *spatial = y_shape
    hidden = [n, 4 * c, *spatial]
    pwconv1 = conv_flop_count([n, c, *spatial], [4 * c, 1, 1, 1, 1], hidden)
    pwconv2 = conv_flop_count(hidden, [c, 4, 1, 1, 1], [n, c, *spatial])
    return pwconv1 + pwconv2


def _register_uxnet_formulas() -> None:
    ops = torch.ops.uxnet

    @register_flop_formula(ops.dwconv3d)
    def _dwconv3d(x_shape, w_shape, bias_shape, *args, out_shape=None, **kwargs):
        return _dwconv3d_count(x_shape, w_shape)

    @register_flop_formula(ops.dwconv3d_backward)
    def _dwconv3d_backward(grad_out_shape, x_shape, w_shape, output_mask, *args, out_shape=None, **kwargs):
        # like aten.convolution_backward: one convolution's worth for grad_input and one for grad_weight
        return (int(bool(output_mask[0])) + int(bool(output_mask[1]))) * _dwconv3d_count(x_shape, w_shape)

    @register_flop_formula(ops.ux_mlp)
    def _ux_mlp(y_shape, *args, out_shape=None, **kwargs):
        return _ux_mlp_count(y_shape)

    @register_flop_formula(ops.ux_mlp_backward)
    def _ux_mlp_backward(grad_out_shape, y_shape, *args, out_shape=None, **kwargs):
        # the reference's autograd: grad_input and grad_weight of both grouped 1x1x1 convolutions
        return 2 * _ux_mlp_count(y_shape)


if _extension.LOADED:
    _register_uxnet_formulas()


def _grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                                _output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's ``conv_backward_flop`` ignores ``groups``: it counts the weight gradient of a grouped convolution
    as if it were dense, ``groups`` times too much (48x for a 48-channel depthwise conv). Same formula, per group."""
    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    count = 0
    if output_mask[0]:
        count += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        first, second = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        count += conv_flop_count(t(first), t(second), t(out_shape[1]), transposed=False) // groups
    return count


_CORRECTIONS = {torch.ops.aten.convolution_backward: _grouped_conv_backward_flop}


def count_flops(fn, *args) -> int:
    """FLOPs FlopCounterMode counts for ``fn(*args)`` (use meta tensors to count for free), with the weight
    gradient of grouped convolutions counted per group."""
    with FlopCounterMode(display=False, custom_mapping=_CORRECTIONS) as counter:
        fn(*args)
    return counter.get_total_flops()


def build_meta_model(**config) -> torch.nn.Module:
    """A UXNet on the meta device, without allocating or initialising its weights when the constructor allows."""
    try:
        with torch.device("meta"):
            return UXNet(**config)
    except NotImplementedError:
        # The constructor reads a tensor's values (drop-path rates), which meta tensors do not have: build on the
        # CPU and move; same modules, same count, only slower.
        return UXNet(**config).to("meta")


def model_flops(config: Dict, patch: Sequence[int] = PAPER_PATCH, batch: int = 1, model=None,
                backward: bool = False) -> int:
    """FLOPs of UXNet(**config) (or of ``model``, built from it) on a (batch, in_chans, *patch) input: the forward
    pass, or with ``backward`` the forward pass and the backward of the sum of its float32 output."""
    model = model if model is not None else build_meta_model(**config)
    x = torch.empty((batch, config.get("in_chans", 1), *patch), device="meta")
    if backward:
        return count_flops(lambda inp: model(inp).float().sum().backward(), x)
    with torch.no_grad():
        return count_flops(model, x)


@dataclass
class ModelRow:
    name: str
    config: Dict
    params: int
    flops: int
    paper_params_m: Optional[float] = None
    paper_flops_g: Optional[float] = None

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_dict(self) -> Dict:
        return dict(name=self.name, config=self.config, params=self.params, flops=self.flops, macs=self.macs,
                    paper_params_m=self.paper_params_m, paper_flops_g=self.paper_flops_g,
                    patch=list(PAPER_PATCH), batch=1)


def model_row(name: str, config: Dict, paper_params_m=None, paper_flops_g=None) -> ModelRow:
    model = build_meta_model(**config)
    return ModelRow(name, dict(config), count_parameters(model), model_flops(config, model=model),
                    paper_params_m, paper_flops_g)


def default_model_row() -> ModelRow:
    return model_row("UXNet default (Table 1)", DEFAULT_MODEL, PAPER_TABLE1["params_m"], PAPER_TABLE1["flops_g"])


def paper_table(kernels: Sequence[int] = tuple(PAPER_TABLE3_PARAMS_M)) -> List[ModelRow]:
    """Table 1's row and Table 3's kernel ablation, each at a 96^3 patch, batch 1."""
    rows = [default_model_row()]
    for k in kernels:
        if k == 7:
            continue  # identical to the default row
        rows.append(model_row(f"kernel {k}^3 (Table 3)", dict(DEFAULT_MODEL, kernel_size=k),
                              PAPER_TABLE3_PARAMS_M.get(k)))
    return rows


def format_table(rows: Sequence[ModelRow]) -> str:
    head = f"{'model (96^3 patch, batch 1)':40s} {'params':>12s} {'paper':>7s} {'GFLOPs':>9s} {'GMACs':>8s} {'paper G':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        paper_p = f"{r.paper_params_m:.1f}M" if r.paper_params_m is not None else "-"
        paper_f = f"{r.paper_flops_g:.1f}" if r.paper_flops_g is not None else "-"
        lines.append(f"{r.name:40s} {r.params:>12,d} {paper_p:>7s} {r.flops / 1e9:>9.1f} {r.macs / 1e9:>8.1f} "
                     f"{paper_f:>8s}")
    return "\n".join(lines)


PAPER_PARAMS_TOLERANCE_M = 0.06  # 0.1 M rounding; the paper prints 52,551,470 (k = 3) as 52.5 M


def matches_paper_params(row: ModelRow) -> bool:
    """Whether the count agrees with the paper's (printed to 0.1 M) up to its rounding."""
    return row.paper_params_m is None or abs(row.params / 1e6 - row.paper_params_m) <= PAPER_PARAMS_TOLERANCE_M
