"""The CPU kernels of uxnet::layer_norm_channels_first and uxnet::ux_mlp (csrc/cpu) against the reference ops.

Called through ``torch.ops.uxnet.*`` with the autograd registered in uxnet_kernels/_cpp_ops.py, so the forward
kernels, the backward kernels and their wiring are all checked. Every kernel output is allocated with
``torch.empty``; the tests run with ``torch.utils.deterministic.fill_uninitialized_memory`` on, which fills such
buffers with NaN before the kernel writes them (the poisoning), and a NaN left behind fails the comparison.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uxnet_kernels  # noqa: F401  (loads _C, registers fake impls and autograd of torch.ops.uxnet)
from uxnet_kernels import reference
from conftest import (
    TOLERANCES,
    assert_close_rel,
    poisoned_empty_tensors,
    reference_dtype,
    rel_error,
    require_cpu_kernels,
    to_layout,
)
from cpu_fuzz import UNIT_ROUNDOFF
from op_cases import upcast

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last_3d"]
EPS = 1e-6


@pytest.fixture(autouse=True)
def _require_kernels():
    require_cpu_kernels("layer_norm_channels_first", "ux_mlp")


@pytest.fixture(autouse=True)
def _poison_empty_outputs():
    with poisoned_empty_tensors():
        yield


# ---- inputs ----------------------------------------------------------------------------------------------------


def _rand(shape, dtype, layout=None, scale=1.0, offset=0.0):
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    return to_layout(t, layout) if layout is not None else t


def layer_norm_inputs(shape, dtype, layout):
    c = shape[1]
    # An offset mean per voxel makes the statistics matter (a cancellation-prone case for the variance).
    x = _rand(shape, dtype, layout, scale=1.5, offset=0.7)
    return [x, _rand((c,), dtype, scale=0.5, offset=1.0), _rand((c,), dtype, scale=0.5)]


def ux_mlp_inputs(shape, dtype, layout, residual=True, gamma=True):
    """[y, residual, ln_weight, ln_bias, w1 (C,4), b1 (C,4), w2 (C,4), b2, gamma] with the schema's shapes."""
    c = shape[1]
    return [
        _rand(shape, dtype, layout, offset=0.3),
        _rand(shape, dtype, layout) if residual else None,
        _rand((c,), dtype, scale=0.5, offset=1.0),
        _rand((c,), dtype, scale=0.5),
        _rand((c, 4), dtype),
        _rand((c, 4), dtype, scale=0.5),
        _rand((c, 4), dtype, scale=0.5),
        _rand((c,), dtype, scale=0.5),
        _rand((c,), dtype) if gamma else None,
    ]


def _layer_norm_kernel(x, w, b):
    return torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)[0]


def _layer_norm_reference(x, w, b):
    return reference.layer_norm_channels_first(x, w, b, EPS)


def _ux_mlp_kernel(y, res, lnw, lnb, w1, b1, w2, b2, gamma):
    return torch.ops.uxnet.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2, gamma, EPS)[0]


def _ux_mlp_reference(y, res, lnw, lnb, w1, b1, w2, b2, gamma):
    return reference.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2, gamma, EPS)


def _forward_and_grads(fn, args, grad_out):
    out = fn(*args)
    wrt = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(out, wrt, grad_out.to(out.dtype)))
    return out, [None if a is None else next(grads) for a in args]


def check_against_reference(kernel, ref, args, dtype):
    """Kernel in `dtype` vs the reference in float32/64 from the same rounded inputs: output and every grad."""
    fast = upcast(args, dtype)
    slow = upcast(args, reference_dtype(dtype))
    grad_out = torch.randn(args[0].shape, dtype=torch.float64).to(dtype)  # both paths see the same rounded values
    out, grads = _forward_and_grads(kernel, fast, grad_out)
    ref_out, ref_grads = _forward_and_grads(ref, slow, grad_out)
    assert out.dtype == dtype
    want_format = (
        torch.channels_last_3d
        if not fast[0].is_contiguous() and fast[0].is_contiguous(memory_format=torch.channels_last_3d)
        else torch.contiguous_format
    )
    assert out.is_contiguous(memory_format=want_format), "output must keep the first input's memory format"
    cache = {}
    grad_scale = grad_out.double().norm().item()

    def exact():
        if "exact" not in cache:
            cache["exact"] = _forward_and_grads(ref, upcast(args, torch.float64), grad_out)
        return cache["exact"]

    def float32_reference():
        if "float32" not in cache:
            cache["float32"] = _forward_and_grads(ref, upcast(args, torch.float32), grad_out)
        return cache["float32"]

    def assert_close(got, want, pick, what):
        """Within the dtype's tolerance of the reference or, where the result is ill-conditioned (few channels;
        C = 1 gradients that are exactly 0 and come out of the references as rounding noise), flash-attention's
        rule: no further from the float64 result than 2x PyTorch's own float32 error (for float64 kernels,
        1e-5x it, the ratio of the float64 and float32 tolerances)."""
        if rel_error(got, want) <= TOLERANCES[dtype]:
            return
        truth = pick(exact())
        scale = truth.double().norm().item()
        ours = (got.double() - truth.double()).norm().item()
        if scale <= 1e-12 * grad_scale and ours <= scale:
            return  # the exact result is 0 (C = 1 gradients): the float64 reference is rounding noise, the kernel 0
        torchs = (pick(float32_reference()).double() - truth.double()).norm().item()
        # + the rounding of the result itself, which both pay (2u ||truth||, as tests/cpu_fuzz.py)
        bound = (1e-5 if dtype == torch.float64 else 2.0) * torchs + 2 * UNIT_ROUNDOFF[dtype] * scale
        assert ours <= bound, (f"{what}: error {ours:.3e} vs float64 (norm {scale:.3e}) > {bound:.3e}, from PyTorch "
                               f"float32's {torchs:.3e}; relative error {rel_error(got, want):.3e} vs the reference "
                               f"> {TOLERANCES[dtype]:.0e}")

    assert_close(out, ref_out, lambda result: result[0], "output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is None:
            continue
        assert_close(g, rg, lambda result, i=i: result[1][i], f"grad of argument {i}")


# ---- forward + every gradient vs the reference -----------------------------------------------------------------

SHAPES = [
    (2, 5, 6, 7, 8),  # N > 1, odd C, tail tile in every batch item
    (1, 48, 5, 6, 7),  # a UX-Net stage width
    (3, 7, 1, 1, 1),  # D = H = W = 1: one voxel per item
    (1, 3, 1, 9, 1),
    (2, 1, 2, 3, 4),  # C = 1: LayerNorm output is the bias
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype, layout):
    args = layer_norm_inputs(shape, dtype, layout)
    check_against_reference(_layer_norm_kernel, _layer_norm_reference, args, dtype)


@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ux_mlp_matches_reference(shape, dtype, layout, residual, gamma):
    args = ux_mlp_inputs(shape, dtype, layout, residual, gamma)
    check_against_reference(_ux_mlp_kernel, _ux_mlp_reference, args, dtype)


@pytest.mark.parametrize("op,layout", [("layer_norm", "contiguous"), ("layer_norm", "channels_last_3d"),
                                       ("ux_mlp", "channels_last_3d")])
def test_many_chunks_and_flushes(op, layout):
    """82,861 voxels per item. ux_mlp: 10,358 tiles of 16 -> chunks of 21 tiles, several flushes each, a tail tile.
    layer_norm: 81 row blocks of 1,024 voxels per item, the last one 941 voxels (a partial lane vector)."""
    shape = (2, 3, 41, 47, 43)
    if op == "layer_norm":
        args = layer_norm_inputs(shape, torch.float32, layout)
        check_against_reference(_layer_norm_kernel, _layer_norm_reference, args, torch.float32)
    else:
        args = ux_mlp_inputs(shape, torch.float32, layout)
        check_against_reference(_ux_mlp_kernel, _ux_mlp_reference, args, torch.float32)


def test_gelu_tails_and_large_inputs():
    """Pre-activations far into both GELU tails (|u| up to ~40) and an LN input with a large common offset."""
    shape = (1, 6, 4, 5, 6)
    args = ux_mlp_inputs(shape, torch.float32, "contiguous")
    args[0] = args[0] * 3 + 20
    args[4] = args[4] * 8
    check_against_reference(_ux_mlp_kernel, _ux_mlp_reference, args, torch.float32)


def test_saved_statistics():
    """mean / rstd are (N, D, H, W) per-voxel statistics in float32 (float64 for float64 inputs)."""
    shape = (2, 5, 3, 4, 5)
    for dtype in DTYPES:
        x, w, b = layer_norm_inputs(shape, dtype, "channels_last_3d")
        mlp_args = ux_mlp_inputs(shape, dtype, "contiguous")
        mlp_args[0] = x
        x64 = x.double()
        want_mean = x64.mean(1)
        want_rstd = (x64.var(1, unbiased=False) + EPS).rsqrt()
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        for _, mean, rstd in (torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS),
                              torch.ops.uxnet.ux_mlp(*mlp_args, EPS)):
            assert mean.dtype == stats_dtype and rstd.dtype == stats_dtype
            assert mean.shape == (2, 3, 4, 5) and rstd.shape == (2, 3, 4, 5)
            assert (mean.double() - want_mean).abs().max().item() <= tol * (1 + want_mean.abs().max().item())
            assert ((rstd.double() - want_rstd) / want_rstd).abs().max().item() <= tol


def test_mixed_layouts_and_views():
    """Residual and grad_out in another layout than y, and non-contiguous views: outputs follow the first arg."""
    shape = (2, 6, 5, 4, 3)
    args = ux_mlp_inputs(shape, torch.float32, "channels_last_3d")
    args[1] = args[1].contiguous()  # residual NCDHW, y channels_last_3d
    check_against_reference(_ux_mlp_kernel, _ux_mlp_reference, args, torch.float32)

    base = torch.randn(2, 12, 5, 9, 3)
    view = base[:, ::2, :, 1:8]  # strided, neither layout
    args = ux_mlp_inputs(tuple(view.shape), torch.float32, None)
    args[0] = view
    out = _ux_mlp_kernel(*args)
    assert out.is_contiguous()
    assert_close_rel(out, _ux_mlp_reference(*args), torch.float32, "strided view")

    x, w, b = layer_norm_inputs((2, 5, 3, 4, 5), torch.float32, "channels_last_3d")
    out, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)
    grad_out = torch.randn_like(out).contiguous()  # NCDHW grad for a channels_last_3d forward
    grad_x, grad_w, grad_b = torch.ops.uxnet.layer_norm_channels_first_backward(grad_out, x, w, mean, rstd,
                                                                                [True, True, True])
    assert grad_x.is_contiguous()
    xr, wr, br = upcast([x, w, b], torch.float64)
    ref_grads = torch.autograd.grad(_layer_norm_reference(xr, wr, br), [xr, wr, br], grad_out.double())
    for got, want in zip((grad_x, grad_w, grad_b), ref_grads):
        assert_close_rel(got, want, torch.float32, "layer_norm_channels_first_backward with NCDHW grad_out")


def test_layer_norm_backward_output_mask():
    x, w, b = layer_norm_inputs((1, 4, 3, 3, 3), torch.float32, "contiguous")
    _, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)
    g = torch.randn_like(x)
    full = torch.ops.uxnet.layer_norm_channels_first_backward(g, x, w, mean, rstd, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = torch.ops.uxnet.layer_norm_channels_first_backward(g, x, w, mean, rstd, mask)
        for wanted, t, f in zip(mask, got, full):
            if wanted:
                torch.testing.assert_close(t, f, rtol=0, atol=0)
            else:
                assert t.shape == (0,)


# ---- degenerate channel counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_channel_gradients_are_exact_zeros(isa, dtype, layout):
    """C = 1: x - mean(x) = 0, so LayerNorm's output is the bias and its input gradient, and the UX MLP's y and
    ln_weight gradients, are exactly 0 (a fused multiply-add once left ~1e-4 there)."""
    shape = (2, 1, 5, 6, 7)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    x, w, b = layer_norm_inputs(shape, dtype, layout)
    _, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)
    grad_x = torch.ops.uxnet.layer_norm_channels_first_backward(g, x, w, mean, rstd, [True, True, True])[0]
    assert torch.equal(grad_x, torch.zeros_like(grad_x)), f"LayerNorm grad_x up to {grad_x.abs().max().item():.2e}"
    args = ux_mlp_inputs(shape, dtype, layout)
    _, mean, rstd = torch.ops.uxnet.ux_mlp(*args, EPS)
    grads = torch.ops.uxnet.ux_mlp_backward(g, args[0], *args[2:], mean, rstd)
    for name, t in (("grad_y", grads[0]), ("grad_ln_weight", grads[1])):
        assert torch.equal(t, torch.zeros_like(t)), f"UX MLP {name} up to {t.abs().max().item():.2e}"


@pytest.mark.parametrize("spread", [1.5, 1e-3], ids=["spread", "close_to_mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_channel_layer_norm_gradient_within_2x_pytorch_float32(isa, layout, spread):
    """C = 2: xhat = +-1 up to eps terms, grad_x is what is left after cancellation (ill-conditioned). Its float32
    error against the float64 result must stay within 2x PyTorch's own float32 error, also when both channels
    are close to their mean (where a float32 Welford variance lost ~1e-5 of rstd)."""
    shape = (2, 2, 8, 9, 10)
    x64 = torch.randn(shape, dtype=torch.float64) * spread + 0.7
    w64 = torch.randn(2, dtype=torch.float64) * 0.5 + 1
    b64 = torch.randn(2, dtype=torch.float64) * 0.5
    g64 = torch.randn(shape, dtype=torch.float64)
    x32, w32, b32, g32 = (t.float() for t in (x64, w64, b64, g64))
    x32, x_exact = to_layout(x32, layout), to_layout(x32.double(), layout)
    w_exact, b_exact, g_exact = w32.double(), b32.double(), g32.double()

    def grads(fn, x, w, b, g):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, g)]

    truth = grads(_layer_norm_reference, x_exact, w_exact, b_exact, g_exact)
    ours = grads(_layer_norm_kernel, x32, w32, b32, g32)
    torchs = grads(_layer_norm_reference, x32, w32, b32, g32)
    for name, o, t, r in zip(("output", "grad_x", "grad_weight", "grad_bias"), ours, torchs, truth):
        err, torch_err = (o.double() - r).norm().item(), (t.double() - r).norm().item()
        if name in ("grad_weight", "grad_bias"):  # well-conditioned sums over voxels: the usual tolerance
            assert err <= TOLERANCES[torch.float32] * r.norm().item(), f"{name}: error {err:.3e}"
            continue
        assert err <= 2 * torch_err, f"{name}: error {err:.3e} > 2x PyTorch float32's {torch_err:.3e}"


# ---- zero-size inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4, 3, 3, 3), (2, 4, 0, 3, 3), (1, 3, 2, 2, 0)], ids=str)
def test_zero_size_inputs(shape):
    c = shape[1]
    x, w, b = layer_norm_inputs(shape, torch.float32, "contiguous")
    out, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)
    assert out.shape == shape and mean.shape == (shape[0],) + shape[2:]
    gx, gw, gb = torch.ops.uxnet.layer_norm_channels_first_backward(out, x, w, mean, rstd, [True, True, True])
    assert gx.shape == shape and torch.equal(gw, torch.zeros(c)) and torch.equal(gb, torch.zeros(c))

    args = ux_mlp_inputs(shape, torch.float32, "channels_last_3d")
    out, mean, rstd = torch.ops.uxnet.ux_mlp(*args, EPS)
    assert out.shape == shape
    grads = torch.ops.uxnet.ux_mlp_backward(out, args[0], *args[2:], mean, rstd)
    assert grads[0].shape == shape
    for g, p in zip(grads[1:], args[2:]):
        assert torch.equal(g, torch.zeros_like(p))


# ---- float64 gradcheck through the compiled ops ---------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_layer_norm(layout):
    args = upcast(layer_norm_inputs((2, 3, 2, 3, 2), torch.float64, layout), torch.float64)
    assert torch.autograd.gradcheck(_layer_norm_kernel, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_ux_mlp(layout, gamma):
    args = upcast(ux_mlp_inputs((2, 3, 2, 1, 3), torch.float64, layout, residual=True, gamma=gamma), torch.float64)
    assert torch.autograd.gradcheck(_ux_mlp_kernel, args, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,layout", [("ux_mlp", "contiguous"), ("layer_norm", "contiguous"),
                                       ("layer_norm", "channels_last_3d")])
def test_parameter_grads_bit_identical_across_thread_counts(op, layout):
    shape = (2, 8, 20, 19, 18)  # ux_mlp: 428 tiles per item, layer_norm: 7 row blocks per item -> several chunks
    g = torch.randn(shape)
    if op == "ux_mlp":
        args = ux_mlp_inputs(shape, torch.float32, layout)
        _, mean, rstd = torch.ops.uxnet.ux_mlp(*args, EPS)

        def backward():
            return torch.ops.uxnet.ux_mlp_backward(g, args[0], *args[2:], mean, rstd)
    else:
        x, w, b = layer_norm_inputs(shape, torch.float32, layout)
        _, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)

        def backward():
            return torch.ops.uxnet.layer_norm_channels_first_backward(g, x, w, mean, rstd, [True, True, True])

    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(backward())
            results.append(backward())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    y, res, lnw, lnb, w1, b1, w2, b2, gamma = ux_mlp_inputs((1, 4, 2, 2, 2), torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match=r"uxnet::ux_mlp: expected w1"):
        torch.ops.uxnet.ux_mlp(y, res, lnw, lnb, w1.reshape(16), b1, w2, b2, gamma, EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::ux_mlp: expected gamma"):
        torch.ops.uxnet.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2, gamma[:3], EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::ux_mlp: expected residual of shape"):
        torch.ops.uxnet.ux_mlp(y, res[:, :, :1], lnw, lnb, w1, b1, w2, b2, gamma, EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::ux_mlp: expected b2 dtype Float"):
        torch.ops.uxnet.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2.double(), gamma, EPS)
    with pytest.raises(RuntimeError, match=r"float32, bfloat16 and float64 inputs, got Half"):
        torch.ops.uxnet.layer_norm_channels_first(y.half(), lnw.half(), lnb.half(), EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::layer_norm_channels_first: expected eps > 0"):
        torch.ops.uxnet.layer_norm_channels_first(y, lnw, lnb, 0.0)
    _, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(y, lnw, lnb, EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::layer_norm_channels_first_backward: expected rstd dtype Float"):
        torch.ops.uxnet.layer_norm_channels_first_backward(y, y, lnw, mean, rstd.double(), [True, True, True])
    with pytest.raises(RuntimeError, match=r"uxnet::ux_mlp_backward: expected mean of shape"):
        torch.ops.uxnet.ux_mlp_backward(y, y, lnw, lnb, w1, b1, w2, b2, gamma, mean[:, :1], rstd)


# ---- the generic build of the kernels ----------------------------------------------------------------------------

_GENERIC_SCRIPT = r"""
import torch, uxnet_kernels
torch.manual_seed(0)
c = 5
y, res = torch.randn(2, c, 4, 5, 6), torch.randn(2, c, 4, 5, 6)
params = [torch.randn(c), torch.randn(c)] + [torch.randn(c, 4) for _ in range(3)] + [torch.randn(c), torch.randn(c)]
out, mean, rstd = torch.ops.uxnet.ux_mlp(y, res, *params, 1e-6)
grads = torch.ops.uxnet.ux_mlp_backward(torch.ones_like(y), y, *params, mean, rstd)
torch.save([out, *grads], __import__("sys").argv[1])
"""


def test_generic_isa_matches_selected_isa_in_a_fresh_process(tmp_path):
    """UXNET_CPU_ISA=generic in the environment of a new process forces the generic build of the kernels; it must
    agree with the automatic pick."""
    results = {}
    for isa_name in ("generic", "auto"):
        env = dict(os.environ, UXNET_CPU_ISA=isa_name)
        path = tmp_path / f"{isa_name}.pt"
        subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT, str(path)], env=env, check=True, timeout=120)
        results[isa_name] = torch.load(path)
    for got, want in zip(results["generic"], results["auto"]):
        assert_close_rel(got, want, torch.float32, "generic ISA vs runtime-selected ISA")


# ---- property test ------------------------------------------------------------------------------------------


# derandomize: the same examples on every run, so CI cannot flake on an ill-conditioned draw this rule cannot judge
# (tests/cpu_fuzz.py has the full rule, with the statistics floor, and CI runs it with a new seed per commit).
@settings(max_examples=int(os.environ.get("UXNET_HYPOTHESIS_EXAMPLES", "30")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 9),
    d=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS + ["strided"]),
    residual=st.booleans(),
    gamma=st.booleans(),
    op=st.sampled_from(["layer_norm", "ux_mlp"]),
)
def test_property_any_shape(n, c, d, h, w, dtype, layout, residual, gamma, op):
    shape = (n, c, d, h, w)
    base_layout = "contiguous" if layout == "strided" else layout
    if op == "layer_norm":
        args = layer_norm_inputs(shape, dtype, base_layout)
    else:
        args = ux_mlp_inputs(shape, dtype, base_layout, residual, gamma)
    if layout == "strided":  # a non-contiguous view (every other W element of a wider tensor)
        args[0] = torch.cat([args[0], args[0]], dim=4)[..., ::2]
    if op == "layer_norm":
        check_against_reference(_layer_norm_kernel, _layer_norm_reference, args, dtype)
    else:
        check_against_reference(_ux_mlp_kernel, _ux_mlp_reference, args, dtype)
