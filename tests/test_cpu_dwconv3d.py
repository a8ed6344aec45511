"""The CPU kernels of uxnet::dwconv3d and uxnet::dwconv3d_backward (csrc/cpu/dwconv3d/).

Every check compares each element's tensor against the F.conv3d reference computed in float32/float64 from the
same (rounded) inputs. The ops allocate their outputs, so there is no buffer to poison; instead every output is
compared in full and must be finite. Tests taking the `isa` fixture (conftest.py) run on every kernel ISA variant
this machine runs (UXNET_CPU_ISA), including avx512-emulated.
"""

import pytest
import torch
from conftest import (
    CPU_ISAS,
    assert_close_rel,
    cpu_isa_unavailable,
    reference_dtype,
    require_compiled,
    to_layout,
    use_cpu_isa,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uxnet_kernels import reference

LAYOUTS = ("contiguous", "channels_last_3d", "strided_view", "permuted_view")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _compiled():
    require_compiled("cpu")


def _ops():
    import uxnet_kernels  # noqa: F401  (loads the extension and registers autograd)

    return torch.ops.uxnet


def _make_input(shape, dtype, layout):
    """A random (N, C, D, H, W) tensor in `layout`; the *_view layouts are non-contiguous views of a bigger tensor."""
    n, c, d, h, w = shape
    if layout == "strided_view":  # every other channel and W column of a larger tensor
        base = torch.randn(n, 2 * c, d, h, 2 * w, dtype=torch.float64).to(dtype)
        return base[:, ::2, :, :, ::2]
    if layout == "permuted_view":  # H and W swapped in memory
        return torch.randn(n, c, d, w, h, dtype=torch.float64).to(dtype).transpose(3, 4)
    return to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)


def _expected_format(layout):
    return torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format


def _reference_all(x, w, b, grad_out):
    """Reference output and gradients (x, weight, bias) in float32/float64 from the same rounded inputs."""
    ref_dtype = reference_dtype(x.dtype)
    xr, wr, br = (t.detach().to(ref_dtype).requires_grad_(True) for t in (x, w, b))
    out = reference.dwconv3d(xr, wr, br)
    out.backward(grad_out.to(ref_dtype))
    return out.detach(), xr.grad, wr.grad, br.grad


def _check(got, want, dtype, what):
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values"
    assert_close_rel(got, want, dtype, what)


def _run_case(shape, kernel, dtype, layout, grad_layout):
    ops = _ops()
    c = shape[1]
    x = _make_input(shape, dtype, layout)
    w = (0.2 * torch.randn((c, 1) + tuple(kernel), dtype=torch.float64)).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    grad_out = _make_input(shape, dtype, grad_layout)
    want_out, want_gx, want_gw, want_gb = _reference_all(x, w, b, grad_out)
    tag = f"{shape} k={kernel} {dtype} x:{layout} g:{grad_layout}"

    out = ops.dwconv3d(x, w, b)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=_expected_format(layout)), f"{tag}: output layout"
    _check(out, want_out, dtype, f"{tag} out")

    gx, gw, gb = ops.dwconv3d_backward(grad_out, x, w, [True, True, True])
    assert gx.is_contiguous(memory_format=_expected_format(grad_layout)), f"{tag}: grad_x layout"
    _check(gx, want_gx, dtype, f"{tag} grad_x")
    _check(gw, want_gw, dtype, f"{tag} grad_weight")
    _check(gb, want_gb, dtype, f"{tag} grad_bias")

    # The same gradients through autograd (register_autograd of uxnet::dwconv3d -> dwconv3d_backward).
    xa, wa, ba = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    ops.dwconv3d(xa, wa, ba).backward(grad_out)
    _check(xa.grad, want_gx, dtype, f"{tag} autograd grad_x")
    _check(wa.grad, want_gw, dtype, f"{tag} autograd grad_weight")
    _check(ba.grad, want_gb, dtype, f"{tag} autograd grad_bias")


odd = st.integers(0, 5).map(lambda i: 2 * i + 1)  # 1 .. 11
spatial = st.integers(1, 9)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 19),
    d=spatial,
    h=spatial,
    w=st.integers(1, 17),
    kernel=st.tuples(odd, odd, odd),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    grad_layout=st.sampled_from(LAYOUTS),
)
def test_matches_reference_property(isa, n, c, d, h, w, kernel, dtype, layout, grad_layout):
    _run_case((n, c, d, h, w), kernel, dtype, layout, grad_layout)


@pytest.mark.parametrize(
    "shape, kernel",
    [
        ((1, 3, 1, 1, 1), (3, 3, 3)),  # a single voxel
        ((2, 17, 3, 4, 5), (7, 7, 7)),  # spatial smaller than the kernel along every axis
        ((1, 9, 4, 3, 37), (1, 1, 31)),  # kw = 31 > the register block of taps; W > the output block
        ((1, 5, 33, 2, 3), (31, 3, 1)),  # kd = 31
        ((1, 16, 6, 7, 8), (5, 3, 7)),  # a whole channel block on every ISA
        ((1, 17, 2, 3, 32), (3, 3, 5)),  # W = 32: two full 16-wide output blocks (avx512), a 1-lane channel tail
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_edge_shapes(isa, shape, kernel, layout):
    _run_case(shape, kernel, torch.float32, layout, layout)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_output_mask(isa, mask):
    ops = _ops()
    x, g = torch.randn(2, 5, 4, 5, 6), torch.randn(2, 5, 4, 5, 6)
    w, b = torch.randn(5, 1, 3, 5, 3), torch.randn(5)
    _, want_gx, want_gw, want_gb = _reference_all(x, w, b, g)
    got = ops.dwconv3d_backward(g, x, w, list(mask))
    for wanted, tensor, want, name in zip(mask, got, (want_gx, want_gw, want_gb), ("grad_x", "grad_weight", "grad_bias")):
        if wanted:
            _check(tensor, want, torch.float32, name)
        else:
            assert tensor.shape == (0,), f"masked-out {name} should be empty, got {tuple(tensor.shape)}"


@pytest.mark.parametrize("shape", [(0, 4, 3, 3, 3), (2, 0, 3, 3, 3), (2, 4, 0, 3, 3), (2, 4, 3, 3, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_zero_size(shape, layout):
    ops = _ops()
    c = shape[1]
    x = to_layout(torch.randn(shape), layout)
    w, b = torch.randn(c, 1, 3, 3, 5), torch.randn(c)
    out = ops.dwconv3d(x, w, b)
    assert out.shape == x.shape
    gx, gw, gb = ops.dwconv3d_backward(torch.randn(shape), x, w, [True, True, True])
    assert gx.shape == x.shape
    assert gw.shape == w.shape and torch.equal(gw, torch.zeros_like(w))
    assert gb.shape == (c,) and torch.equal(gb, torch.zeros(c))


def test_no_bias(isa):
    ops = _ops()
    x, w = torch.randn(1, 6, 5, 6, 7), torch.randn(6, 1, 5, 3, 3)
    _check(ops.dwconv3d(x, w, None), reference.dwconv3d(x, w), torch.float32, "no bias")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_float64_gradcheck(isa, layout):
    ops = _ops()
    x = to_layout(torch.randn(1, 3, 4, 3, 5, dtype=torch.float64), layout).requires_grad_(True)
    w = torch.randn(3, 1, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.dwconv3d, (x, w, b))


def test_grad_weight_is_deterministic_across_runs_and_thread_counts(isa):
    ops = _ops()
    x = torch.randn(2, 24, 10, 9, 11)
    g = torch.randn_like(x)
    w = torch.randn(24, 1, 7, 7, 7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, gw1, gb1 = ops.dwconv3d_backward(g, x, w, [False, True, True])
        torch.set_num_threads(2)
        _, gw2, gb2 = ops.dwconv3d_backward(g, x, w, [False, True, True])
        _, gw3, gb3 = ops.dwconv3d_backward(g, x, w, [False, True, True])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gw1, gw2) and torch.equal(gw2, gw3), "grad_weight differs between runs / thread counts"
    assert torch.equal(gb1, gb2) and torch.equal(gb2, gb3), "grad_bias differs between runs / thread counts"


def test_isas_agree():
    """Every ISA variant this machine runs gives the reference's answer on one shape bigger than a register block."""
    ops = _ops()
    x, w, b = torch.randn(1, 21, 6, 7, 30), torch.randn(21, 1, 7, 5, 9), torch.randn(21)
    want = reference.dwconv3d(x, w, b)
    checked = []
    for isa_name in CPU_ISAS:
        if cpu_isa_unavailable(isa_name) is not None:
            continue
        with use_cpu_isa(isa_name):
            _check(ops.dwconv3d(x, w, b), want, torch.float32, isa_name)
        checked.append(isa_name)
    assert "generic" in checked


def test_unknown_isa_is_a_clear_error():
    ops = _ops()
    with use_cpu_isa("sse9"):
        with pytest.raises(RuntimeError, match="uxnet::dwconv3d: .*UXNET_CPU_ISA must be one of"):
            ops.dwconv3d(torch.randn(1, 1, 1, 1, 1), torch.randn(1, 1, 1, 1, 1), None)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3, 3)), "expected x of shape"),
        (lambda: (torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 2, 3)), "expected odd kernel sizes"),
        (lambda: (torch.randn(1, 2, 3, 3, 3), torch.randn(3, 1, 3, 3, 3)), "output channels"),
        (lambda: (torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3, dtype=torch.float64)), "weight dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, message):
    ops = _ops()
    x, w = make()
    with pytest.raises(RuntimeError, match=message):
        ops.dwconv3d(x, w, None)
    with pytest.raises(RuntimeError, match=message):
        ops.dwconv3d_backward(torch.randn(x.shape), x, w, [True, True, True])


def test_backward_rejects_mismatched_grad_out():
    ops = _ops()
    x, w = torch.randn(1, 2, 3, 4, 5), torch.randn(2, 1, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"uxnet::dwconv3d_backward: expected grad_out of shape"):
        ops.dwconv3d_backward(torch.randn(1, 2, 3, 4, 6), x, w, [True, True, True])
    with pytest.raises(RuntimeError, match=r"expected grad_out dtype"):
        ops.dwconv3d_backward(torch.randn(1, 2, 3, 4, 5, dtype=torch.float64), x, w, [True, True, True])

