"""``instance_norm_add_lrelu(..., donate_z=True)``: on the CPU backend the output is written over z
(``uxnet::instance_norm_add_lrelu_inplace``). It must give exactly the functional op's output and gradients, in both
layouts and every kernel dtype, decline donation where writing over z would be wrong, make autograd reject a later
use of z's old values, and compile (declining donation).
"""

import pytest
import torch

import uxnet_kernels as uk
from conftest import poisoned_empty_tensors, require_cpu_kernels, to_layout

SLOPE, EPS = 0.01, 1e-5
LAYOUTS = ["contiguous", "channels_last_3d"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPE = (2, 5, 6, 7, 8)


@pytest.fixture(autouse=True)
def _require_kernels():
    require_cpu_kernels("instance_norm_add_lrelu", "instance_norm_add_lrelu_inplace")


@pytest.fixture(autouse=True)
def _poison_empty_outputs():
    """Statistics, the temporary of a non-dense z and the functional op's outputs start as NaN: an element a kernel
    does not write shows. (Elements of z it does not write keep z's old values, which the equality tests catch.)"""
    with poisoned_empty_tensors():
        yield


def _rand(shape, dtype=torch.float64, layout="contiguous", scale=1.0, offset=0.0):
    return to_layout((torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype), layout)


def _inputs(kind, dtype, layout, shape=SHAPE):
    """Leaves: z (with an offset, so its statistics matter) and the residual or the shortcut pairs."""
    n, c, d, h, w = shape
    z = _rand(shape, dtype, layout, scale=1.5, offset=0.7)
    if kind == "residual":
        return [z, _rand(shape, dtype, layout)]
    widths = [3] if kind == "shortcut" else [3, 4]
    inputs = [_rand((n, ci, d, h, w), dtype, layout) for ci in widths]
    weights = [_rand((c, ci, 1, 1, 1), dtype, scale=0.4) for ci in widths]
    return [z, *inputs, *weights]


def _tail(kind, z, others, donate):
    if kind == "residual":
        return uk.instance_norm_add_lrelu(z, others[0], negative_slope=SLOPE, eps=EPS, donate_z=donate)
    k = len(others) // 2
    return uk.instance_norm_add_lrelu(z, None, others[:k], others[k:], SLOPE, EPS, donate_z=donate)


def _run(kind, leaves, donate, grad_out):
    """The tail on z = leaves[0] * 1 (a conv output stand-in: not a leaf), its output and the leaves' gradients."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    z = leaves[0] * 1
    with uk.use_backend("cpu"):
        out = _tail(kind, z, leaves[1:], donate)
    assert (out is z) == donate, "the CPU backend writes a donated z over and returns it"
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["residual", "shortcut", "split_shortcut"])
def test_donated_equals_the_functional_op(kind, dtype, layout):
    """Same kernels, same order of operations: bitwise equal output and gradients (the functional op is itself
    checked against the reference in test_decoder_ops.py)."""
    leaves = _inputs(kind, dtype, layout)
    grad_out = _rand(SHAPE, dtype, layout)
    out, grads = _run(kind, leaves, True, grad_out)
    want_out, want_grads = _run(kind, leaves, False, grad_out)
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, want_out)
    for i, (g, want) in enumerate(zip(grads, want_grads)):
        assert torch.equal(g, want), f"gradient of argument {i}"
    if dtype == torch.float64:  # and, directly, the reference ops
        with uk.use_backend("reference"):
            ref_leaves = [t.detach().requires_grad_(True) for t in leaves]
            ref_out = _tail(kind, ref_leaves[0], ref_leaves[1:], False)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out)
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-10)
        for g, want in zip(grads, ref_grads):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["residual", "shortcut"])
def test_gradcheck_through_the_donated_op(kind):
    leaves = [t.requires_grad_(True) for t in _inputs(kind, torch.float64, "contiguous", shape=(2, 3, 3, 3, 4))]

    def fn(z, *others):
        with uk.use_backend("cpu"):
            return _tail(kind, z * 1, list(others), True)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_writes_a_non_dense_z_through_a_temporary():
    """The in-place op on a z with gaps between its elements (not dense in any memory format) still writes z."""
    leaves = _inputs("residual", torch.float32, "contiguous")
    storage = torch.full((2, 5, 6, 7, 10), float("nan"))
    z = storage[..., :8]
    z.copy_(leaves[0])
    want = uk.instance_norm_add_lrelu(leaves[0], leaves[1], negative_slope=SLOPE, eps=EPS)
    stats = torch.ops.uxnet.instance_norm_add_lrelu_inplace(z, leaves[1], [], [], SLOPE, EPS)
    assert len(stats) == 4
    assert torch.equal(z, want)
    assert torch.isnan(storage[..., 8:]).all(), "wrote outside z"


def test_statistics_match_the_functional_op():
    leaves = _inputs("shortcut", torch.float32, "channels_last_3d")
    _, *want = torch.ops.uxnet.instance_norm_add_lrelu(leaves[0], None, leaves[1:2], leaves[2:], SLOPE, EPS)
    z = leaves[0].clone()
    got = torch.ops.uxnet.instance_norm_add_lrelu_inplace(z, None, leaves[1:2], leaves[2:], SLOPE, EPS)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _declines(z, residual, backend="cpu", autocast=False):
    before = z.detach().clone()
    with uk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = uk.instance_norm_add_lrelu(z, residual, donate_z=True)
    assert out is not z
    assert torch.equal(z.detach(), before), "z was written although donation had to be declined"
    return out


def test_donation_is_declined_where_writing_over_z_would_be_wrong():
    z, r = _inputs("residual", torch.float32, "contiguous")
    want = uk.instance_norm_add_lrelu(z, r)
    torch.testing.assert_close(_declines(z.clone().requires_grad_(True), r), want, rtol=0, atol=0)  # a leaf
    torch.testing.assert_close(_declines(z.clone()[:, :], r), want, rtol=0, atol=0)  # a view
    zc = z.clone()
    torch.testing.assert_close(_declines(zc, zc), uk.instance_norm_add_lrelu(z, z), rtol=0, atol=0)  # residual is z
    _declines(zc, zc[:, :])  # residual is a view of z
    _declines(zc, zc.detach())  # residual shares z's memory
    _declines(z.clone(), r, backend="reference")  # no in-place kernel
    out = _declines(z.clone().bfloat16(), r, autocast=True)  # float32 residual stream: the output is float32
    assert out.dtype == torch.float32


def test_donation_under_autocast_when_the_dtype_is_z_s_own():
    z, r = (t.bfloat16() for t in _inputs("residual", torch.float32, "contiguous"))
    want = uk.instance_norm_add_lrelu(z, r)
    z_donated = z.clone()
    with uk.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = uk.instance_norm_add_lrelu(z_donated, r, donate_z=True)
    assert out is z_donated and torch.equal(out, want)


def test_a_later_use_of_z_s_old_values_fails_in_backward():
    z_leaf, r = (t.float().requires_grad_(True) for t in _inputs("residual", torch.float64, "contiguous"))
    z = z_leaf * 1
    kept = z * z  # saves z for its backward
    with uk.use_backend("cpu"):
        out = uk.instance_norm_add_lrelu(z, r, donate_z=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + kept.sum()).backward()


def test_no_grad_donation():
    z, r = _inputs("residual", torch.float32, "channels_last_3d")
    want = uk.instance_norm_add_lrelu(z, r)
    with torch.no_grad(), uk.use_backend("cpu"):
        out = uk.instance_norm_add_lrelu(z, r, donate_z=True)
    assert out is z and torch.equal(out, want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph(backend):
    """Under torch.compile donation is declined (the compiler plans buffers itself): same results as eager."""
    leaves = [t.float() for t in _inputs("shortcut", torch.float64, "contiguous")]
    grad_out = torch.randn(SHAPE)

    def step(z_leaf, x, w):
        z = z_leaf * 1
        return uk.instance_norm_add_lrelu(z, None, [x], [w], SLOPE, EPS, donate_z=True)

    def grads(fn):
        args = [t.detach().requires_grad_(True) for t in leaves]
        with uk.use_backend("cpu"):
            out = fn(*args)
        return [out.detach(), *torch.autograd.grad(out, args, grad_out)]

    torch._dynamo.reset()
    compiled = grads(torch.compile(step, fullgraph=True, backend=backend))
    for got, want in zip(compiled, grads(step)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_declined_donation_is_logged_with_its_reason(caplog):
    z, r = _inputs("residual", torch.float32, "contiguous")
    with caplog.at_level("DEBUG", logger="uxnet_kernels.dispatch"):
        _declines(z.clone()[:, :], r)
        _declines(z.clone(), r, backend="reference")
    messages = [rec.getMessage() for rec in caplog.records if "donate_z declined" in rec.getMessage()]
    assert any("z is a view" in m for m in messages)
    assert any("'reference' has no in-place block-tail kernel" in m for m in messages)


def test_fake_tensors_take_the_same_path():
    """`uxnet memory` predicts under FakeTensorMode, where every data pointer reads 0: the aliasing check must not
    mistake two fake tensors for one, so the prediction models the donated call the real run makes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), uk.use_backend("cpu"):
        z, r = torch.empty(SHAPE), torch.empty(SHAPE)
        assert uk.instance_norm_add_lrelu(z, r, donate_z=True) is z
        assert uk.instance_norm_add_lrelu(z, z.detach(), donate_z=True) is not z
