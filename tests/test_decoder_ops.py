"""The decoder ops ``instance_norm_lrelu`` and ``instance_norm_add_lrelu`` on the compiled CPU backend against the
reference ops: forward and every gradient (float64, float32 under flash-attention's rule, bfloat16), gradcheck,
statistics edge cases (one voxel, constant channels), non-finite propagation, memory format, what autograd keeps,
thread-count determinism, and bad input.

Outputs are allocated with ``torch.empty`` by the kernels; the tests run with
``torch.utils.deterministic.fill_uninitialized_memory`` on, so a value the kernel fails to write stays NaN.
"""

import pytest
import torch

import uxnet_kernels as uk
from uxnet_kernels import reference
from conftest import assert_close_flash, poisoned_empty_tensors, reference_dtype, require_cpu_kernels, to_layout
from op_cases import upcast

SLOPE, EPS = 0.01, 1e-5
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last_3d"]
SHAPES = [
    (2, 5, 6, 7, 8),  # N > 1, odd C
    (1, 16, 9, 10, 11),  # channels_last_3d: 4 voxel chunks, the last one partial
    (2, 3, 1, 9, 1),
    (3, 4, 1, 3, 1),  # statistics over three voxels (two would make every gradient through the norm ~0)
]
OPS = ["lrelu", "residual", "shortcut", "split_shortcut"]


@pytest.fixture(autouse=True)
def _require_kernels():
    require_cpu_kernels("instance_norm_lrelu", "instance_norm_add_lrelu")


@pytest.fixture(autouse=True)
def _poison_empty_outputs():
    with poisoned_empty_tensors():
        yield


def _rand(shape, layout="contiguous", scale=1.0, offset=0.0):
    t = torch.randn(shape, dtype=torch.float64) * scale + offset
    return to_layout(t, layout) if len(shape) == 5 else t


def make_args(op, shape, layout="contiguous"):
    """float64 arguments of `op`; z has a common offset, so its statistics matter."""
    n, c, d, h, w = shape
    z = _rand(shape, layout, scale=1.5, offset=0.7)
    if op == "lrelu":
        return [z]
    if op == "residual":
        return [z, _rand(shape, layout)]
    widths = [3] if op == "shortcut" else [3, 5]
    inputs = [_rand((n, ci, d, h, w), layout) for ci in widths]
    weights = [_rand((c, ci, 1, 1, 1), scale=0.4) for ci in widths]
    return [z, *inputs, *weights]


def call(op, args):
    if op == "lrelu":
        return uk.instance_norm_lrelu(args[0], SLOPE, EPS)
    if op == "residual":
        return uk.instance_norm_add_lrelu(args[0], args[1], negative_slope=SLOPE, eps=EPS)
    k = (len(args) - 1) // 2
    return uk.instance_norm_add_lrelu(args[0], None, args[1:1 + k], args[1 + k:], SLOPE, EPS)


def run(op, args, backend, grad_out):
    with uk.use_backend(backend):
        out = call(op, args)
    grads = torch.autograd.grad(out, args, grad_out.to(out.dtype))
    return out, list(grads)


def check_against_reference(op, args, dtype):
    fast = upcast(args, dtype)
    grad_out = torch.randn(args[0].shape, dtype=torch.float64).to(dtype)
    out, grads = run(op, fast, "cpu", grad_out)
    assert uk.backend_report()["last_used"][f"{_public(op)}@cpu"] == "cpu"
    ref_out, ref_grads = run(op, upcast(fast, reference_dtype(dtype)), "reference", grad_out)
    cache = {}

    def exact():
        if "exact" not in cache:
            cache["exact"] = run(op, upcast(fast, torch.float64), "reference", grad_out)
        return cache["exact"]

    def same_dtype():
        if "same" not in cache:
            cache["same"] = run(op, upcast(fast, dtype), "reference", grad_out)
        return cache["same"]

    assert out.dtype == dtype
    channels_last = not fast[0].is_contiguous() and fast[0].is_contiguous(memory_format=torch.channels_last_3d)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps z's memory format"
    assert_close_flash(out, ref_out, dtype, f"{op} output", lambda: exact()[0], lambda: same_dtype()[0])
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == args[i].shape
        assert_close_flash(g, rg, dtype, f"{op} grad of argument {i}", lambda i=i: exact()[1][i],
                           lambda i=i: same_dtype()[1][i])


def _public(op):
    return "instance_norm_lrelu" if op == "lrelu" else "instance_norm_add_lrelu"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, shape, dtype, layout):
    check_against_reference(op, make_args(op, shape, layout), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["lrelu", "shortcut"])
def test_many_voxel_chunks(op, layout):
    """68,880 voxels per plane: 64 channels_last_3d chunks of 1,077 voxels, the last one partial."""
    check_against_reference(op, make_args(op, (1, 3, 40, 41, 42), layout), torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op):
    args = [a.requires_grad_(True) for a in make_args(op, (2, 3, 3, 4, 2))]
    with uk.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: call(op, list(a)), args)


def test_double_backward_is_rejected_with_a_clear_error():
    z = make_args("lrelu", (1, 2, 3, 3, 3))[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"instance_norm_lrelu: double backward .* is not supported"):
        with uk.use_backend("cpu"):
            out = uk.instance_norm_lrelu(z)
            torch.autograd.grad(out.pow(2).sum(), z, create_graph=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_single_voxel_planes(op, layout):
    """D = H = W = 1 (the 1/16 bottleneck of a 16^3 input): the public op refuses it on every backend, as
    F.instance_norm does; the kernel itself computes the defined result: the normalised value is 0, so
    out = lrelu(r_hat), grad_z = 0, grad_residual = lrelu'(out) * grad_out, and a normalised shortcut is 0 too."""
    args = upcast(make_args(op, (3, 4, 1, 1, 1), layout), torch.float64)
    for backend in ("reference", "cpu"):
        with uk.use_backend(backend), pytest.raises(ValueError, match=r"expected more than one voxel per \(n, c\)"):
            call(op, args)
    z = args[0]
    grad_out = torch.randn_like(z)
    if op == "lrelu":
        out, _, rstd = torch.ops.uxnet.instance_norm_lrelu(z, SLOPE, EPS)
        assert torch.equal(out, torch.zeros_like(z))
        grad_z = torch.ops.uxnet.instance_norm_lrelu_backward(grad_out, out, rstd, SLOPE)
        assert torch.equal(grad_z, torch.zeros_like(z))
        return
    residual = args[1] if op == "residual" else None
    k = (len(args) - 1) // 2
    inputs, weights = ([], []) if residual is not None else (args[1:1 + k], args[1 + k:])
    out, _, rstd, sc_mean, sc_rstd = torch.ops.uxnet.instance_norm_add_lrelu(z, residual, inputs, weights, SLOPE,
                                                                             EPS)
    r_hat = residual if residual is not None else torch.zeros_like(z)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(r_hat, SLOPE), rtol=0, atol=0)
    grad_z, grad_r, grad_inputs, grad_weights = torch.ops.uxnet.instance_norm_add_lrelu_backward(
        grad_out, out, residual, inputs, weights, rstd, sc_mean, sc_rstd, SLOPE)
    # zero up to the rounding of the LeakyReLU inversion (out / slope vs r), amplified by rstd = eps^-1/2
    torch.testing.assert_close(grad_z, torch.zeros_like(z), rtol=0, atol=1e-12)
    if residual is not None:
        torch.testing.assert_close(grad_r, torch.where(out > 0, grad_out, grad_out * SLOPE), rtol=0, atol=0)
    for g in (*grad_inputs, *grad_weights):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["lrelu", "residual", "shortcut"])
def test_constant_channels(op, layout):
    """var = 0: the normalised values are exactly 0, so the output is lrelu(r_hat); grad_z is
    rstd * (gs - mean(gs)) with rstd = eps^-1/2 (large, and the same in the reference)."""
    args = make_args(op, (2, 3, 4, 3, 5), layout)
    args[0] = to_layout(torch.full_like(args[0], 2.5).contiguous() + torch.arange(3.0).view(1, 3, 1, 1, 1), layout)
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        out, grads = run(op, upcast(args, dtype), "cpu", grad_out)
        ref_out, ref_grads = run(op, upcast(args, torch.float64), "reference", grad_out)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        if op == "lrelu":
            assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * rg.abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["z", "residual", "shortcut_input", "shortcut_weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_propagate_like_the_reference(where, value, layout):
    """The output is non-finite exactly where the reference's is, and so is every gradient, with one documented
    exception: a non-finite residual or shortcut leaves the reference's grad_z finite (it keeps z), while the
    kernel, which recovers z's normalised values from the output, gives NaN on every (n, c) plane whose output
    is non-finite. The training step is broken either way (the output, hence the loss, is non-finite)."""
    op = {"z": "lrelu", "residual": "residual"}.get(where, "shortcut")
    args = make_args(op, (2, 3, 3, 4, 5), layout)
    index = {"z": 0, "residual": 1, "shortcut_input": 1, "shortcut_weight": 2}[where]
    poisoned = args[index].clone()
    poisoned[(0,) * poisoned.dim()] = value
    args[index] = poisoned
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    out, grads = run(op, upcast(args, torch.float64), "cpu", grad_out)
    ref_out, ref_grads = run(op, upcast(args, torch.float64), "reference", grad_out)
    assert not torch.isfinite(ref_out).all(), "the case must actually produce non-finite values"
    cases = [(out, ref_out, "output", None)]
    cases += [(g, r, f"grad {i}", i) for i, (g, r) in enumerate(zip(grads, ref_grads))]
    for got, want, what, i in cases:
        want_finite = torch.isfinite(want)
        if i == 0 and where != "z":
            planes_with_bad_output = (~torch.isfinite(out)).flatten(2).any(2)[..., None, None, None]
            want_finite = want_finite & ~planes_with_bad_output.expand_as(want)
        assert torch.equal(torch.isfinite(got), want_finite), f"{what}: non-finite positions differ"
        torch.testing.assert_close(got[want_finite], want[want_finite], rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("op", OPS)
def test_statistics(op):
    """mean / rstd are (N, C) statistics of z (and of the shortcut conv) in float32 (float64 for float64)."""
    args = make_args(op, (2, 3, 4, 5, 6))
    for dtype in DTYPES:
        a = upcast(args, dtype)
        if op == "lrelu":
            outs = torch.ops.uxnet.instance_norm_lrelu(a[0], SLOPE, EPS)
        else:
            k = (len(a) - 1) // 2
            res = a[1] if op == "residual" else None
            outs = torch.ops.uxnet.instance_norm_add_lrelu(a[0], res, a[1:1 + k] if res is None else [],
                                                           a[1 + k:] if res is None else [], SLOPE, EPS)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        z64 = a[0].double()
        want_mean = z64.mean((2, 3, 4))
        want_rstd = (z64.var((2, 3, 4), unbiased=False) + EPS).rsqrt()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        mean, rstd = outs[1], outs[2]
        assert mean.dtype == stats_dtype and mean.shape == (2, 3)
        torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(rstd.double(), want_rstd, rtol=tol, atol=0)
        if op in ("shortcut", "split_shortcut"):
            k = (len(a) - 1) // 2
            # the float64 projection of the same inputs; in bfloat16 the op's projection is rounded to bfloat16 (once
            # per product, the products accumulated in float32), hence the statistics' looser tolerance there
            proj = sum(torch.nn.functional.conv3d(x.double(), w.double()) for x, w in zip(a[1:1 + k], a[1 + k:]))
            ptol = 2**-7 if dtype == torch.bfloat16 else tol
            torch.testing.assert_close(outs[3].double(), proj.mean((2, 3, 4)), rtol=ptol,
                                       atol=ptol * proj.abs().max().item())
            want = (proj.var((2, 3, 4), unbiased=False) + EPS).rsqrt()
            torch.testing.assert_close(outs[4].double(), want, rtol=ptol, atol=0)
        elif op == "residual":
            assert outs[3].shape == (0,) and outs[4].shape == (0,)


def test_autograd_keeps_the_output_not_the_input():
    """What autograd keeps: the output (shared with the next conv) and (N, C) statistics; never z, never the
    shortcut conv's output. The residual / shortcut input is kept by reference (no copy)."""
    shape = (2, 4, 6, 6, 6)
    for op in OPS:
        args = [a.float().requires_grad_(True) for a in make_args(op, shape)]
        saved = []
        with uk.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                              lambda t: t):
            out = call(op, args)
        full = [t for t in saved if t.dim() == 5 and t.shape[2:] == shape[2:]]
        ptrs = {t.untyped_storage().data_ptr() for t in full}
        allowed = {out.untyped_storage().data_ptr()} | {a.untyped_storage().data_ptr() for a in args[1:]}
        assert ptrs <= allowed, f"{op}: keeps a full-size tensor other than the output and its inputs"
        assert args[0].untyped_storage().data_ptr() not in ptrs, f"{op}: keeps z"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["shortcut", "split_shortcut"])
def test_forward_does_not_depend_on_which_inputs_require_grad(op, layout):
    """Bitwise the same output whether or not the inputs require grad: the shortcut's products must not take another
    path (at::matmul folds its batch or not by requires_grad), or the donated in-place op, the functional op and a
    no_grad call would round differently. (A 1-wide W: the shape the differential fuzz caught.)"""
    args = make_args(op, (1, 8, 3, 2, 1), layout)
    with uk.use_backend("cpu"), torch.no_grad():
        want = call(op, args)
    with uk.use_backend("cpu"):
        got = call(op, [a.detach().requires_grad_(True) for a in args])
    assert torch.equal(got.detach(), want)


@pytest.mark.parametrize("op", ["lrelu", "residual"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_identical_for_any_thread_count(op, layout):
    """The kernels' reductions are partitioned by shape only. (Not the shortcut ops: their 1x1x1 convolution is
    ATen's, whose weight gradient may depend on the thread count.)"""
    args = upcast(make_args(op, (2, 5, 20, 21, 22), layout), torch.float32)
    grad_out = torch.randn(args[0].shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, grads = run(op, args, "cpu", grad_out)
            results.append([out, *grads])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_mixed_layouts_and_strided_views():
    """A channels_last_3d z with an NCDHW residual, and strided views: results follow z's layout."""
    args = make_args("residual", (2, 6, 5, 4, 3), "channels_last_3d")
    args[1] = args[1].contiguous()
    check_against_reference("residual", args, torch.float32)
    base = _rand((2, 12, 5, 9, 3))
    view = base[:, ::2, :, 1:8]
    check_against_reference("lrelu", [view], torch.float32)


def test_empty_inputs_give_empty_results():
    for op in OPS:
        args = [a.float().requires_grad_(True) for a in make_args(op, (0, 3, 2, 2, 2))]
        with uk.use_backend("cpu"):
            out = call(op, args)
        assert out.shape == (0, 3, 2, 2, 2)
        grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
        assert all(g is None or g.shape == a.shape for g, a in zip(grads, args))


def test_autocast_dtypes():
    """Under CPU autocast(bf16): a bf16 conv output stays bf16; a float32 residual stream stays float32."""
    z = torch.randn(1, 4, 3, 3, 3).to(torch.bfloat16)
    r = torch.randn(1, 4, 3, 3, 3)
    x = torch.randn(1, 2, 3, 3, 3)
    w = torch.randn(4, 2, 1, 1, 1)
    for backend in ("reference", "cpu"):
        with uk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            assert uk.instance_norm_lrelu(z).dtype == torch.bfloat16
            assert uk.instance_norm_add_lrelu(z, r).dtype == torch.float32
            assert uk.instance_norm_add_lrelu(z, None, [x], [w]).dtype == torch.bfloat16
            assert uk.instance_norm_add_lrelu(z.float(), None, [x], [w]).dtype == torch.float32


BAD = [
    ("rank", lambda z, r, x, w: dict(z=z[0]), r"instance_norm_lrelu: expected x of shape \(N, C, D, H, W\)"),
    ("integer", lambda z, r, x, w: dict(z=z.long()), r"instance_norm_lrelu: expected x to have a floating dtype"),
    ("slope zero", lambda z, r, x, w: dict(z=z, negative_slope=0.0), r"negative_slope > 0, got 0.0.*inverting"),
    ("slope negative", lambda z, r, x, w: dict(z=z, negative_slope=-0.2), r"negative_slope > 0, got -0.2"),
    ("slope inf", lambda z, r, x, w: dict(z=z, negative_slope=float("inf")), r"finite negative_slope"),
    ("eps", lambda z, r, x, w: dict(z=z, eps=0.0), r"instance_norm_lrelu: expected eps > 0, got 0.0"),
]
BAD_ADD = [
    ("rank", lambda z, r, x, w: dict(z=z[0], residual=r), r"instance_norm_add_lrelu: expected z of shape \(N, C"),
    ("residual shape", lambda z, r, x, w: dict(z=z, residual=r[:, :2]),
     r"expected residual of shape \(2, 3, 4, 5, 6\) \(the shape of z\), got \(2, 2, 4, 5, 6\)"),
    ("residual dtype", lambda z, r, x, w: dict(z=z, residual=r.double()), r"expected residual dtype torch.float32"),
    ("residual device", lambda z, r, x, w: dict(z=z, residual=r.to("meta")), r"expected residual on device cpu"),
    ("both", lambda z, r, x, w: dict(z=z, residual=r, shortcut_inputs=[x], shortcut_weights=[w]),
     r"either residual or shortcut_inputs/shortcut_weights, got both"),
    ("neither", lambda z, r, x, w: dict(z=z), r"expected a residual, or as many shortcut_weights as shortcut_inputs"),
    ("list lengths", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x, x], shortcut_weights=[w]),
     r"got 2 inputs and 1 weights"),
    ("weight shape", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[w[:, :, :, :1].repeat(
        1, 1, 1, 3, 1)]), r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\).*got \(3, 2, 1, 3, 1\)"),
    ("weight channels", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[w[:2]]),
     r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\)"),
    ("input size", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x[..., :3]], shortcut_weights=[w]),
     r"expected shortcut_inputs\[0\] of shape \(2, C_0, 4, 5, 6\) \(batch and spatial size of z\)"),
    ("input channels", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x[:, :0]], shortcut_weights=[w[:, :0]]),
     r"expected shortcut_inputs\[0\] with at least one channel"),
    ("weight dtype", lambda z, r, x, w: dict(z=z, shortcut_inputs=[x], shortcut_weights=[w.double()]),
     r"expected shortcut_weights\[0\] dtype torch.float32"),
    ("slope", lambda z, r, x, w: dict(z=z, residual=r, negative_slope=0.0), r"negative_slope > 0"),
]


def _bad_inputs():
    z = torch.randn(2, 3, 4, 5, 6)
    return z, torch.randn_like(z), torch.randn(2, 2, 4, 5, 6), torch.randn(3, 2, 1, 1, 1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case,make,message", BAD, ids=[c[0] for c in BAD])
def test_instance_norm_lrelu_rejects(backend, case, make, message):
    kw = make(*_bad_inputs())
    with uk.use_backend(backend), pytest.raises(ValueError, match=message):
        uk.instance_norm_lrelu(kw.pop("z"), **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case,make,message", BAD_ADD, ids=[c[0] for c in BAD_ADD])
def test_instance_norm_add_lrelu_rejects(backend, case, make, message):
    kw = make(*_bad_inputs())
    with uk.use_backend(backend), pytest.raises(ValueError, match=message):
        uk.instance_norm_add_lrelu(kw.pop("z"), **kw)


def test_compiled_ops_check_their_arguments_too():
    """Direct callers of torch.ops.uxnet.* (C++, TorchScript) get the C++ checks."""
    z, r, x, w = _bad_inputs()
    with pytest.raises(RuntimeError, match=r"uxnet::instance_norm_lrelu: expected a finite negative_slope > 0"):
        torch.ops.uxnet.instance_norm_lrelu(z, 0.0, EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::instance_norm_add_lrelu: expected residual of shape"):
        torch.ops.uxnet.instance_norm_add_lrelu(z, r[:, :2], [], [], SLOPE, EPS)
    with pytest.raises(RuntimeError, match=r"expected shortcut_weights\[0\] of shape \(3, 2, 1, 1, 1\)"):
        torch.ops.uxnet.instance_norm_add_lrelu(z, None, [x], [w[:2]], SLOPE, EPS)
    with pytest.raises(RuntimeError, match=r"uxnet::instance_norm_lrelu_backward: expected rstd of shape \(2, 3\)"):
        torch.ops.uxnet.instance_norm_lrelu_backward(z, z, torch.ones(3), SLOPE)
