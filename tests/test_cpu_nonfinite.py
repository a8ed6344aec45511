"""NaN and Inf in x or in a weight: the CPU kernels' outputs and gradients are non-finite at exactly the positions
where the float64 reference's are (docs/ARCHITECTURE.md, "Numerics the kernels guarantee"), and match it elsewhere.

Positions cover the borders (where dwconv3d's zero padding meets a non-finite tap) and the interior. The float64
reference is the truth: for dwconv3d with a non-finite weight, PyTorch's float32 F.conv3d (oneDNN) skips padded
taps in the forward and so disagrees with its own float64 result; the kernels follow float64.
"""

import pytest
import torch
from conftest import require_compiled, to_layout

import uxnet_kernels  # noqa: F401  (loads _C and registers the autograd of torch.ops.uxnet)
from uxnet_kernels import reference

EPS = 1e-6
SHAPE = (2, 5, 4, 5, 6)


@pytest.fixture(autouse=True)
def _compiled():
    require_compiled("cpu")


def _dwconv_inputs(dtype, layout, kernel=(3, 5, 3)):
    c = SHAPE[1]
    return {"x": to_layout(torch.randn(SHAPE, dtype=torch.float64).to(dtype), layout),
            "weight": (0.3 * torch.randn(c, 1, *kernel, dtype=torch.float64)).to(dtype),
            "bias": torch.randn(c, dtype=torch.float64).to(dtype)}


def _ln_inputs(dtype, layout):
    c = SHAPE[1]
    return {"x": to_layout((torch.randn(SHAPE, dtype=torch.float64) + 0.5).to(dtype), layout),
            "weight": (1 + 0.3 * torch.randn(c, dtype=torch.float64)).to(dtype),
            "bias": (0.3 * torch.randn(c, dtype=torch.float64)).to(dtype)}


def _mlp_inputs(dtype, layout):
    c = SHAPE[1]

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, dtype=torch.float64)).to(dtype)

    return {"y": to_layout(r(*SHAPE), layout), "residual": to_layout(r(*SHAPE), layout),
            "ln_weight": 1 + r(c, scale=0.3), "ln_bias": r(c, scale=0.3), "w1": r(c, 4), "b1": r(c, 4, scale=0.5),
            "w2": r(c, 4, scale=0.5), "b2": r(c, scale=0.5), "gamma": r(c)}


OPS = {
    "dwconv3d": (_dwconv_inputs, lambda a: torch.ops.uxnet.dwconv3d(a["x"], a["weight"], a["bias"]),
                 lambda a: reference.dwconv3d(a["x"], a["weight"], a["bias"])),
    "layer_norm": (_ln_inputs,
                   lambda a: torch.ops.uxnet.layer_norm_channels_first(a["x"], a["weight"], a["bias"], EPS)[0],
                   lambda a: reference.layer_norm_channels_first(a["x"], a["weight"], a["bias"], EPS)),
    "ux_mlp": (_mlp_inputs, lambda a: torch.ops.uxnet.ux_mlp(*a.values(), EPS)[0],
               lambda a: reference.ux_mlp(*a.values(), EPS)),
}


def _forward_and_grads(fn, inputs, grad_out, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in inputs.items()}
    out = fn(leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(dtype))
    return [("out", out.detach())] + [(f"grad_{k}", g) for k, g in zip(leaves, grads)]


def _positions(t):
    """Flat indices to poison: the first and last element and one in the middle (borders and interior)."""
    return sorted({0, t.numel() // 2 + 1, t.numel() - 1})


# (value, dtype, layout): each value, dtype and layout at least once.
COMBOS = [(float("nan"), torch.float32, "contiguous"), (float("inf"), torch.bfloat16, "channels_last_3d"),
          (-float("inf"), torch.float64, "contiguous"), (float("inf"), torch.float32, "channels_last_3d")]
CASES = [(op, name, *combo) for op, (make, _, _) in OPS.items() for name in make(torch.float32, "contiguous")
         for combo in COMBOS]


@pytest.mark.parametrize("op, name, value, dtype, layout", CASES, ids=str)
def test_non_finite_positions_match_the_float64_reference(op, name, value, dtype, layout):
    make, kernel, ref = OPS[op]
    checked = 0
    for position in _positions(make(dtype, layout)[name]):
        inputs = make(dtype, layout)
        poisoned = inputs[name].detach().contiguous()
        poisoned.view(-1)[position] = value
        inputs[name] = to_layout(poisoned, layout) if poisoned.dim() == 5 else poisoned
        grad_out = torch.randn(SHAPE, dtype=torch.float64).to(dtype)
        got = _forward_and_grads(kernel, inputs, grad_out, dtype)
        want = _forward_and_grads(ref, inputs, grad_out, torch.float64)
        for (what, g), (_, w) in zip(got, want):
            tag = f"{op}: {name}[{position}] = {value}: {what}"
            finite = torch.isfinite(w)
            assert torch.equal(torch.isfinite(g), finite), (
                f"{tag}: non-finite at {int((~torch.isfinite(g)).sum())} positions, reference at "
                f"{int((~finite).sum())}")
            if finite.any():
                err = (g.double()[finite] - w[finite]).norm() / w[finite].norm().clamp_min(1e-30)
                assert err <= {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}[dtype], (
                    f"{tag}: finite values off by {err:.2e}")
            checked += 1
    assert checked >= 3 * 2  # every position, forward and at least one gradient


def test_dwconv3d_nonfinite_weight_border_semantics():
    """The two semantics the float64 reference mixes: forward makes the whole channel non-finite (zero padding
    times Inf), the input gradient only where the tap meets grad_out (k = 7 along W: wide borders)."""
    x = torch.randn(1, 2, 3, 4, 9, dtype=torch.float64)
    w = torch.randn(2, 1, 1, 3, 7, dtype=torch.float64)
    w[1, 0, 0, 0, 0] = float("inf")  # the corner tap: reaches only part of the volume
    out = torch.ops.uxnet.dwconv3d(x, w, None)
    assert not torch.isfinite(out[:, 1]).any() and torch.isfinite(out[:, 0]).all()
    g = torch.randn_like(x)
    grad_x = torch.ops.uxnet.dwconv3d_backward(g, x, w, [True, False, False])[0]
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.dwconv3d(xr, w), xr, g)
    assert torch.equal(torch.isfinite(grad_x), torch.isfinite(want))
    assert 0 < int((~torch.isfinite(grad_x[:, 1])).sum()) < grad_x[:, 1].numel()  # a strict part of the channel
