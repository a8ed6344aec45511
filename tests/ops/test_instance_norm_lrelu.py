"""instance_norm_lrelu (uxnet::instance_norm_lrelu[_backward], the decoder's norm + LeakyReLU) on the compiled CPU
backend against the reference: forward and every gradient (float64, float32 under flash-attention's rule,
bfloat16), gradcheck, statistics edge cases (one voxel, constant channels), non-finite propagation, memory format,
what autograd keeps, thread-count determinism, autocast, opcheck, bad input; Triton (marked ``triton``).

Outputs are allocated with ``torch.empty`` by the kernels; the CPU tests run with
``torch.utils.deterministic.fill_uninitialized_memory`` on (poisoned_outputs), so a value the kernel fails to
write stays NaN.
"""

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
    ON_GPU,
    SLOPE,
    TRITON_DEVICE,
    TRITON_IN_SHAPE,
    TRITON_SHAPE,
    cpp_op,
    instance_norm_lrelu_args,
    instance_norm_lrelu_reference,
    is_channels_last,
    require_cpu_kernels,
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
    require_cpu_kernels("instance_norm_lrelu")


cpu_kernel = pytest.mark.usefixtures("cpu_kernels")


def make_args(shape, layout="contiguous"):
    return instance_norm_lrelu_args(shape, torch.float64, layout)


# ---- the compiled CPU backend against the reference, through the public op ------------------------------------------


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, layout):
    check_instance_norm("lrelu", make_args(shape, layout), dtype)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_voxel_chunks(layout):
    """68,880 voxels per plane: 64 channels_last_3d chunks of 1,077 voxels, the last one partial."""
    check_instance_norm("lrelu", make_args((1, 3, 40, 41, 42), layout), torch.float32)


@cpu_kernel
def test_gradcheck_float64():
    args = [a.requires_grad_(True) for a in make_args((2, 3, 3, 4, 2))]
    with uk.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: tail_call("lrelu", list(a)), args)


@cpu_kernel
def test_double_backward_is_rejected_with_a_clear_error():
    z = make_args((1, 2, 3, 3, 3))[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"instance_norm_lrelu: double backward .* is not supported"):
        with uk.use_backend("cpu"):
            out = uk.instance_norm_lrelu(z)
            torch.autograd.grad(out.pow(2).sum(), z, create_graph=True)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_voxel_planes(layout):
    """D = H = W = 1 (the 1/16 bottleneck of a 16^3 input): the public op refuses it on every backend, as
    F.instance_norm does; the kernel itself computes the defined result: the normalised value is 0, so out = 0 and
    grad_z = 0."""
    (z,) = upcast(make_args((3, 4, 1, 1, 1), layout), torch.float64)
    for backend in ("reference", "cpu"):
        with uk.use_backend(backend), pytest.raises(ValueError, match=r"expected more than one voxel per \(n, c\)"):
            tail_call("lrelu", [z])
    grad_out = torch.randn_like(z)
    out, _, rstd = cpp_op("instance_norm_lrelu")(z, SLOPE, EPS)
    assert torch.equal(out, torch.zeros_like(z))
    grad_z = cpp_op("instance_norm_lrelu_backward")(grad_out, out, rstd, SLOPE)
    assert torch.equal(grad_z, torch.zeros_like(z))


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_channels(layout):
    """var = 0: the normalised values are exactly 0, so the output is 0; grad_z is rstd * (gs - mean(gs)) with
    rstd = eps^-1/2 (large, and the same in the reference)."""
    args = make_args((2, 3, 4, 3, 5), layout)
    args[0] = to_layout(torch.full_like(args[0], 2.5).contiguous() + torch.arange(3.0).view(1, 3, 1, 1, 1), layout)
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        out, grads = run_instance_norm("lrelu", upcast(args, dtype), "cpu", grad_out)
        ref_out, ref_grads = run_instance_norm("lrelu", upcast(args, torch.float64), "reference", grad_out)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * rg.abs().max().item())


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_propagate_like_the_reference(value, layout):
    """A non-finite z: the output and grad_z are non-finite exactly where the reference's are."""
    args = make_args((2, 3, 3, 4, 5), layout)
    poisoned = args[0].clone()
    poisoned[(0,) * poisoned.dim()] = value
    args[0] = poisoned
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    out, grads = run_instance_norm("lrelu", upcast(args, torch.float64), "cpu", grad_out)
    ref_out, ref_grads = run_instance_norm("lrelu", upcast(args, torch.float64), "reference", grad_out)
    assert not torch.isfinite(ref_out).all(), "the case must actually produce non-finite values"
    for got, want, what in [(out, ref_out, "output")] + [(g, r, f"grad {i}") for i, (g, r) in
                                                         enumerate(zip(grads, ref_grads))]:
        want_finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), want_finite), f"{what}: non-finite positions differ"
        torch.testing.assert_close(got[want_finite], want[want_finite], rtol=1e-9, atol=1e-9, msg=what)


@cpu_kernel
def test_statistics():
    """mean / rstd are (N, C) statistics of z in float32 (float64 for float64)."""
    args = make_args((2, 3, 4, 5, 6))
    for dtype in DTYPES:
        (z,) = upcast(args, dtype)
        outs = cpp_op("instance_norm_lrelu")(z, SLOPE, EPS)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        z64 = z.double()
        want_mean = z64.mean((2, 3, 4))
        want_rstd = (z64.var((2, 3, 4), unbiased=False) + EPS).rsqrt()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        mean, rstd = outs[1], outs[2]
        assert mean.dtype == stats_dtype and mean.shape == (2, 3)
        torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(rstd.double(), want_rstd, rtol=tol, atol=0)


@cpu_kernel
def test_autograd_keeps_the_output_not_the_input():
    """What autograd keeps: the output (shared with the next conv) and (N, C) statistics; never z."""
    shape = (2, 4, 6, 6, 6)
    args = [a.float().requires_grad_(True) for a in make_args(shape)]
    saved = []
    with uk.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = tail_call("lrelu", args)
    full = [t for t in saved if t.dim() == 5 and t.shape[2:] == shape[2:]]
    ptrs = {t.untyped_storage().data_ptr() for t in full}
    assert ptrs <= {out.untyped_storage().data_ptr()}, "keeps a full-size tensor other than the output"
    assert args[0].untyped_storage().data_ptr() not in ptrs, "keeps z"


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_identical_for_any_thread_count(layout):
    """The kernels' reductions are partitioned by shape only."""
    args = upcast(make_args((2, 5, 20, 21, 22), layout), torch.float32)
    grad_out = torch.randn(args[0].shape)

    def run():
        out, grads = run_instance_norm("lrelu", args, "cpu", grad_out)
        return [out, *grads]

    bitwise_equal_across_thread_counts(run, repeats=1)


@cpu_kernel
def test_strided_view():
    """A strided view (neither layout): results follow z's layout."""
    base = tensor((2, 12, 5, 9, 3), torch.float64)
    check_instance_norm("lrelu", [base[:, ::2, :, 1:8]], torch.float32)


@cpu_kernel
def test_empty_input_gives_empty_result():
    args = [a.float().requires_grad_(True) for a in make_args((0, 3, 2, 2, 2))]
    with uk.use_backend("cpu"):
        out = tail_call("lrelu", args)
    assert out.shape == (0, 3, 2, 2, 2)
    grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
    assert all(g is None or g.shape == a.shape for g, a in zip(grads, args))


@cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_keeps_a_bf16_input_bf16(backend):
    """Under CPU autocast(bf16): a bf16 conv output stays bf16."""
    z = torch.randn(1, 4, 3, 3, 3).to(torch.bfloat16)
    with uk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        assert uk.instance_norm_lrelu(z).dtype == torch.bfloat16


# ---- opcheck -------------------------------------------------------------------------------------------------------


def opcheck_samples(layout):
    """(schema, args) of every compiled instance_norm_lrelu schema."""
    shape = (2, 3, 4, 5, 6)
    yield "instance_norm_lrelu", (tensor(shape, layout=layout, grad=True), 0.01, 1e-5)
    z = tensor(shape, layout=layout)
    out, _, rstd = cpp_op("instance_norm_lrelu")(z, 0.01, 1e-5)
    yield "instance_norm_lrelu_backward", (torch.randn_like(out), out, rstd, 0.01)


@pytest.mark.usefixtures("compiled_cpu")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    for name, args in opcheck_samples(layout):
        torch.library.opcheck(cpp_op(name).default, tuple(args))


# ---- bad input (bad_input.py) --------------------------------------------------------------------------------------


def _z():
    return torch.randn(2, 3, 4, 5, 6)


BAD_INPUT = [
    Bad("rank", lambda: (_z()[0],), ValueError, r"instance_norm_lrelu: expected x of shape \(N, C, D, H, W\)"),
    Bad("integer", lambda: (_z().long(),), ValueError, r"instance_norm_lrelu: expected x to have a floating dtype"),
    Bad("slope zero", lambda: bad_input.call(_z(), negative_slope=0.0), ValueError,
        r"negative_slope > 0, got 0.0.*inverting"),
    Bad("slope negative", lambda: bad_input.call(_z(), negative_slope=-0.2), ValueError,
        r"negative_slope > 0, got -0.2"),
    Bad("slope inf", lambda: bad_input.call(_z(), negative_slope=float("inf")), ValueError, r"finite negative_slope"),
    Bad("eps", lambda: bad_input.call(_z(), eps=0.0), ValueError, r"instance_norm_lrelu: expected eps > 0, got 0.0"),
    # Direct callers of torch.ops.uxnet.* (C++, TorchScript) get the C++ checks.
    Bad("cpp slope", lambda: (_z(), 0.0, EPS), RuntimeError,
        r"uxnet::instance_norm_lrelu: expected a finite negative_slope > 0", schema="instance_norm_lrelu"),
    Bad("cpp backward rstd shape", lambda: (lambda z: (z, z, torch.ones(3), SLOPE))(_z()), RuntimeError,
        r"uxnet::instance_norm_lrelu_backward: expected rstd of shape \(2, 3\)",
        schema="instance_norm_lrelu_backward"),
]


@pytest.mark.parametrize("case,backend", bad_input.params(BAD_INPUT))
def test_bad_input(case, backend):
    bad_input.check(case, backend, uk.instance_norm_lrelu)


# ---- Triton (interpreter on CPU at tiny shapes, native on CUDA) ------------------------------------------------------


def _triton(x):
    return triton_op("instance_norm_lrelu_triton")(x, SLOPE, IN_EPS)[0]


def in_manual(x):
    """Float64 instance norm written out: also defined for single-voxel planes (F.instance_norm rejects those)."""
    mean = x.mean((2, 3, 4), keepdim=True)
    return (x - mean) / torch.sqrt(x.var((2, 3, 4), unbiased=False, keepdim=True) + IN_EPS)


@pytest.mark.triton
def test_triton_tiles_cross_chunks(triton_instance_norm, small_instance_tiles):
    """The tiling the instance-norm Triton tests run with: several chunks per plane, a partial last tile, an empty
    tile."""
    for channels_last in (False, True):
        g = triton_instance_norm._instance_grid(TRITON_IN_SHAPE, channels_last)
        assert g.chunks > 1 and g.tiles_per_chunk > 1, g
        assert g.voxels % g.block_v != 0 and g.tiles % g.tiles_per_chunk != 0, g


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton(layout, dtype, small_instance_tiles):
    args = [tensor(TRITON_IN_SHAPE, layout=layout, scale=3.0, offset=5.0, grad=True)]  # channel means far from 0
    out = triton_check_flash(_triton, instance_norm_lrelu_reference, args, dtype,
                             f"instance_norm_lrelu {layout} {dtype}")
    assert is_channels_last(out) == (layout == "channels_last_3d"), "output must keep the input's layout"
    if dtype == torch.float32:
        x = args[0].detach().to(TRITON_DEVICE)
        _, mean, rstd = triton_op("instance_norm_lrelu_triton")(x, SLOPE, IN_EPS)
        x64 = x.cpu().double()
        assert mean.dtype == torch.float32 and mean.shape == TRITON_IN_SHAPE[:2]
        assert_close_rel(mean.cpu(), x64.mean((2, 3, 4)), torch.float32, "mean")
        assert_close_rel(rstd.cpu(), (x64.var((2, 3, 4), unbiased=False) + IN_EPS).rsqrt(), torch.float32, "rstd")


@pytest.mark.triton
def test_triton_float16(small_instance_tiles):
    triton_check_flash(_triton, instance_norm_lrelu_reference,
                       [tensor(TRITON_IN_SHAPE, layout="channels_last_3d", grad=True)], torch.float16,
                       "instance_norm_lrelu float16")


@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_constant_channel(layout, small_instance_tiles):
    """var = 0: the normalised values are exactly 0 (LeakyReLU's slope side in backward, as PyTorch's)."""
    x = tensor(TRITON_IN_SHAPE, layout=layout)
    x[:, 1] = 1.5
    out = triton_check_flash(_triton, instance_norm_lrelu_reference, [x.requires_grad_(True)], torch.float32,
                             "constant channel")
    assert torch.equal(out[:, 1].cpu(), torch.zeros_like(out[:, 1].cpu()))


@pytest.mark.triton
def test_triton_single_voxel_planes():
    """D = H = W = 1 (a 16^3 input's bottleneck): xhat = 0, so out = lrelu(0) and grad_z = 0 exactly.
    F.instance_norm rejects such input, so the truth is the normalisation written out in float64."""
    shape = (2, 3, 1, 1, 1)
    fast_args = triton_dev([tensor(shape, grad=True)])
    truth_args = upcast(fast_args, F64)
    out = _triton(*fast_args)
    want = torch.nn.functional.leaky_relu(in_manual(truth_args[0]), SLOPE)
    assert_close_rel(out, want, torch.float32, "single voxel output")
    grad_out = torch.randn(out.shape, dtype=F64).float().to(TRITON_DEVICE)
    grads = grads_of(out, fast_args, grad_out)
    for i, (g, w) in enumerate(zip(grads, grads_of(want, truth_args, grad_out.double()))):
        assert_close_rel(g, w, torch.float32, f"single voxel grad of argument {i}")
    assert torch.equal(grads[0].cpu(), torch.zeros(shape)), "grad_z must be exactly 0"


@pytest.mark.triton
def test_triton_non_finite_propagation(small_instance_tiles):
    """NaN / inf in one plane make that plane's output NaN exactly where the reference has them; other planes are
    unaffected."""
    x = tensor(TRITON_IN_SHAPE, layout="channels_last_3d")
    x[0, 1, 2, 3, 1] = float("nan")
    x[1, 2, 0, 0, 0] = float("inf")
    x = x.to(TRITON_DEVICE).requires_grad_(True)
    out = _triton(x)
    ref = instance_norm_lrelu_reference(x.detach().cpu().double().requires_grad_(True))
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)) and torch.isnan(out[0, 1]).all()
    finite = torch.isfinite(ref)
    assert_close_rel(out.cpu()[finite], ref.detach()[finite], torch.float32, "finite planes")


@pytest.mark.triton
def test_triton_empty_input_gives_nan_statistics():
    """Empty input: empty output and NaN statistics (as the compiled ops)."""
    empty = torch.randn(2, 3, 0, 4, 4, device=TRITON_DEVICE)
    out, mean, rstd = triton_op("instance_norm_lrelu_triton")(empty, SLOPE, IN_EPS)
    assert out.shape == empty.shape and mean.shape == (2, 3) and torch.isnan(mean).all() and torch.isnan(rstd).all()


@pytest.mark.triton
def test_triton_opcheck():
    for layout in LAYOUTS:
        x = triton_dev([tensor((2, 3, 4, 5, 6), layout=layout, grad=True)])[0]
        torch.library.opcheck(triton_op("instance_norm_lrelu_triton").default, (x, SLOPE, IN_EPS),
                              test_utils=TRITON_OPCHECK_TESTS)
        out, _, rstd = triton_op("instance_norm_lrelu_triton")(x.detach(), SLOPE, IN_EPS)
        torch.library.opcheck(triton_op("instance_norm_lrelu_triton_backward").default,
                              (torch.randn_like(out), out, rstd, SLOPE), test_utils=TRITON_OPCHECK_TESTS)


@pytest.mark.triton
def test_triton_backend_dispatch():
    probe = torch.empty(1, 1, 1, 1, 1, device=TRITON_DEVICE)
    z = tensor(TRITON_SHAPE, torch.float32).to(TRITON_DEVICE)
    with uk.use_backend("triton"):
        out = uk.instance_norm_lrelu(z)
    assert dispatch.family("instance_norm_lrelu").verdict("triton", probe) == (True, "")
    ok, why = dispatch.family("instance_norm_lrelu").verdict("triton", probe.double())
    assert not ok and "float64" in why
    assert uk.backend_report()["last_used"][f"instance_norm_lrelu@{TRITON_DEVICE}"] == "triton"
    assert_close_rel(out.cpu(), reference.instance_norm_lrelu(z.cpu().double()), torch.float32, "instance_norm_lrelu")


def _check_last_plane(shape, layout):
    """instance_norm_lrelu forward and backward on a bfloat16 tensor, checked on its last (n, c) plane in float32
    torch ops: with 2**31 elements or more, offsets past 2**31 must not wrap."""
    x = torch.randn(shape, device=TRITON_DEVICE, dtype=torch.bfloat16)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out, mean, rstd = triton_op("instance_norm_lrelu_triton")(x, SLOPE, IN_EPS)
    plane = x[-1, -1].float()
    var, m = torch.var_mean(plane, unbiased=False)
    assert_close_rel(mean[-1, -1:].float().cpu(), m.reshape(1).cpu(), torch.float32, "mean of the last plane")
    assert_close_rel(rstd[-1, -1:].float().cpu(), (var + IN_EPS).rsqrt().reshape(1).cpu(), torch.float32, "rstd")
    want = torch.nn.functional.leaky_relu((plane - m) * (var + IN_EPS).rsqrt(), SLOPE)
    assert_close_rel(out[-1, -1, -2:].float().cpu(), want[-2:].cpu(), torch.bfloat16, "output tail")
    del plane, want
    grad_out = torch.ones_like(out)
    grad_x = triton_op("instance_norm_lrelu_triton_backward")(grad_out, out, rstd, SLOPE)
    o = out[-1, -1].float()
    gs = torch.where(o > 0, 1.0, SLOPE)
    xhat = torch.where(o > 0, o, o / SLOPE)
    want = rstd[-1, -1] * (gs - gs.mean() - xhat * (gs * xhat).mean())
    assert_close_rel(grad_x[-1, -1, -2:].float().cpu(), want[-2:].cpu(), torch.bfloat16, "grad tail")


@pytest.mark.triton
def test_triton_last_plane_check_itself(small_instance_tiles):
    """The check of test_triton_int64_offsets_on_gpu, at a small size (where it runs everywhere)."""
    for layout in LAYOUTS:
        _check_last_plane((2, 3, 4, 5, 6), layout)


@pytest.mark.triton
@pytest.mark.skipif(not ON_GPU, reason="needs a tensor over 2**31 elements: GPU memory, not interpreter speed")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_int64_offsets_on_gpu(layout):
    _check_last_plane((1, 2, 1024, 1024, 1025), layout)  # 2**31 + 2**21 elements, bfloat16
    torch.cuda.empty_cache()
