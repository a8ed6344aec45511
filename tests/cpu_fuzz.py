"""Differential fuzz of the compiled CPU kernels against a float64 truth, under every ISA variant.

Each case draws an op (dwconv3d, layer_norm_channels_first, ux_mlp, and the decoder's instance_norm_lrelu and
instance_norm_add_lrelu with a residual or a one- or two-input projection shortcut, and its dense conv3d_3x3x3), a shape (N up to 3, C from 1
with odd and 16-lane-boundary counts, spatial dims from 1, often smaller than the kernel), per-axis odd kernels up
to 31, a dtype (float32, bfloat16, float64), a layout (NCDHW, channels_last_3d, a strided view) and, in some cases,
a NaN or +-Inf in x or in a weight. It runs the forward and every gradient (through the registered autograd, so the
backward ops too) and compares each with the reference ops run in float64 on the same rounded inputs (the truth):

- non-finite values must sit at exactly the positions where the truth has them;
- on the finite positions, float32 / bfloat16 results pass the tests' rule (tests/ops/checks.py): within
  the dtype's tolerance of the truth (||kernel - truth|| <= tol ||truth||, tol = 1e-5 / 1e-2 as in
  conftest.TOLERANCES), or, where that is out of reach because the result is ill-conditioned, no further from
  the truth than twice PyTorch's own error in that dtype (the flash-attention rule): ||kernel - truth|| <=
  2 ||torch - truth|| + 2 u ||truth||, "torch" being the reference ops run in the kernel's dtype and u the
  dtype's unit roundoff (the rounding of the result itself, which both must pay). A result whose truth is
  exactly 0 (C = 1 gradients) must then be exactly 0;
- conv3d_3x3x3 (Winograd) output, input and weight gradients: the rounding term is 2u times the size the result is
  rounded from (winograd_rounding_scale, winograd_weight_grad_rounding_scale; tests/ops/test_conv3d_3x3x3.py), where
  that exceeds ||truth||: a transform mixes a whole tile window and every tap of a filter into each output, in terms
  that cancel in exact arithmetic;
- float64 results: within 1e-10 ||truth||, or 1e-5 x PyTorch float32's error (the ratio of the two tolerances);
- LayerNorm and UX MLP also pass within twice the statistics floor (see run_floor): their backward ops get the
  forward's mean / rstd in the statistics dtype and not eps, so no implementation can beat the exact gradient
  evaluated with an rstd off by one ulp. For the few-channel cases that are ill-conditioned in rstd this, not
  PyTorch's error, is the bar (one PyTorch implementation's error there does not bound another's: its native
  F.layer_norm exceeds 2x its composite reference's error in 61% of one-voxel C = 2 cases). The summary counts
  the checks each clause passed.
- The instance-norm ops' floor (run_instance_norm_floor) also perturbs the mean by an ulp and takes the kernel's
  LeakyReLU branch where the float64 pre-activation is within the computation's rounding of 0.

Every case is reproducible from its seed, printed with every mismatch:

    python tests/cpu_fuzz.py --seed 1 --cases 10000 --isa all        # 10,000 cases, each under every variant
    python tests/cpu_fuzz.py --case-seed 123456789 --isa avx2 -v      # one case

The reference results are computed once per case and every variant's kernels are checked against them.
"""

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import uxnet_kernels  # noqa: F401  (loads _C and registers the autograd of torch.ops.uxnet)
from uxnet_kernels import cpu_isa, reference

EPS = 1e-6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative, as conftest.TOLERANCES
FLOAT64_TOLERANCE = 1e-10
FLOAT64_PER_FLOAT32 = 1e-5  # the tests' float64 / float32 tolerance ratio
OPS = ("dwconv3d", "layer_norm", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu", "conv3d_3x3x3")
INSTANCE_NORM_OPS = ("instance_norm_lrelu", "instance_norm_add_lrelu")
# Two corners of the instance-norm ops the fuzz leaves out, both ill-conditioned beyond what the rule can judge
# (docs/PERFORMANCE.md, "Reliability"): bfloat16 planes of fewer than MIN_BF16_PLANE voxels (the backward recovers
# the normalised values from the bfloat16 output, and a 2-voxel plane's input gradient is 0 up to eps terms), and
# one-channel shortcut inputs (the normalised projection does not depend on its weight's scale, so that gradient
# is an eps effect).
MIN_BF16_PLANE = 8
# float64 reference work per case (N * C * D * H * W * taps for dwconv3d) is kept under this.
MAX_CONV_WORK = 3_000_000


@dataclasses.dataclass
class Case:
    seed: int
    op: str
    shape: Tuple[int, int, int, int, int]
    kernel: Tuple[int, int, int]  # dwconv3d only
    dtype: str
    layout: str  # contiguous | channels_last_3d | strided
    poison: Optional[Tuple[str, int, str]]  # (tensor name, flat index, "nan" | "inf" | "-inf")
    residual: bool  # ux_mlp; instance_norm_add_lrelu: residual (True) or projection shortcut (False)
    gamma: bool  # ux_mlp
    negative_slope: float = 0.01  # instance-norm ops
    shortcut_channels: Tuple[int, ...] = ()  # instance_norm_add_lrelu with a shortcut: C_i of each input
    out_channels: int = 0  # conv3d_3x3x3

    def describe(self) -> str:
        extra = f" k={self.kernel}" if self.op == "dwconv3d" else ""
        if self.op == "conv3d_3x3x3":
            extra = f" C_out={self.out_channels}"
        if self.op == "ux_mlp":
            extra = f" residual={self.residual} gamma={self.gamma}"
        if self.op in INSTANCE_NORM_OPS:
            extra = f" slope={self.negative_slope}"
            if self.op == "instance_norm_add_lrelu":
                extra += " residual" if self.residual else f" shortcut C_i={self.shortcut_channels}"
        return (f"case seed {self.seed}: {self.op} {self.shape}{extra} {self.dtype} {self.layout}"
                f" poison={self.poison}")


def _channels(rng: random.Random) -> int:
    return rng.choice([1, 2, 3, rng.randint(1, 9), rng.randint(1, 9), rng.choice([15, 16, 17, 31, 32, 33]),
                       rng.randint(4, 40), 48])


def _spatial(rng: random.Random, big: bool) -> int:
    return rng.randint(1, 24) if big else rng.choice([1, 1, 2, 3, rng.randint(1, 6), rng.randint(1, 12)])


def draw_case(seed: int) -> Case:
    """The case of `seed` (a pure function of it)."""
    rng = random.Random(seed)
    op = rng.choice(OPS)
    n = rng.choice([1, 1, 2, 3])
    c = _channels(rng)
    kernel = (1, 1, 1)
    out_channels = _channels(rng) if op == "conv3d_3x3x3" else 0
    while True:
        big_axis = rng.randrange(4)  # one axis may be long (W register blocks, row tails), or none
        d, h, w = (_spatial(rng, big_axis == i) for i in range(3))
        if op == "dwconv3d":
            kernel = tuple(rng.choice([1, 3, 3, 5, 7, rng.randrange(1, 32, 2)]) for _ in range(3))
            if rng.random() < 0.1:
                kernel = (rng.randrange(1, 32, 2),) * 3
            work = n * c * d * h * w * kernel[0] * kernel[1] * kernel[2]
        elif op == "conv3d_3x3x3":
            work = n * c * out_channels * d * h * w * 27
        else:
            work = n * c * d * h * w
        if op in INSTANCE_NORM_OPS and d * h * w < 2:  # statistics over one voxel are rejected, like F.instance_norm
            continue
        if work <= MAX_CONV_WORK:
            break
    dtype = rng.choice(list(DTYPES))
    if op in INSTANCE_NORM_OPS and dtype == "bfloat16" and d * h * w < MIN_BF16_PLANE:
        w = max(w, -(-MIN_BF16_PLANE // (d * h)))
    layout = rng.choice(["contiguous", "channels_last_3d", "strided"])
    poison = None
    if rng.random() < 0.2:
        # instance_norm_add_lrelu: z only. A non-finite residual or shortcut makes the kernel's grad_z NaN over the
        # affected (n, c) planes, where the reference (which keeps z) stays finite: a documented difference
        # (docs/ARCHITECTURE.md), not checked here.
        names = {"dwconv3d": ["x", "weight", "bias"], "conv3d_3x3x3": ["x", "weight", "bias"],
                 "layer_norm": ["x", "weight", "bias"],
                 "ux_mlp": ["y", "residual", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "gamma"],
                 "instance_norm_lrelu": ["x"], "instance_norm_add_lrelu": ["x"]}[op]
        poison = (rng.choice(names), rng.randrange(1 << 30), rng.choice(["nan", "inf", "-inf"]))
    residual, gamma = rng.random() < 0.7, rng.random() < 0.7
    slope, shortcut = 0.01, ()
    if op in INSTANCE_NORM_OPS:
        slope = rng.choice([0.01, 0.01, 0.1, 0.5, 2.0])
        if op == "instance_norm_add_lrelu":
            residual = rng.random() < 0.5
            if not residual:
                shortcut = tuple(rng.choice([2, 3, rng.randint(2, 9), 16, 17, 33])
                                 for _ in range(rng.choice([1, 2])))
    return Case(seed, op, (n, c, d, h, w), kernel, dtype, layout, poison, residual, gamma, slope, shortcut,
                out_channels)


# ---- inputs -------------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":  # every other W element of a wider tensor: not contiguous in any format
        return torch.cat([t, torch.zeros_like(t)], dim=4)[..., ::2] if t.shape[4] > 0 else t
    return t.contiguous()


def make_inputs(case: Case) -> Dict[str, Optional[torch.Tensor]]:
    """The case's inputs, in its dtype and layout (activations) and contiguous (parameters)."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    n, c, d, h, w = case.shape

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)

    if case.op == "dwconv3d":
        fan = case.kernel[0] * case.kernel[1] * case.kernel[2]
        inputs = {"x": rand(n, c, d, h, w), "weight": rand(c, 1, *case.kernel, scale=1 / math.sqrt(fan)),
                  "bias": rand(c)}
    elif case.op == "conv3d_3x3x3":
        inputs = {"x": rand(n, c, d, h, w), "weight": rand(case.out_channels, c, 3, 3, 3, scale=1 / math.sqrt(27 * c)),
                  "bias": rand(case.out_channels)}
    elif case.op == "layer_norm":
        inputs = {"x": rand(n, c, d, h, w, scale=1.5, offset=0.7), "weight": rand(c, scale=0.5, offset=1.0),
                  "bias": rand(c, scale=0.5)}
    elif case.op == "instance_norm_lrelu":
        inputs = {"x": rand(n, c, d, h, w, scale=1.5, offset=0.7)}
    elif case.op == "instance_norm_add_lrelu":
        inputs = {"x": rand(n, c, d, h, w, scale=1.5, offset=0.7),
                  "residual": rand(n, c, d, h, w) if case.residual else None}
        for i, c_i in enumerate(case.shortcut_channels):
            inputs[f"shortcut_input{i}"] = rand(n, c_i, d, h, w, offset=0.2)
            inputs[f"shortcut_weight{i}"] = rand(c, c_i, 1, 1, 1, scale=1 / math.sqrt(c_i))
    else:
        inputs = {"y": rand(n, c, d, h, w, offset=0.3), "residual": rand(n, c, d, h, w) if case.residual else None,
                  "ln_weight": rand(c, scale=0.5, offset=1.0), "ln_bias": rand(c, scale=0.5), "w1": rand(c, 4),
                  "b1": rand(c, 4, scale=0.5), "w2": rand(c, 4, scale=0.5), "b2": rand(c, scale=0.5),
                  "gamma": rand(c) if case.gamma else None}
    inputs["grad_out"] = rand(n, case.out_channels if case.op == "conv3d_3x3x3" else c, d, h, w)
    if case.poison is not None:
        name, index, kind = case.poison
        target = inputs.get(name)
        if target is not None and target.numel() > 0:
            target.view(-1)[index % target.numel()] = float(kind)
    for name in ("x", "y", "residual", "grad_out", "shortcut_input0", "shortcut_input1"):
        if inputs.get(name) is not None:
            inputs[name] = _layout(inputs[name], case.layout)
    return inputs


# ---- running an op: forward and every gradient ----------------------------------------------------------------


def _leaves(inputs, dtype):
    """Detached copies of the differentiable inputs in `dtype`, requiring grad (same dtype: the same strides;
    another dtype: `.to` keeps dense layouts, and makes strided views contiguous, which only the truth sees)."""
    return {name: t if name == "grad_out" or t is None else t.detach().to(dtype).requires_grad_(True)
            for name, t in inputs.items()}


def _shortcut_names(inputs) -> List[str]:
    return sorted(k for k in inputs if k.startswith("shortcut_"))


def run(op: str, inputs, dtype, kernel: bool, slope: float = 0.01) -> List[Tuple[str, torch.Tensor]]:
    """[(name, tensor)] for the forward output and the gradient of every differentiable input, computed in
    `dtype` by the compiled op (kernel=True) or by the reference ops (`slope`: the instance-norm ops' LeakyReLU
    slope)."""
    leaves = _leaves(inputs, dtype)
    if op == "dwconv3d":
        args = [leaves["x"], leaves["weight"], leaves["bias"]]
        names = ["x", "weight", "bias"]
        out = torch.ops.uxnet.dwconv3d(*args) if kernel else reference.dwconv3d(*args)
    elif op == "conv3d_3x3x3":
        args = [leaves["x"], leaves["weight"], leaves["bias"]]
        names = ["x", "weight", "bias"]
        out = torch.ops.uxnet.conv3d_3x3x3(*args) if kernel else reference.conv3d_3x3x3(*args)
    elif op == "layer_norm":
        args = [leaves["x"], leaves["weight"], leaves["bias"]]
        names = ["x", "weight", "bias"]
        out = (torch.ops.uxnet.layer_norm_channels_first(*args, EPS)[0] if kernel
               else reference.layer_norm_channels_first(*args, EPS))
    elif op == "ux_mlp":
        names = ["y", "residual", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "gamma"]
        args = [leaves[k] for k in names]
        out = torch.ops.uxnet.ux_mlp(*args, EPS)[0] if kernel else reference.ux_mlp(*args, EPS)
    elif op == "instance_norm_lrelu":
        names, args = ["x"], [leaves["x"]]
        out = (torch.ops.uxnet.instance_norm_lrelu(leaves["x"], slope, EPS)[0] if kernel
               else reference.instance_norm_lrelu(leaves["x"], slope, EPS))
    else:
        names = ["x", "residual"] + _shortcut_names(leaves)
        args = [leaves[k] for k in names]
        shortcut_inputs = [leaves[k] for k in names if k.startswith("shortcut_input")]
        shortcut_weights = [leaves[k] for k in names if k.startswith("shortcut_weight")]
        call = torch.ops.uxnet.instance_norm_add_lrelu if kernel else reference.instance_norm_add_lrelu
        out = call(leaves["x"], leaves["residual"], shortcut_inputs, shortcut_weights, slope, EPS)
        if kernel:
            out = out[0]
    wrt = [(name, a) for name, a in zip(names, args) if a is not None]
    grads = torch.autograd.grad(out, [a for _, a in wrt], inputs["grad_out"].to(dtype), allow_unused=True)
    results = [("out", out.detach())]
    for (name, a), g in zip(wrt, grads):
        results.append((f"grad_{name}", torch.zeros_like(a) if g is None else g))
    return results


def inplace_mismatch(inputs, dtype, slope: float, out: torch.Tensor) -> Optional[str]:
    """uxnet::instance_norm_add_lrelu_inplace on a copy of x with x's strides (the strided layout has gaps, so it
    runs through its temporary) must write exactly the functional op's output ``out``; None when it does."""
    leaves = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in _leaves(inputs, dtype).items()}
    x = leaves["x"]
    z = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)
    names = _shortcut_names(leaves)
    torch.ops.uxnet.instance_norm_add_lrelu_inplace(
        z, leaves["residual"], [leaves[k] for k in names if k.startswith("shortcut_input")],
        [leaves[k] for k in names if k.startswith("shortcut_weight")], slope, EPS)
    if z.stride() != x.stride():
        return f"strides changed from {x.stride()} to {z.stride()}"
    same = (z == out) | (torch.isnan(z) & torch.isnan(out))
    return None if bool(same.all()) else f"{int((~same).sum())} elements differ from the functional op's output"


# ---- the float32-statistics floor ---------------------------------------------------------------------------
# The backward ops receive the forward's per-voxel statistics as float32 tensors (their schema) and not eps, so no
# implementation can do better than the exact gradient formula evaluated with a float32-rounded rstd. Where a result
# is ill-conditioned in rstd (few channels: C = 2 makes xhat = +-1 up to eps terms), that floor, not PyTorch's
# error, is the bar: PyTorch's error there is one coin toss of rounding (its native F.layer_norm exceeds 2x its
# composite reference's error in 61% of one-voxel C = 2 cases). The floor is the float64 result with rstd scaled by
# (1 + 2^-23), about one float32 ulp. For float64 kernels the same evaluation with rstd off by one float64 ulp is a
# second float64 implementation of the gradient: its distance from the reference measures the reference's own
# rounding where a result is pure noise (C = 1 gradients, exactly 0, come out of F.layer_norm as ~1e-13).
RSTD_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-23, torch.float64: 2.0**-52}


class _NormalizeWithRoundedRstd(torch.autograd.Function):
    """(x - mean) * rstd * (1 + rel) over `dims` (LayerNorm: channels; instance norm: D, H, W), in float64, with the
    normalisation's gradient formula for that rstd."""

    @staticmethod
    def forward(ctx, x, rel, dims=(1,), mean_rel=0.0):
        centred = x - x.mean(dims, keepdim=True) * (1 + mean_rel)
        rstd = (centred.pow(2).mean(dims, keepdim=True) + EPS).rsqrt() * (1 + rel)
        xhat = centred * rstd
        ctx.save_for_backward(xhat, rstd)
        ctx.dims = dims
        return xhat

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd = ctx.saved_tensors
        dims = ctx.dims
        return (rstd * (grad - grad.mean(dims, keepdim=True) - xhat * (grad * xhat).mean(dims, keepdim=True)),
                None, None, None)


# ---- the instance-norm ops' floor ------------------------------------------------------------------------------
# Two things no float32 / bfloat16 implementation can avoid, and PyTorch's own error is a coin toss of:
# - the statistics: the mean and rstd of a plane are float32 numbers when they are applied (PyTorch applies
#   x * rstd - mean * rstd with float32 coefficients too); with few voxels or a large mean a plane is ill-conditioned
#   in them (2 voxels: xhat = +-1 up to eps terms). The floor perturbs both by one float32 ulp.
# - LeakyReLU's branch: where the float64 pre-activation lies within the rounding of the computation (a few units
#   of roundoff of its terms, z's normalised value, the residual or the normalised projection, and, for a
#   projection, the projection itself rounded to the dtype), either branch is a correct rounding of the same
#   result, and the gradient there differs by a factor of the slope. The floor takes the kernel's branch (from the
#   sign of its output) at those positions and the float64 branch everywhere else, so a wrong branch outside the
#   band is still a mismatch.


def _float64_results(out, leaves, names, grad_out) -> Dict[str, torch.Tensor]:
    """{"out": out, "grad_<name>": its gradient} for the float64 leaves named (zeros for unused ones)."""
    wrt = [(name, leaves[name]) for name in names if leaves[name] is not None]
    grads = torch.autograd.grad(out, [a for _, a in wrt], grad_out.double(), allow_unused=True)
    result = {"out": out.detach()}
    for (name, a), g in zip(wrt, grads):
        result[f"grad_{name}"] = torch.zeros_like(a) if g is None else g
    return result


def run_instance_norm_floor(op: str, inputs, dtype, slope: float, kernel_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    leaves = _leaves(inputs, torch.float64)
    rel = RSTD_ULP[dtype]
    u = UNIT_ROUNDOFF[dtype] if dtype != torch.float64 else 2.0**-53
    norm = lambda t: _NormalizeWithRoundedRstd.apply(t, rel, (2, 3, 4), rel)  # noqa: E731
    xhat = norm(leaves["x"])
    shortcut = _shortcut_names(leaves) if op == "instance_norm_add_lrelu" else []
    names = ["x"] + (["residual"] + shortcut if op == "instance_norm_add_lrelu" else [])
    residual, scale = torch.zeros_like(xhat), torch.zeros_like(xhat)
    if op == "instance_norm_add_lrelu" and leaves["residual"] is not None:
        residual = leaves["residual"]
    elif shortcut:
        ins, ws = [leaves[k] for k in shortcut[:len(shortcut) // 2]], [leaves[k] for k in shortcut[len(shortcut) // 2:]]
        projection = sum(torch.nn.functional.conv3d(a, w) for a, w in zip(ins, ws))
        residual = norm(projection)
        with torch.no_grad():
            centred = projection - projection.mean((2, 3, 4), keepdim=True)
            scale = projection.abs() * (centred.pow(2).mean((2, 3, 4), keepdim=True) + EPS).rsqrt()
    pre = xhat + residual
    with torch.no_grad():
        band = 4 * u * (xhat.abs() + residual.abs() + scale)
        positive = torch.where(pre.abs() <= band, kernel_out.double() > 0, pre > 0)
    out = torch.where(positive, pre, slope * pre)
    return _float64_results(out, leaves, names, inputs["grad_out"])


def _layer_norm_floor(rel, x, weight, bias):
    return weight[:, None, None, None] * _NormalizeWithRoundedRstd.apply(x, rel, (1,)) + bias[:, None, None, None]


def _ux_mlp_floor(rel, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma):
    c = y.shape[1]
    normed = _layer_norm_floor(rel, y, ln_weight, ln_bias)
    hidden = torch.nn.functional.gelu(torch.nn.functional.conv3d(normed, w1.reshape(4 * c, 1, 1, 1, 1),
                                                                 b1.reshape(-1), groups=c))
    out = torch.nn.functional.conv3d(hidden, w2.reshape(c, 4, 1, 1, 1), b2, groups=c)
    if gamma is not None:
        out = gamma[:, None, None, None] * out
    return out if residual is None else residual + out


def run_floor(op: str, inputs, dtype, slope: float = 0.01) -> Optional[Dict[str, torch.Tensor]]:
    """The statistics floor of every output of `op` for kernels in `dtype` (None for dwconv3d, which saves no
    statistics; the instance-norm ops' floor depends on the kernel's output: run_instance_norm_floor)."""
    if op in ("dwconv3d", "conv3d_3x3x3") or op in INSTANCE_NORM_OPS:
        return None
    leaves = _leaves(inputs, torch.float64)
    if op == "layer_norm":
        names = ["x", "weight", "bias"]
        out = _layer_norm_floor(RSTD_ULP[dtype], *[leaves[k] for k in names])
    else:
        names = ["y", "residual", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "gamma"]
        out = _ux_mlp_floor(RSTD_ULP[dtype], *[leaves[k] for k in names])
    return _float64_results(out, leaves, names, inputs["grad_out"])


def winograd_rounding_scale(x: torch.Tensor, w: torch.Tensor) -> float:
    """||s|| for s[n, co, p] = sqrt(sum over ci of (sum of x^2 over the 5x5x5 window around p) * (sum of w[co, ci]^2)),
    the size of the terms a Winograd F(2x2x2, 3x3x3) output is rounded from (non-finite values count as 0)."""
    x64 = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
    w64 = torch.nan_to_num(w.double(), nan=0.0, posinf=0.0, neginf=0.0)
    c = x64.shape[1]
    window = torch.nn.functional.conv3d(x64 ** 2, torch.ones(c, 1, 5, 5, 5, dtype=torch.float64), padding=2,
                                        groups=c)
    return torch.einsum("ncdhw,oc->nodhw", window, (w64 ** 2).sum((2, 3, 4))).sqrt().norm().item()


def winograd_weight_grad_rounding_scale(x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """||s|| over (co, ci, tap) for s[co, ci] = sqrt(sum over n and p of grad_out[n, co, p]^2 * (sum of x[n, ci]^2 over
    the 5x5x5 window around p)), the same for the 27 taps: the size of the terms the Winograd weight gradient sums
    (each tile's transformed window times its transformed output gradient, mixed into every tap)."""
    x64 = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
    g64 = torch.nan_to_num(grad_out.double(), nan=0.0, posinf=0.0, neginf=0.0)
    c = x64.shape[1]
    window = torch.nn.functional.conv3d(x64 ** 2, torch.ones(c, 1, 5, 5, 5, dtype=torch.float64), padding=2,
                                        groups=c)
    return (27 * torch.einsum("nodhw,ncdhw->oc", g64 ** 2, window).sum()).sqrt().item()


def rounding_scales(op: str, inputs) -> Dict[str, float]:
    """Per result name, the size it is rounded from where that is not the result itself (conv3d_3x3x3)."""
    if op != "conv3d_3x3x3":
        return {}
    w = inputs["weight"]
    return {"out": winograd_rounding_scale(inputs["x"], w),
            "grad_x": winograd_rounding_scale(inputs["grad_out"], w.transpose(0, 1)),
            "grad_weight": winograd_weight_grad_rounding_scale(inputs["x"], inputs["grad_out"])}


# ---- the comparison -------------------------------------------------------------------------------------------


def compare(got: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor, dtype,
            floor: Optional[torch.Tensor] = None, scale: float = 0.0) -> Tuple[Optional[str], str]:
    """(None, the clause that passed) if `got` passes (see the module docstring), else (why not, "").
    `torch_same_dtype`: the reference ops in the kernel's dtype (float32 for float64 kernels); `floor`: the float64
    result with the saved statistics off by an ulp (run_floor, run_instance_norm_floor), or None; `scale`: the size the
    result is rounded from where larger than ||truth|| (rounding_scales), else 0."""
    if got.shape != truth.shape:
        return f"shape {tuple(got.shape)} != {tuple(truth.shape)}", ""
    got64, torch64 = got.double(), torch_same_dtype.double()
    finite = torch.isfinite(truth)
    wrong = torch.isfinite(got64) != finite
    if wrong.any():
        where = wrong.nonzero()[0].tolist()
        return (f"non-finite positions differ at {int(wrong.sum())} elements, e.g. {where}: kernel "
                f"{got64[tuple(where)].item()}, truth {truth[tuple(where)].item()}"), ""
    ref_norm = truth[finite].norm().item()
    err = (got64[finite] - truth[finite]).norm().item()
    both = torch.isfinite(torch64) & finite  # (where PyTorch itself overflows or gives NaN it has no error to compare)
    torch_err = (torch64[both] - truth[both]).norm().item()
    rounding = 2 * UNIT_ROUNDOFF[dtype] * max(ref_norm, scale)
    if dtype == torch.float64:
        if err <= FLOAT64_TOLERANCE * ref_norm:
            return None, "tolerance"
        if err <= FLOAT64_PER_FLOAT32 * torch_err:
            return None, "1e-5x PyTorch float32"
    else:
        if err <= TOLERANCE[dtype] * ref_norm:
            return None, "tolerance"
        if err <= 2 * torch_err + rounding:
            return None, "2x PyTorch"
    floor_err = math.nan
    if floor is not None:
        floor_err = (floor[finite] - truth[finite]).norm().item()
        if err <= 2 * floor_err + rounding:
            return None, "statistics floor"
    if dtype == torch.float64:
        return (f"error {err:.3e} (||truth|| {ref_norm:.3e}) > 1e-10 ||truth||, > 1e-5 x PyTorch float32's "
                f"{torch_err:.3e} and > 2 x the statistics floor {floor_err:.3e} (+ 2u ||truth||)"), ""
    return (f"error {err:.3e} (||truth|| {ref_norm:.3e}) > {TOLERANCE[dtype]:.0e} ||truth||, > 2 x PyTorch's "
            f"{torch_err:.3e} and > 2 x the float32-statistics floor {floor_err:.3e} (+ 2u ||truth||)"), ""


@dataclasses.dataclass
class Tally:
    cases: int = 0
    checks: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    passed_by: Dict[str, int] = dataclasses.field(default_factory=dict)  # clause of compare() -> checks


def check_case(case: Case, isas: Sequence[str], tallies: Dict[str, Tally], verbose: bool = False) -> List[str]:
    """Runs one case under every variant in `isas`; returns the mismatch messages."""
    dtype = DTYPES[case.dtype]
    inputs = make_inputs(case)
    slope = case.negative_slope
    truth = dict(run(case.op, inputs, torch.float64, kernel=False, slope=slope))
    # float64 has no higher-precision truth; PyTorch's float32 error is the yardstick of how ill-conditioned a result
    # is (e.g. gradients that are exactly 0 but come out as rounding noise from the float64 reference).
    same = dict(run(case.op, inputs, dtype if dtype != torch.float64 else torch.float32, kernel=False, slope=slope))
    floor = run_floor(case.op, inputs, dtype, slope)
    scales = rounding_scales(case.op, inputs)
    failures = []
    previous = os.environ.get("UXNET_CPU_ISA")
    try:
        for isa in isas:
            os.environ["UXNET_CPU_ISA"] = isa
            start = time.perf_counter()
            got = run(case.op, inputs, dtype, kernel=True, slope=slope)
            if case.op in INSTANCE_NORM_OPS:
                floor = run_instance_norm_floor(case.op, inputs, dtype, slope, got[0][1])
            tally = tallies[isa]
            tally.seconds += time.perf_counter() - start
            tally.cases += 1
            if case.op == "instance_norm_add_lrelu":
                tally.checks += 1
                why = inplace_mismatch(inputs, dtype, slope, got[0][1])
                if why is not None:
                    tally.mismatches += 1
                    failures.append(f"[{isa}] {case.describe()}: out_inplace: {why}\n"
                                    f"    reproduce: python tests/cpu_fuzz.py --case-seed {case.seed} --isa {isa} -v")
            for name, tensor in got:
                tally.checks += 1
                why, clause = compare(tensor, same[name], truth[name], dtype, None if floor is None else floor[name],
                                      scales.get(name, 0.0))
                if why is not None:
                    tally.mismatches += 1
                    failures.append(f"[{isa}] {case.describe()}: {name}: {why}\n"
                                    f"    reproduce: python tests/cpu_fuzz.py --case-seed {case.seed} --isa {isa} -v")
                    continue
                tally.passed_by[clause] = tally.passed_by.get(clause, 0) + 1
                if verbose:
                    print(f"[{isa}] {case.describe()}: {name} ok ({clause})")
    finally:
        if previous is None:
            os.environ.pop("UXNET_CPU_ISA", None)
        else:
            os.environ["UXNET_CPU_ISA"] = previous
    return failures


def case_seeds(seed: int, cases: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(1 << 62) for _ in range(cases)]


def resolve_isas(spec: str) -> List[str]:
    """"all": every variant this machine runs; else a comma-separated list."""
    if spec == "all":
        return cpu_isa.available()
    return [s for s in spec.split(",") if s]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="master seed (default: random, printed)")
    parser.add_argument("--cases", type=int, default=200, help="cases (each runs under every variant)")
    parser.add_argument("--case-seed", type=int, default=None, help="run only this case")
    parser.add_argument("--isa", default="all", help="'all' (every variant this machine runs) or a list: avx2,generic")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    isas = resolve_isas(args.isa)
    unavailable = [i for i in isas if i not in cpu_isa.available()]
    if unavailable:
        print(f"not available here: {unavailable}; available: {cpu_isa.available()}", file=sys.stderr)
        return 2
    if args.case_seed is not None:
        seeds = [args.case_seed]
        print(f"one case, seed {args.case_seed}, variants {', '.join(isas)}")
    else:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
        seeds = case_seeds(seed, args.cases)
        print(f"fuzz seed {seed}: {args.cases} cases x variants {', '.join(isas)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads (reproduce: python tests/cpu_fuzz.py --seed {seed} "
              f"--cases {args.cases} --isa {args.isa})", flush=True)
    tallies = {isa: Tally() for isa in isas}
    failures = []
    start = time.perf_counter()
    for i, case_seed in enumerate(seeds):
        case = draw_case(case_seed)
        if args.verbose:
            print(case.describe())
        for message in check_case(case, isas, tallies, args.verbose):
            print(message, flush=True)
            failures.append(message)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} cases, {len(failures)} mismatches, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{'variant':16s} {'cases':>7s} {'checks':>8s} {'mismatches':>10s} {'kernel s':>9s}  passed by")
    for isa, t in tallies.items():
        clauses = ", ".join(f"{k} {v}" for k, v in sorted(t.passed_by.items()))
        print(f"{isa:16s} {t.cases:7d} {t.checks:8d} {t.mismatches:10d} {t.seconds:9.1f}  {clauses}")
    print(f"total {time.perf_counter() - start:.0f} s (references included)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
