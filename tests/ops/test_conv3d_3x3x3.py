"""conv3d_3x3x3 (uxnet::conv3d_3x3x3, uxnet::conv3d_3x3x3_backward): the reference against an independent
formulation; the compiled CPU backend (Winograd F(2x2x2, 3x3x3)) against the reference through the public op;
float64 gradcheck; opcheck; bad input; empty input; non-finite propagation; the CPU kernels per ISA variant (tests
taking the ``isa`` fixture of tests/conftest.py run on each variant this machine runs, avx512-emulated included),
with every output allocated NaN-filled (poisoned_outputs), so a value the kernels fail to write fails."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_ISAS,
    TOLERANCES,
    assert_close_rel,
    cpu_isa_unavailable,
    reference_dtype,
    rel_error,
    to_layout,
    use_cpu_isa,
)
from cpu_fuzz import UNIT_ROUNDOFF, winograd_weight_grad_rounding_scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference
from uxnet_kernels.ops import conv3d_3x3x3 as conv_op

from . import bad_input
from .bad_input import Bad
from .checks import CASES, FAST_BACKENDS, check_non_finite, compare_backend, non_finite_cases, require_backend
from .samples import LAYOUTS, conv3d_3x3x3_args, cpp_op, expected_format, tensor, upcast

cpu_kernel = pytest.mark.usefixtures("compiled_cpu")
cpu_kernel_poisoned = pytest.mark.usefixtures("compiled_cpu", "poisoned_outputs")

# ---- the reference is the ground truth ---------------------------------------------------------------------------


def _naive_conv(x, w, b):
    """Sum over the 27 taps of the zero-padded input shifted by the tap, contracted over input channels."""
    d, h, wd = x.shape[2:]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    out = torch.zeros(x.shape[0], w.shape[0], d, h, wd, dtype=x.dtype) + b.view(1, -1, 1, 1, 1)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                out += torch.einsum("ncdhw,oc->nodhw", xp[:, :, i:i + d, j:j + h, k:k + wd], w[:, :, i, j, k])
    return out


def test_reference_is_a_padded_dense_conv():
    x, w, b = conv3d_3x3x3_args((2, 3, 4, 5, 6), 5, torch.float64)
    assert rel_error(reference.conv3d_3x3x3(x, w, b), _naive_conv(x, w, b)) < 1e-12


# ---- every fast backend against the reference, through the public op ---------------------------------------------


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_reference(backend, device, layout, dtype, bias):
    require_backend(backend, device)
    args = conv3d_3x3x3_args((2, 5, 6, 7, 8), 6, torch.float64, layout, bias=bias)
    out = compare_backend(uk.conv3d_3x3x3, args, backend, dtype, f"conv3d_3x3x3[{backend}]", device)
    assert out.is_contiguous(memory_format=expected_format(args[0]))


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, device, layout):
    require_backend(backend, device)
    with uk.use_backend(backend):
        args = upcast(conv3d_3x3x3_args((2, 3, 3, 4, 5), 2, torch.float64, layout), torch.float64)
        assert torch.autograd.gradcheck(uk.conv3d_3x3x3, args)
    assert dispatch._last_used[("conv3d_3x3x3", device)] == backend


def test_cuda_tensors_run_the_reference():
    probe = torch.empty(1, 1, 1, 1, 1)
    ok, why = dispatch.family("conv3d_3x3x3").verdict("triton", probe)
    assert not ok and "no triton implementation" in why


# ---- opcheck: schema, fake (meta) impl, autograd registration, AOT dispatch ---------------------------------------


def opcheck_samples(layout):
    """(schema, args) of every compiled conv3d_3x3x3 schema; also used by tests/test_dispatch.py's coverage check."""
    small = (2, 3, 4, 5, 3)
    yield "conv3d_3x3x3", conv3d_3x3x3_args(small, 4, layout=layout, grad=True)
    yield "conv3d_3x3x3", conv3d_3x3x3_args(small, 2, layout=layout, bias=False, grad=True)
    x, w, _ = conv3d_3x3x3_args(small, 4, layout=layout)
    g = to_layout(torch.randn(2, 4, 4, 5, 3), layout)
    yield "conv3d_3x3x3_backward", (g, x, w, [True, True, True])
    yield "conv3d_3x3x3_backward", (g, x, w, [False, True, False])
    yield "conv3d_3x3x3_pack_weight", (w,)
    yield "conv3d_3x3x3_pack_weight", (torch.randn(70, 3, 3, 3, 3, dtype=torch.float64),)  # two panels
    packed = torch.ops.uxnet.conv3d_3x3x3_pack_weight(w)
    yield "conv3d_3x3x3_packed", (x, w, packed, torch.randn(4))
    yield "conv3d_3x3x3_packed", (x, w, packed, None)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    for name, args in opcheck_samples(layout):
        torch.library.opcheck(cpp_op(name).default, tuple(args))


# ---- bad input (bad_input.py) --------------------------------------------------------------------------------------


def _public(mutate):
    return lambda: mutate(*conv3d_3x3x3_args())


def _backward_case(x_shape, w_shape, g_shape=None, g_dtype=torch.float32, w_dtype=torch.float32):
    def build():
        x = torch.randn(x_shape)
        g = torch.randn(g_shape or (x_shape[0], w_shape[0], *x_shape[2:]), dtype=g_dtype)
        return g, x, torch.randn(w_shape, dtype=w_dtype), [True, True, True]
    return build


BAD_INPUT = [
    Bad("rank", _public(lambda x, w, b: (x[0], w, b)), ValueError,
        r"conv3d_3x3x3: expected x of shape \(N, C_in, D, H, W\) \(5-d\), got 4-d"),
    Bad("weight rank", _public(lambda x, w, b: (x, w[..., 0], b)), ValueError,
        r"conv3d_3x3x3: expected weight of shape \(C_out, C_in, 3, 3, 3\) \(5-d\), got 4-d"),
    Bad("kernel 5x5x5", _public(lambda x, w, b: (x, torch.randn(4, 5, 5, 5, 5), b)), ValueError,
        r"conv3d_3x3x3: expected a 3x3x3 kernel, got weight of shape \(4, 5, 5, 5, 5\)"),
    Bad("kernel 3x3x1", _public(lambda x, w, b: (x, torch.randn(4, 5, 3, 3, 1), b)), ValueError,
        r"conv3d_3x3x3: expected a 3x3x3 kernel"),
    Bad("channels", _public(lambda x, w, b: (x, w[:, :4], b)), ValueError,
        r"conv3d_3x3x3: expected weight of shape \(C_out, 5, 3, 3, 3\) for x with 5 channels, got \(4, 4"),
    Bad("bias", _public(lambda x, w, b: (x, w, b[:3])), ValueError,
        r"conv3d_3x3x3: expected bias of shape \(4,\), got \(3,\)"),
    Bad("dtype", _public(lambda x, w, b: (x, w.double(), b)), ValueError,
        r"conv3d_3x3x3: expected weight dtype torch.float32"),
    Bad("bias dtype", _public(lambda x, w, b: (x, w, b.double())), ValueError,
        r"conv3d_3x3x3: expected bias dtype torch.float32"),
    Bad("device", _public(lambda x, w, b: (x, w.to("meta"), b)), ValueError,
        r"conv3d_3x3x3: expected weight on device cpu"),
    Bad("integer", _public(lambda x, w, b: (x.to(torch.int32), w, b)), ValueError,
        r"conv3d_3x3x3: expected x to have a floating dtype"),
    Bad("not a tensor", _public(lambda x, w, b: (x.tolist(), w, b)), ValueError,
        r"conv3d_3x3x3: expected x to be a torch.Tensor"),
    # The C++ ops check their inputs too (they can be called without the Python layer).
    Bad("cpp rank", _public(lambda x, w, b: (x[0], w, b)), RuntimeError,
        r"uxnet::conv3d_3x3x3: expected x of shape \(N, C, D, H, W\)", schema="conv3d_3x3x3"),
    Bad("cpp kernel", _public(lambda x, w, b: (x, torch.randn(4, 5, 3, 3, 5), b)), RuntimeError,
        r"uxnet::conv3d_3x3x3: expected weight of shape \(C_out, 5, 3, 3, 3\)", schema="conv3d_3x3x3"),
    Bad("cpp channels", _public(lambda x, w, b: (x, w[:, :2], b)), RuntimeError,
        r"expected weight of shape \(C_out, 5, 3, 3, 3\), got \[4, 2, 3, 3, 3\]", schema="conv3d_3x3x3"),
    Bad("cpp bias", _public(lambda x, w, b: (x, w, b[:1])), RuntimeError, r"expected bias of shape \(4\)",
        schema="conv3d_3x3x3"),
    Bad("cpp dtype", _public(lambda x, w, b: (x, w.double(), b)), RuntimeError, r"expected weight dtype",
        schema="conv3d_3x3x3"),
    Bad("cpp integer", _public(lambda x, w, b: (x.int(), w.int(), None)), RuntimeError,
        r"expected x to have a floating dtype", schema="conv3d_3x3x3"),
    Bad("cpp backward rank", _backward_case((1, 2, 3, 3), (2, 2, 3, 3, 3), g_shape=(1, 2, 3, 3)), RuntimeError,
        "expected x of shape", schema="conv3d_3x3x3_backward"),
    Bad("cpp backward kernel", _backward_case((1, 2, 3, 3, 3), (2, 2, 3, 1, 3)), RuntimeError,
        r"expected weight of shape \(C_out, 2, 3, 3, 3\)", schema="conv3d_3x3x3_backward"),
    Bad("cpp backward weight dtype", _backward_case((1, 2, 3, 3, 3), (2, 2, 3, 3, 3), w_dtype=torch.float64),
        RuntimeError, "weight dtype", schema="conv3d_3x3x3_backward"),
    Bad("cpp backward grad_out shape", _backward_case((1, 2, 3, 3, 3), (4, 2, 3, 3, 3), g_shape=(1, 2, 3, 3, 3)),
        RuntimeError, r"uxnet::conv3d_3x3x3_backward: expected grad_out of shape \[1, 4, 3, 3, 3\]",
        schema="conv3d_3x3x3_backward"),
    Bad("cpp backward grad_out dtype", _backward_case((1, 2, 3, 3, 3), (4, 2, 3, 3, 3), g_dtype=torch.float64),
        RuntimeError, r"expected grad_out dtype", schema="conv3d_3x3x3_backward"),
]


@pytest.mark.parametrize("case,backend", bad_input.params(BAD_INPUT))
def test_bad_input(case, backend):
    bad_input.check(case, backend, uk.conv3d_3x3x3)


@cpu_kernel
def test_unknown_isa_is_a_clear_error():
    with use_cpu_isa("sse9"):
        with pytest.raises(RuntimeError, match="uxnet::conv3d_3x3x3: .*UXNET_CPU_ISA must be one of"):
            cpp_op("conv3d_3x3x3")(torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 3, 3, 3), None)


# ---- empty input ---------------------------------------------------------------------------------------------------

# (x shape, C_out): no batch, no depth, no width, no input channels (the output is the bias), no output channels.
EMPTY_CASES = [((0, 5, 6, 7, 8), 3), ((2, 5, 0, 7, 8), 3), ((2, 5, 6, 7, 0), 3), ((2, 0, 3, 4, 5), 3),
               ((2, 5, 3, 4, 5), 0)]


@pytest.mark.parametrize("backend", bad_input.BACKENDS)
@pytest.mark.parametrize("shape,cout", EMPTY_CASES, ids=str)
def test_empty_input_matches_the_math(backend, shape, cout):
    if backend == "cpu":
        require_backend("cpu", "cpu")
    with uk.use_backend(backend):
        x, w, b = conv3d_3x3x3_args(shape, cout, grad=True)
        out = uk.conv3d_3x3x3(x, w, b)
    assert out.shape == (shape[0], cout, *shape[2:])
    assert torch.equal(out.detach(), b.detach().view(1, -1, 1, 1, 1).expand_as(out))  # nothing to sum: the bias
    g = torch.randn(out.shape)
    out.backward(g)
    assert x.grad.shape == x.shape and not x.grad.any()
    assert w.grad.shape == w.shape and not w.grad.any()
    assert torch.allclose(b.grad, g.sum((0, 2, 3, 4)))


@cpu_kernel
@pytest.mark.parametrize("shape,cout", EMPTY_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_kernels(shape, cout, layout):
    x, w, b = conv3d_3x3x3_args(shape, cout, layout=layout)
    out = cpp_op("conv3d_3x3x3")(x, w, b)
    assert out.shape == (shape[0], cout, *shape[2:])
    assert torch.equal(out, b.view(1, -1, 1, 1, 1).expand_as(out))
    g = torch.randn(out.shape)
    gx, gw, gb = cpp_op("conv3d_3x3x3_backward")(g, x, w, [True, True, True])
    assert gx.shape == x.shape and not gx.any()
    assert gw.shape == w.shape and not gw.any()
    assert torch.allclose(gb, g.sum((0, 2, 3, 4)))


# ---- non-finite values (checks.check_non_finite) ------------------------------------------------------------------
# The float64 reference is the truth. A NaN/Inf in x reaches the outputs whose window holds it: the kernels compute
# the tiles whose input window holds one directly (a transform would spread it over the whole tile). A non-finite
# weight makes its output channel non-finite everywhere in the forward (zero padding times Inf), and the input
# gradient only where the tap meets grad_out (the reference's backward scatters only in-range contributions).

NF_SHAPE = (2, 4, 5, 4, 6)  # C_out = C_in: check_non_finite draws grad_out shaped like x


def _non_finite_inputs(dtype, layout):
    x, w, b = conv3d_3x3x3_args(NF_SHAPE, NF_SHAPE[1], dtype, layout)
    return {"x": x, "weight": w, "bias": b}


@cpu_kernel
@pytest.mark.parametrize("name, value, dtype, layout", non_finite_cases(_non_finite_inputs), ids=str)
def test_non_finite_positions_match_the_float64_reference(name, value, dtype, layout):
    check_non_finite("conv3d_3x3x3", _non_finite_inputs,
                     lambda a: cpp_op("conv3d_3x3x3")(a["x"], a["weight"], a["bias"]),
                     lambda a: reference.conv3d_3x3x3(a["x"], a["weight"], a["bias"]), name, value, dtype, layout)


@cpu_kernel_poisoned
def test_non_finite_input_stays_inside_its_window(isa):
    """An Inf in x makes exactly the outputs whose 3x3x3 window holds it non-finite; the rest of its 2x2x2 tile
    (which the Winograd transform would mix it into) stays finite and right."""
    x, w, b = conv3d_3x3x3_args((1, 3, 7, 6, 5), 2, torch.float32)
    x[0, 1, 3, 2, 4] = float("inf")
    x[0, 2, 0, 0, 0] = float("nan")
    out = cpp_op("conv3d_3x3x3")(x, w, b)
    want = reference.conv3d_3x3x3(x.double(), w.double(), b.double())
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), finite)
    assert 0 < int((~finite).sum()) < finite.numel()
    assert_close_rel(out[finite], want[finite], torch.float32, "finite outputs")


# ---- the CPU kernels (csrc/cpu/conv3d_3x3x3/) ----------------------------------------------------------------------

CPU_LAYOUTS = ("contiguous", "channels_last_3d", "strided_view", "permuted_view")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _forward_and_grads(x, w, b, grad_out, kernel):
    """Output and gradients (x, weight, bias) of the kernel or of the reference, in x's dtype."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    fn = cpp_op("conv3d_3x3x3") if kernel else reference.conv3d_3x3x3
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def _rounding_scale(x, w):
    """||s|| for s[n, co, p] = sqrt(sum over ci of (sum of x^2 over the 5x5x5 window around p) * (sum of w[co, ci]^2)):
    the root-mean-square size of the terms a float32 result at p is rounded from. Winograd mixes a whole 4x4x4 tile
    window and every tap of a filter into each output (terms that cancel exactly in exact arithmetic), so where the
    output is small against them (few channels, mostly padding: a single voxel) its error is u times this, not times
    the output: measured <= 1.1 u ||s|| over 300 random shapes of up to 20 channels (PyTorch's own: <= 0.9 u ||s||)."""
    c = x.shape[1]
    window = F.conv3d(x.double() ** 2, torch.ones(c, 1, 5, 5, 5, dtype=torch.float64), padding=2, groups=c)
    taps = (w.double() ** 2).sum((2, 3, 4))
    return torch.einsum("ncdhw,oc->nodhw", window, taps).sqrt().norm().item()


def _check_all(got, x, w, b, grad_out, dtype, tag):
    """float64 / bfloat16: every result within the dtype's tolerance of the reference (float64 / float32) from the
    same rounded inputs. float32: no further from the float64 truth than 2x PyTorch's own float32 convolution, plus
    2u times the size the result is rounded from (_rounding_scale for the Winograd output and grad_x,
    cpu_fuzz.winograd_weight_grad_rounding_scale for grad_weight, at least the result itself, which ATen's
    grad_weight of the fallback cases pays; the result for the float64 sum of grad_bias, as tests/cpu_fuzz.py)."""
    names = ("out", "grad_x", "grad_weight", "grad_bias")
    for t in got:
        assert torch.isfinite(t.float()).all(), f"{tag}: non-finite values"
    if dtype != torch.float32:
        ref_dtype = reference_dtype(dtype)
        want = _forward_and_grads(*upcast([x, w, b], ref_dtype), grad_out, kernel=False)
        for name, g, r in zip(names, got, want):
            assert_close_rel(g, r, dtype, f"{tag} {name}")
        return
    truth = _forward_and_grads(*upcast([x, w, b], torch.float64), grad_out, kernel=False)
    torch32 = _forward_and_grads(*upcast([x, w, b], torch.float32), grad_out, kernel=False)
    scales = (_rounding_scale(x, w), _rounding_scale(grad_out, w.transpose(0, 1)),
              max(winograd_weight_grad_rounding_scale(x, grad_out), truth[2].norm().item()), truth[3].norm().item())
    for name, g, t, p, scale in zip(names, got, truth, torch32, scales):
        ours, torchs = (g.double() - t).norm().item(), (p.double() - t).norm().item()
        bound = 2 * torchs + 2 * UNIT_ROUNDOFF[torch.float32] * scale
        assert ours <= bound, f"{tag} {name}: error {ours:.3e} > 2x PyTorch float32's {torchs:.3e} + 2u {scale:.3e}"


def _run_case(shape, cout, dtype, layout, grad_layout, bias=True):
    x, w, b = conv3d_3x3x3_args(shape, cout, dtype, layout, bias=True)
    grad_out = tensor((shape[0], cout, *shape[2:]), dtype, grad_layout)
    tag = f"{shape}->{cout} {dtype} x:{layout} g:{grad_layout}"
    got = _forward_and_grads(x, w, b, grad_out, kernel=True)
    assert got[0].dtype == dtype
    assert got[0].is_contiguous(memory_format=expected_format(x)), f"{tag}: output layout"
    assert got[1].is_contiguous(memory_format=expected_format(grad_out)), f"{tag}: grad_x layout"
    _check_all(got, x, w, b, grad_out, dtype, tag)
    if not bias:
        out = cpp_op("conv3d_3x3x3")(x, w, None)
        _check_all([out, *got[1:]], x, w, torch.zeros_like(b), grad_out, dtype, f"{tag} no bias")


@cpu_kernel_poisoned
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 20),
    cout=st.integers(1, 20),
    d=st.integers(1, 7),
    h=st.integers(1, 7),
    w=st.integers(1, 9),
    dtype=st.sampled_from(CPU_DTYPES),
    layout=st.sampled_from(CPU_LAYOUTS),
    grad_layout=st.sampled_from(CPU_LAYOUTS),
)
def test_kernel_matches_reference_property(isa, n, cin, cout, d, h, w, dtype, layout, grad_layout):
    _run_case((n, cin, d, h, w), cout, dtype, layout, grad_layout)


EDGE_CASES = [  # (x shape, C_out)
    ((1, 3, 1, 1, 1), 2),  # a single voxel: every tap but the centre is padding
    ((1, 1, 2, 2, 2), 1),  # one channel, one whole tile
    ((2, 17, 3, 5, 7), 19),  # odd sizes (partial tiles on every axis), batch 2, channels past a 16-lane block
    ((1, 16, 4, 4, 4), 32),  # whole channel blocks on every ISA
    ((1, 5, 1, 6, 9), 3),  # D = 1
    ((3, 2, 2, 1, 3), 33),  # H = 1, three batches, 2 x 16 + 1 output channels
]


@cpu_kernel_poisoned
@pytest.mark.parametrize("shape, cout", EDGE_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_edge_shapes(isa, shape, cout, layout):
    _run_case(shape, cout, torch.float32, layout, layout, bias=False)


@cpu_kernel_poisoned
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_parallel_blocks(layout):
    """Enough tiles for the blocked path (blocks of tiles in parallel, a partial last block) in both layouts."""
    _run_case((1, 2, 31, 32, 34), 3, torch.float32, layout, layout)


@cpu_kernel_poisoned
@pytest.mark.parametrize("layout", LAYOUTS)
def test_few_tiles_and_large_filters_stream_the_filter(layout):
    """Under 64 tiles the CPU op transforms the filter a slice at a time (never whole: 151 MB at 768 -> 768): the
    same bits as the whole transformed filter, packed or per call on a volume with more tiles (the same input
    zero-padded: each tile sees the same window); the input gradient reads the filter flipped in place; a
    non-finite filter still takes the kernels' direct path, with the float64 reference's semantics."""
    _run_case((1, 192, 3, 4, 5), 192, torch.float32, layout, layout)
    x, w, b = conv3d_3x3x3_args((1, 192, 3, 4, 5), 192, torch.float32, layout)
    with torch.no_grad():
        streamed = cpp_op("conv3d_3x3x3")(x, w, b)
        assert torch.equal(streamed, uk.conv3d_3x3x3(x, w, b, packed_weight=uk.conv3d_3x3x3_pack_weight(w)))
    big = torch.zeros(1, 192, 16, 16, 16)
    big[:, :, :3, :4, :5] = x
    assert torch.equal(streamed, cpp_op("conv3d_3x3x3")(to_layout(big, layout), w, b)[:, :, :3, :4, :5])
    g = tensor((1, 192, 3, 4, 5), torch.float32, layout)
    big_g = torch.zeros(1, 192, 16, 16, 16)
    big_g[:, :, :3, :4, :5] = g
    flipped = w.flip(2, 3, 4).transpose(0, 1).contiguous()
    assert torch.equal(cpp_op("conv3d_3x3x3_backward")(g, x, w, [True, False, False])[0],
                       cpp_op("conv3d_3x3x3")(to_layout(big_g, layout), flipped, None)[:, :, :3, :4, :5])
    w[3, 5, 0, 0, 0] = float("inf")
    out = cpp_op("conv3d_3x3x3")(x, w, b)
    want = reference.conv3d_3x3x3(x.double(), w.double(), b.double())
    assert torch.equal(torch.isfinite(out), torch.isfinite(want)) and not torch.isfinite(out[:, 3]).any()
    # bfloat16 (8 MB of transformed filters from 256 channels): ATen's bfloat16 convolution itself, NCDHW
    x, w, b = (t.bfloat16() for t in conv3d_3x3x3_args((1, 272, 3, 4, 5), 272, torch.float32, layout))
    out = cpp_op("conv3d_3x3x3")(x, w, b)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=expected_format(x))
    assert torch.equal(out, F.conv3d(x.contiguous(), w, b, padding=1))


@cpu_kernel
def test_packing_pays_except_for_few_tiles_with_large_filters():
    """The model's eval cache packs every layer but few tiles with large filters (768 -> 768 @ 6^3: 151 MB packed in
    float32, 75 MB in bf16), which the op streams (float32) or runs on ATen's bf16 convolution."""
    wide, tiny = torch.empty(768, 768, 3, 3, 3), torch.empty(16, 16, 3, 3, 3)
    x6 = torch.empty(1, 768, 6, 6, 6)
    assert not conv_op.packing_pays(x6, wide) and not conv_op.packing_pays(x6, wide, torch.bfloat16)
    assert conv_op.packing_pays(torch.empty(1, 384, 12, 12, 12), torch.empty(384, 384, 3, 3, 3))
    assert conv_op.packing_pays(torch.empty(1, 16, 6, 6, 6), tiny)  # few tiles, small filter


@cpu_kernel_poisoned
@pytest.mark.parametrize("layout", LAYOUTS)
def test_wide_filter_weight_gradient_by_slices(layout):
    """Wide filters with few tiles (du over 4 MiB): the weight gradient sums every tile per slice of du in cache and
    transforms it straight into the (C_out, C_in, 3, 3, 3) result (C_out 130: a partial column panel)."""
    _run_case((2, 131, 3, 4, 3), 130, torch.float32, layout, layout)


@cpu_kernel_poisoned
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_float64_is_exact(layout):
    """F(2, 3)'s transforms are exact in binary (coefficients 0, +-1, 1/2): float64 matches to rounding."""
    x, w, b = conv3d_3x3x3_args((2, 7, 5, 6, 7), 9, torch.float64, layout)
    assert rel_error(cpp_op("conv3d_3x3x3")(x, w, b), reference.conv3d_3x3x3(x, w, b)) <= 1e-13


# bf16 products: norm error against the float64 truth over PyTorch's bfloat16 convolution's, measured over random
# shapes on the Zen 4 box (docs/PERFORMANCE.md): <= 2.1 at >= 16 channels and >= 8^3, <= 2.6 on tiny volumes that are
# mostly padding (rounding the transformed values adds errors of the size of the terms, not of the output).
BF16_PRODUCTS_ERROR_RATIO = 3.0


@cpu_kernel_poisoned
@pytest.mark.parametrize("shape, cout", [((1, 6, 4, 5, 6), 5), ((2, 17, 5, 9, 3), 19), ((1, 48, 8, 8, 8), 70)],
                         ids=str)
def test_kernel_bfloat16(isa, shape, cout):
    """With bf16 products (conv3d_3x3x3.bf16_products() on this ISA): no further from the float64 truth than
    BF16_PRODUCTS_ERROR_RATIO times PyTorch's own bfloat16 convolution of the same rounded inputs. Without: the
    float32 result, rounded once."""
    x32, w32, b32 = conv3d_3x3x3_args(shape, cout, torch.float32)
    x, w, b = x32.bfloat16(), w32.bfloat16(), b32.bfloat16()
    got = cpp_op("conv3d_3x3x3")(x, w, b)
    assert got.dtype == torch.bfloat16
    if conv_op.bf16_products():
        truth = reference.conv3d_3x3x3(x32.double(), w32.double(), b32.double())
        torchs = (reference.conv3d_3x3x3(x, w, b).double() - truth).norm().item()
        ours = (got.double() - truth).norm().item()
        assert ours <= BF16_PRODUCTS_ERROR_RATIO * torchs, f"{isa}: {ours:.3e} vs PyTorch bf16 {torchs:.3e}"
    else:
        want = reference.conv3d_3x3x3(x.float(), w.float(), b.float())
        assert torch.equal(got, want.to(torch.bfloat16)) or rel_error(got, want) <= TOLERANCES[torch.bfloat16] / 4


@cpu_kernel
@pytest.mark.parametrize("scale", [1.0, 1e-36], ids=["normal", "denormal products"])
def test_bf16_products_native_equal_the_emulation(scale):
    """vdpbf16ps (avx512 on an AVX512_BF16 CPU) and its emulation (avx512-emulated: same 16-lane kernels) give the
    same bits, also where products and sums underflow (denormals flushed as the instruction does)."""
    if cpu_isa_unavailable("avx512") is not None or cpu_isa_unavailable("avx512-emulated") is not None:
        pytest.skip("needs a CPU that runs the avx512 variant")
    with use_cpu_isa("avx512"):
        if not conv_op.bf16_products():
            pytest.skip("this CPU has no AVX512_BF16 (the avx512 variant computes bf16 in float32 here)")
    x, w, b = conv3d_3x3x3_args((2, 33, 7, 6, 9), 21, torch.float32)
    x, w, b = (x * scale).bfloat16(), w.bfloat16(), (b * scale).bfloat16()
    results = {}
    for isa_name in ("avx512", "avx512-emulated"):
        with use_cpu_isa(isa_name):
            results[isa_name] = cpp_op("conv3d_3x3x3")(x, w, b)
    assert torch.equal(results["avx512"], results["avx512-emulated"])
    assert results["avx512"].abs().max() > 0


@cpu_kernel
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_kernel_output_mask(mask):
    x, w, _ = conv3d_3x3x3_args((2, 5, 4, 5, 6), 3)
    g = torch.randn(2, 3, 4, 5, 6)
    full = cpp_op("conv3d_3x3x3_backward")(g, x, w, [True, True, True])
    got = cpp_op("conv3d_3x3x3_backward")(g, x, w, list(mask))
    for wanted, t, f in zip(mask, got, full):
        assert torch.equal(t, f) if wanted else t.shape == (0,)


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_float64_gradcheck(isa, layout):
    x, w, b = upcast(conv3d_3x3x3_args((1, 2, 3, 4, 3), 3, torch.float64, layout), torch.float64)
    assert torch.autograd.gradcheck(cpp_op("conv3d_3x3x3"), (x, w, b))


@cpu_kernel
@pytest.mark.parametrize("shape, cout", [((1, 6, 8, 9, 10), 7), ((1, 2, 31, 32, 34), 7), ((1, 6, 5, 6, 7), 7),
                                         ((1, 131, 3, 4, 3), 130)],
                         ids=["one block", "parallel blocks", "streamed filter", "weight gradient by slices"])
def test_kernel_is_bitwise_identical_across_thread_counts(isa, shape, cout):
    x, w, b = conv3d_3x3x3_args(shape, cout)
    g = torch.randn(shape[0], cout, *shape[2:])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append([cpp_op("conv3d_3x3x3")(x, w, b),
                            *cpp_op("conv3d_3x3x3_backward")(g, x, w, [True, True, True])])
    finally:
        torch.set_num_threads(threads)
    for later in results[1:]:
        for name, a, c in zip(("out", "grad_x", "grad_weight", "grad_bias"), results[0], later):
            assert torch.equal(a, c), f"{name} differs between thread counts"


@cpu_kernel
def test_kernel_isas_agree():
    """Every ISA variant this machine runs gives the reference's answer on a shape with partial channel vectors."""
    x, w, b = conv3d_3x3x3_args((1, 21, 5, 6, 7), 19)
    want = reference.conv3d_3x3x3(x.double(), w.double(), b.double())
    checked = []
    for isa_name in CPU_ISAS:
        if cpu_isa_unavailable(isa_name) is not None:
            continue
        with use_cpu_isa(isa_name):
            assert_close_rel(cpp_op("conv3d_3x3x3")(x, w, b), want, torch.float32, isa_name)
        checked.append(isa_name)
    assert "generic" in checked


# ---- packed weights: the weight transform done once (uxnet::conv3d_3x3x3_pack_weight / _packed) -------------------


@cpu_kernel_poisoned
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_packed_weight_gives_the_unpacked_result(isa, layout, dtype):
    """Same kernels, same order of operations: the packed path is bitwise the per-call transform, on both the
    one-block and the parallel-blocks path, with a partial column panel (C_out 19)."""
    for shape in [(2, 21, 5, 6, 7), (1, 17, 31, 32, 34)]:
        x, w, b = conv3d_3x3x3_args(shape, 19, dtype, layout)
        with torch.no_grad():
            packed = uk.conv3d_3x3x3_pack_weight(w)
            got = uk.conv3d_3x3x3(x, w, b, packed_weight=packed)
        pairs = dtype == torch.bfloat16 and conv_op.bf16_products()
        assert packed.dtype == (dtype if dtype == torch.float64 or pairs else torch.float32)
        assert packed.shape[0] == 64 and packed.shape[2] == (17 + 4 * (shape[1] == 21) + pairs) // (1 + pairs)
        assert got.is_contiguous(memory_format=expected_format(x))
        assert torch.equal(got, cpp_op("conv3d_3x3x3")(x, w, b))
    if dtype == torch.float64:
        assert rel_error(got, reference.conv3d_3x3x3(x, w, b)) <= 1e-10


@cpu_kernel_poisoned
def test_packed_weight_keeps_non_finite_semantics():
    """A NaN in x: the tiles around it are computed directly from the weight, as without a packed weight."""
    x, w, b = conv3d_3x3x3_args((1, 20, 7, 6, 5), 4)
    x[0, 3, 2, 2, 2] = float("nan")
    with torch.no_grad():
        got = uk.conv3d_3x3x3(x, w, b, packed_weight=uk.conv3d_3x3x3_pack_weight(w))
    want = reference.conv3d_3x3x3(x.double(), w.double(), b.double())
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))


@cpu_kernel
def test_packed_weight_bad_input():
    x, w, b = conv3d_3x3x3_args((1, 20, 5, 4, 6), 7)
    packed = uk.conv3d_3x3x3_pack_weight(w)
    with pytest.raises(RuntimeError, match="packed_weight does not belong"):
        torch.ops.uxnet.conv3d_3x3x3_packed(x, w, packed[..., :8].contiguous(), b)
    with pytest.raises(RuntimeError, match="packed_weight does not belong"):
        torch.ops.uxnet.conv3d_3x3x3_packed(x, w, packed.double(), b)
    with pytest.raises(RuntimeError, match="packed_weight does not belong"):
        torch.ops.uxnet.conv3d_3x3x3_packed(x, torch.randn(9, 20, 3, 3, 3), packed, None)
    with pytest.raises(RuntimeError, match="packed_weight does not belong"):
        torch.ops.uxnet.conv3d_3x3x3_packed(x, w[:5], packed, None)
    if conv_op.bf16_products():  # bf16 pairs record C_out as integer bits
        xb, wb = x.bfloat16(), w.bfloat16()
        packed_pairs = uk.conv3d_3x3x3_pack_weight(wb)
        assert packed_pairs.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="packed_weight does not belong"):
            torch.ops.uxnet.conv3d_3x3x3_packed(xb, wb[:5], packed_pairs, None)
        with pytest.raises(RuntimeError, match="packed_weight does not belong"):
            torch.ops.uxnet.conv3d_3x3x3_packed(xb, wb, packed, None)  # a float32 pack for bf16 x
    with pytest.raises(ValueError, match="for inference"):
        uk.conv3d_3x3x3(x, w.requires_grad_(), b, packed_weight=packed)
    with pytest.raises(ValueError, match="for inference"):
        uk.conv3d_3x3x3_pack_weight(w)
    with pytest.raises(ValueError, match="3x3x3 kernel"):
        uk.conv3d_3x3x3_pack_weight(torch.randn(4, 4, 3, 3, 1))


@cpu_kernel
def test_packed_weight_of_another_isa_is_refused():
    """A packed layout belongs to the ISA selected when it was packed: another column width is an error, never a
    silent wrong answer."""
    x, w, _ = conv3d_3x3x3_args((1, 20, 5, 4, 6), 7)
    widths = {}
    for isa_name in CPU_ISAS:
        if cpu_isa_unavailable(isa_name) is None:
            with use_cpu_isa(isa_name):
                widths[isa_name] = uk.conv3d_3x3x3_pack_weight(w)
    for packed_on, packed in widths.items():
        for run_on, other in widths.items():
            with use_cpu_isa(run_on):
                if packed.shape == other.shape:
                    assert torch.equal(torch.ops.uxnet.conv3d_3x3x3_packed(x, w, packed, None),
                                       torch.ops.uxnet.conv3d_3x3x3_packed(x, w, other, None))
                else:
                    with pytest.raises(RuntimeError, match="packed_weight does not belong"):
                        torch.ops.uxnet.conv3d_3x3x3_packed(x, w, packed, None)
    assert len({p.shape for p in widths.values()}) > 1, "expected ISA variants with different column widths"


@cpu_kernel
def test_packed_weight_under_autocast():
    """Autocast rounds the weight to bfloat16 before the convolution: a weight packed in float32 would skip that and
    is ignored; a bfloat16 weight packed for the bf16 products (what autocast rounds to) is used. (Packing another
    weight of the same shape tells used from ignored.)"""
    x, w, b = conv3d_3x3x3_args((1, 20, 5, 4, 6), 7)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = uk.conv3d_3x3x3(x, w, b)
        doubled = uk.conv3d_3x3x3(x, 2 * w, b)
        assert torch.equal(uk.conv3d_3x3x3(x, w, b, packed_weight=uk.conv3d_3x3x3_pack_weight(2 * w)), want)
        packed = uk.conv3d_3x3x3_pack_weight((2 * w).bfloat16())
        got = uk.conv3d_3x3x3(x, w, b, packed_weight=packed)
    assert want.dtype == got.dtype == torch.bfloat16
    if conv_op.bf16_products():
        assert packed.dtype == torch.bfloat16 and torch.equal(got, doubled)
    else:
        assert packed.dtype == torch.float32 and torch.equal(got, want)


@cpu_kernel
def test_packed_weight_is_ignored_where_the_cpu_kernel_does_not_run():
    x, w, b = conv3d_3x3x3_args((1, 20, 5, 4, 6), 7)
    packed = uk.conv3d_3x3x3_pack_weight(w)
    with uk.use_backend("reference"), dispatch.recording_backends() as used:
        got = uk.conv3d_3x3x3(x, w, b, packed_weight=packed)
    assert used == {"conv3d_3x3x3@cpu": "reference"}
    assert torch.equal(got, reference.conv3d_3x3x3(x, w, b))
