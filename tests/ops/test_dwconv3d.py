"""dwconv3d (uxnet::dwconv3d, uxnet::dwconv3d_backward): the reference against an independent formulation; every
backend that can run here against the reference (compiled CPU; CUDA and Triton when a GPU is present; Triton under
the interpreter, marked ``triton``); float64 gradcheck; opcheck; bad input; empty input; non-finite propagation;
the CPU kernels per ISA variant (tests taking the ``isa`` fixture of tests/conftest.py run on each variant this
machine runs, avx512-emulated included)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference
from conftest import CPU_ISAS, assert_close_rel, cpu_isa_unavailable, reference_dtype, rel_error, to_layout, use_cpu_isa

from . import bad_input
from .bad_input import Bad
from .checks import (
    CASES,
    FAST_BACKENDS,
    TRITON_OPCHECK_TESTS,
    check_non_finite,
    compare_backend,
    non_finite_cases,
    require_backend,
    to_device,
    triton_check,
    triton_dev,
)
from .samples import (
    KERNELS,
    LAYOUTS,
    ON_GPU,
    TRITON_SHAPE,
    cpp_op,
    dwconv3d_args,
    expected_format,
    is_channels_last,
    tensor,
    triton_op,
    upcast,
)

cpu_kernel = pytest.mark.usefixtures("compiled_cpu")

# ---- the reference is the ground truth ---------------------------------------------------------------------------


def _naive_dwconv3d(x, w, b):
    """Sum of shifted copies of the zero-padded input, one kernel tap at a time."""
    kd, kh, kw = w.shape[2:]
    n, c, d, h, wd = x.shape
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kd // 2, kd // 2))
    out = torch.zeros_like(x) + b.view(1, c, 1, 1, 1)
    for i in range(kd):
        for j in range(kh):
            for k in range(kw):
                out += w[:, 0, i, j, k].view(1, c, 1, 1, 1) * xp[:, :, i:i + d, j:j + h, k:k + wd]
    return out


def test_reference_is_a_same_padded_depthwise_conv():
    x, w, b = dwconv3d_args(kernel=(5, 3, 7), dtype=torch.float64)
    assert rel_error(reference.dwconv3d(x, w, b), _naive_dwconv3d(x, w, b)) < 1e-12


# ---- every fast backend against the reference, through the public op ---------------------------------------------


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "x".join(map(str, k)))
def test_matches_reference(backend, device, layout, dtype, kernel):
    require_backend(backend, device)
    args = dwconv3d_args(kernel=kernel, dtype=torch.float64, layout=layout)
    out = compare_backend(uk.dwconv3d, args, backend, dtype, f"dwconv3d[{backend}]", device)
    if layout == "channels_last_3d" and backend in ("cpu", "cuda"):
        assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_bias(backend, device, layout, dtype):
    require_backend(backend, device)
    args = dwconv3d_args(kernel=(5, 3, 7), dtype=torch.float64, layout=layout, bias=False)
    compare_backend(uk.dwconv3d, args, backend, dtype, f"dwconv3d[{backend}] no bias", device)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, device, layout):
    require_backend(backend, device)
    with uk.use_backend(backend):
        args = to_device(upcast(dwconv3d_args((2, 3, 4, 3, 5), (3, 5, 3), torch.float64, layout), torch.float64),
                         device)
        assert torch.autograd.gradcheck(uk.dwconv3d, args)
    assert dispatch._last_used[("dwconv3d", device)] == backend


# ---- opcheck: schema, fake (meta) impl, autograd registration, AOT dispatch ---------------------------------------


def opcheck_samples(layout):
    """(schema, args) of every compiled dwconv3d schema; also used by tests/test_dispatch.py's coverage check."""
    small = (2, 3, 4, 5, 6)
    yield "dwconv3d", dwconv3d_args(small, (3, 5, 3), layout=layout, grad=True)
    yield "dwconv3d", dwconv3d_args(small, (3, 3, 3), layout=layout, bias=False, grad=True)
    x, w, _ = dwconv3d_args(small, (3, 5, 3), layout=layout)
    yield "dwconv3d_backward", (torch.randn_like(x), x, w, [True, True, True])
    yield "dwconv3d_backward", (torch.randn_like(x), x, w, [False, True, False])


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    for name, args in opcheck_samples(layout):
        torch.library.opcheck(cpp_op(name).default, tuple(args))


# ---- bad input (bad_input.py) --------------------------------------------------------------------------------------


def _public(mutate):
    return lambda: mutate(*dwconv3d_args())


def _small(x_shape, w_shape, w_dtype=torch.float32):
    return torch.randn(x_shape), torch.randn(w_shape, dtype=w_dtype)


BAD_INPUT = [
    Bad("rank", _public(lambda x, w, b: (x[0], w, b)), ValueError,
        r"dwconv3d: expected x of shape \(N, C, D, H, W\) \(5-d\), got 4-d"),
    Bad("even kernel", _public(lambda x, w, b: (x, torch.randn(5, 1, 3, 4, 3), b)), ValueError,
        r"dwconv3d: expected odd kernel sizes.*\(3, 4, 3\)"),
    Bad("channels", _public(lambda x, w, b: (x, w[:4], b)), ValueError,
        r"dwconv3d: expected weight of shape \(5, 1, KD, KH, KW\).*got \(4, 1"),
    Bad("bias", _public(lambda x, w, b: (x, w, b[:3])), ValueError,
        r"dwconv3d: expected bias of shape \(5,\), got \(3,\)"),
    Bad("dtype", _public(lambda x, w, b: (x, w.double(), b)), ValueError,
        r"dwconv3d: expected weight dtype torch.float32"),
    Bad("device", _public(lambda x, w, b: (x, w.to("meta"), b)), ValueError,
        r"dwconv3d: expected weight on device cpu"),
    Bad("integer", _public(lambda x, w, b: (x.to(torch.int32), w, b)), ValueError,
        r"dwconv3d: expected x to have a floating dtype"),
    Bad("not a tensor", _public(lambda x, w, b: (x.tolist(), w, b)), ValueError,
        r"dwconv3d: expected x to be a torch.Tensor"),
    # The C++ ops check their inputs too (they can be called without the Python layer).
    Bad("cpp even kernel", _public(lambda x, w, b: (x, torch.randn(5, 1, 2, 3, 3), b)), RuntimeError,
        r"dwconv3d: expected odd kernel sizes", schema="dwconv3d"),
    Bad("cpp dtype", _public(lambda x, w, b: (x, w.double(), b)), RuntimeError, r"expected weight dtype",
        schema="dwconv3d"),
    Bad("cpp rank", _public(lambda x, w, b: (x[0], w, b)), RuntimeError, r"expected x of shape \(N, C, D, H, W\)",
        schema="dwconv3d"),
    Bad("cpp even kernel 3x2x3", lambda: (*_small((1, 2, 3, 3, 3), (2, 1, 3, 2, 3)), None), RuntimeError,
        "expected odd kernel sizes", schema="dwconv3d"),
    Bad("cpp output channels", lambda: (*_small((1, 2, 3, 3, 3), (3, 1, 3, 3, 3)), None), RuntimeError,
        "output channels", schema="dwconv3d"),
]


def _backward_case(x_shape, w_shape, w_dtype=torch.float32):
    def build():
        x, w = _small(x_shape, w_shape, w_dtype)
        return torch.randn(x.shape), x, w, [True, True, True]
    return build


BAD_INPUT += [
    Bad("cpp backward rank", _backward_case((1, 2, 3, 3), (2, 1, 3, 3, 3)), RuntimeError, "expected x of shape",
        schema="dwconv3d_backward"),
    Bad("cpp backward even kernel", _backward_case((1, 2, 3, 3, 3), (2, 1, 3, 2, 3)), RuntimeError,
        "expected odd kernel sizes", schema="dwconv3d_backward"),
    Bad("cpp backward output channels", _backward_case((1, 2, 3, 3, 3), (3, 1, 3, 3, 3)), RuntimeError,
        "output channels", schema="dwconv3d_backward"),
    Bad("cpp backward weight dtype", _backward_case((1, 2, 3, 3, 3), (2, 1, 3, 3, 3), torch.float64), RuntimeError,
        "weight dtype", schema="dwconv3d_backward"),
    Bad("cpp backward grad_out shape",
        lambda: (torch.randn(1, 2, 3, 4, 6), torch.randn(1, 2, 3, 4, 5), torch.randn(2, 1, 3, 3, 3), [True] * 3),
        RuntimeError, r"uxnet::dwconv3d_backward: expected grad_out of shape", schema="dwconv3d_backward"),
    Bad("cpp backward grad_out dtype",
        lambda: (torch.randn(1, 2, 3, 4, 5, dtype=torch.float64), torch.randn(1, 2, 3, 4, 5),
                 torch.randn(2, 1, 3, 3, 3), [True] * 3),
        RuntimeError, r"expected grad_out dtype", schema="dwconv3d_backward"),
]


@pytest.mark.parametrize("case,backend", bad_input.params(BAD_INPUT))
def test_bad_input(case, backend):
    bad_input.check(case, backend, uk.dwconv3d)


@cpu_kernel
def test_unknown_isa_is_a_clear_error():
    with use_cpu_isa("sse9"):
        with pytest.raises(RuntimeError, match="uxnet::dwconv3d: .*UXNET_CPU_ISA must be one of"):
            cpp_op("dwconv3d")(torch.randn(1, 1, 1, 1, 1), torch.randn(1, 1, 1, 1, 1), None)


# ---- empty input ---------------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 5, 6, 7, 8), (2, 5, 0, 7, 8), (2, 5, 6, 7, 0), (2, 0, 6, 7, 8)]


@pytest.mark.parametrize("backend", bad_input.BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_input_gives_empty_result_and_zero_parameter_grads(backend, shape):
    if backend == "cpu":
        require_backend("cpu", "cpu")
    with uk.use_backend(backend):
        x, w, b = dwconv3d_args(shape, (3, 3, 3), grad=True)
        out = uk.dwconv3d(x, w, b)
        assert out.shape == shape
        out.sum().backward()
        assert w.grad.shape == w.shape and not w.grad.any()


@cpu_kernel
@pytest.mark.parametrize("shape", [(0, 4, 3, 3, 3), (2, 0, 3, 3, 3), (2, 4, 0, 3, 3), (2, 4, 3, 3, 0)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_kernels(shape, layout):
    c = shape[1]
    x = to_layout(torch.randn(shape), layout)
    w, b = torch.randn(c, 1, 3, 3, 5), torch.randn(c)
    out = cpp_op("dwconv3d")(x, w, b)
    assert out.shape == x.shape
    gx, gw, gb = cpp_op("dwconv3d_backward")(torch.randn(shape), x, w, [True, True, True])
    assert gx.shape == x.shape
    assert gw.shape == w.shape and torch.equal(gw, torch.zeros_like(w))
    assert gb.shape == (c,) and torch.equal(gb, torch.zeros(c))


# ---- non-finite values (checks.check_non_finite) ------------------------------------------------------------------
# The float64 reference is the truth: with a non-finite weight, PyTorch's float32 F.conv3d (oneDNN) skips padded taps
# in the forward and so disagrees with its own float64 result; the kernels follow float64.

NF_SHAPE = (2, 5, 4, 5, 6)


def _non_finite_inputs(dtype, layout):
    x, w, b = dwconv3d_args(NF_SHAPE, (3, 5, 3), dtype, layout, weight_scale=0.3)
    return {"x": x, "weight": w, "bias": b}


@cpu_kernel
@pytest.mark.parametrize("name, value, dtype, layout", non_finite_cases(_non_finite_inputs), ids=str)
def test_non_finite_positions_match_the_float64_reference(name, value, dtype, layout):
    check_non_finite("dwconv3d", _non_finite_inputs, lambda a: cpp_op("dwconv3d")(a["x"], a["weight"], a["bias"]),
                     lambda a: reference.dwconv3d(a["x"], a["weight"], a["bias"]), name, value, dtype, layout)


@cpu_kernel
def test_non_finite_weight_border_semantics():
    """The two semantics the float64 reference mixes: forward makes the whole channel non-finite (zero padding
    times Inf), the input gradient only where the tap meets grad_out (k = 7 along W: wide borders)."""
    x = torch.randn(1, 2, 3, 4, 9, dtype=torch.float64)
    w = torch.randn(2, 1, 1, 3, 7, dtype=torch.float64)
    w[1, 0, 0, 0, 0] = float("inf")  # the corner tap: reaches only part of the volume
    out = cpp_op("dwconv3d")(x, w, None)
    assert not torch.isfinite(out[:, 1]).any() and torch.isfinite(out[:, 0]).all()
    g = torch.randn_like(x)
    grad_x = cpp_op("dwconv3d_backward")(g, x, w, [True, False, False])[0]
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.dwconv3d(xr, w), xr, g)
    assert torch.equal(torch.isfinite(grad_x), torch.isfinite(want))
    assert 0 < int((~torch.isfinite(grad_x[:, 1])).sum()) < grad_x[:, 1].numel()  # a strict part of the channel


# ---- the CPU kernels (csrc/cpu/dwconv3d/) --------------------------------------------------------------------------
# Every check compares each tensor against the reference computed in float32/float64 from the same (rounded) inputs.
# The ops allocate their outputs, so there is no buffer to poison; instead every output is compared in full and
# must be finite.

CPU_LAYOUTS = ("contiguous", "channels_last_3d", "strided_view", "permuted_view")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
    x, w, b = dwconv3d_args(shape, kernel, dtype, layout)
    grad_out = tensor(shape, dtype, grad_layout)
    want_out, want_gx, want_gw, want_gb = _reference_all(x, w, b, grad_out)
    tag = f"{shape} k={kernel} {dtype} x:{layout} g:{grad_layout}"

    out = cpp_op("dwconv3d")(x, w, b)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(x)), f"{tag}: output layout"
    _check(out, want_out, dtype, f"{tag} out")

    gx, gw, gb = cpp_op("dwconv3d_backward")(grad_out, x, w, [True, True, True])
    assert gx.is_contiguous(memory_format=expected_format(grad_out)), f"{tag}: grad_x layout"
    _check(gx, want_gx, dtype, f"{tag} grad_x")
    _check(gw, want_gw, dtype, f"{tag} grad_weight")
    _check(gb, want_gb, dtype, f"{tag} grad_bias")

    # The same gradients through autograd (register_autograd of uxnet::dwconv3d -> dwconv3d_backward).
    xa, wa, ba = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    cpp_op("dwconv3d")(xa, wa, ba).backward(grad_out)
    _check(xa.grad, want_gx, dtype, f"{tag} autograd grad_x")
    _check(wa.grad, want_gw, dtype, f"{tag} autograd grad_weight")
    _check(ba.grad, want_gb, dtype, f"{tag} autograd grad_bias")


odd = st.integers(0, 5).map(lambda i: 2 * i + 1)  # 1 .. 11
spatial = st.integers(1, 9)


@cpu_kernel
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 19),
    d=spatial,
    h=spatial,
    w=st.integers(1, 17),
    kernel=st.tuples(odd, odd, odd),
    dtype=st.sampled_from(CPU_DTYPES),
    layout=st.sampled_from(CPU_LAYOUTS),
    grad_layout=st.sampled_from(CPU_LAYOUTS),
)
def test_kernel_matches_reference_property(isa, n, c, d, h, w, kernel, dtype, layout, grad_layout):
    _run_case((n, c, d, h, w), kernel, dtype, layout, grad_layout)


@cpu_kernel
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
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_edge_shapes(isa, shape, kernel, layout):
    _run_case(shape, kernel, torch.float32, layout, layout)


@cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [(7, 7, 7), (3, 5, 9)])  # the register-row kernel and the run-time width
@pytest.mark.parametrize("width", [1, 2, 3, 4, 6, 7, 13, 16, 17, 33, 48])
def test_kernel_channels_last_in_place_equals_blocked(isa, width, kernel, dtype):
    """channels_last_3d float32 / float64 with C a multiple of every ISA's lanes is written in place, and read in
    place by the register-row kernel (k = 7 on avx512 and its emulation), the taps past the W borders skipped (blocks
    at one border, at both, and inside); NCDHW goes through blocked planes with zero columns. Equal results, for the
    output and for grad_x (the same driver), and both match the reference."""
    shape = (2, 32, 3, 4, width)
    x, w, b = dwconv3d_args(shape, kernel, dtype, "channels_last_3d")
    grad_out = tensor(shape, dtype, "channels_last_3d")
    want_out, want_gx, _, _ = _reference_all(x, w, b, grad_out)
    out = cpp_op("dwconv3d")(x, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, cpp_op("dwconv3d")(x.contiguous(), w, b)), f"W={width}: in place != blocked"
    _check(out, want_out, dtype, f"W={width} out")
    gx = cpp_op("dwconv3d_backward")(grad_out, x, w, [True, False, False])[0]
    gx_blocked = cpp_op("dwconv3d_backward")(grad_out.contiguous(), x.contiguous(), w, [True, False, False])[0]
    assert torch.equal(gx, gx_blocked), f"W={width}: grad_x in place != blocked"
    _check(gx, want_gx, dtype, f"W={width} grad_x")


@cpu_kernel
def test_kernel_in_place_offsets_past_2_31(isa):
    """A float32 channels-last view whose depth stride puts its last plane 2**31 elements past its first: read in
    place with int64 offsets (as x, and as grad_out for grad_x) on the ISAs with the register-row kernel, packed by the
    ring elsewhere. Only the pages the view touches are committed (about 1 MB of the 8 GiB of address space)."""
    c, d, h, w = 16, 3, 4, 9  # C a multiple of every ISA's lanes
    plane_stride = 2**30 + 4096
    storage_elems = plane_stride * (d - 1) + h * w * c
    storage_bytes = storage_elems * 4
    try:
        storage = torch.empty(storage_elems, dtype=torch.float32)
    except RuntimeError as error:  # the address space is refused (strict overcommit): nothing to test against
        pytest.skip(f"cannot reserve {storage_bytes / 2**30:.0f} GiB of address space: {error}")
    x = storage.as_strided((1, c, d, h, w), (plane_stride * d, 1, plane_stride, w * c, c))
    x.copy_(torch.randn(1, c, d, h, w))
    assert x.storage_offset() + (d - 1) * x.stride(2) > 2**31
    weight, bias = torch.randn(c, 1, 7, 7, 7), torch.randn(c)
    want_out, want_gx, _, _ = _reference_all(x.contiguous(), weight, bias, x.contiguous())
    _check(cpp_op("dwconv3d")(x, weight, bias), want_out, torch.float32, "out")
    _check(cpp_op("dwconv3d_backward")(x, x, weight, [True, False, False])[0], want_gx, torch.float32, "grad_x")


@cpu_kernel
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_kernel_output_mask(isa, mask):
    x, g = torch.randn(2, 5, 4, 5, 6), torch.randn(2, 5, 4, 5, 6)
    w, b = torch.randn(5, 1, 3, 5, 3), torch.randn(5)
    _, want_gx, want_gw, want_gb = _reference_all(x, w, b, g)
    got = cpp_op("dwconv3d_backward")(g, x, w, list(mask))
    names = ("grad_x", "grad_weight", "grad_bias")
    for wanted, t, want, name in zip(mask, got, (want_gx, want_gw, want_gb), names):
        if wanted:
            _check(t, want, torch.float32, name)
        else:
            assert t.shape == (0,), f"masked-out {name} should be empty, got {tuple(t.shape)}"


@cpu_kernel
def test_kernel_no_bias(isa):
    x, w = torch.randn(1, 6, 5, 6, 7), torch.randn(6, 1, 5, 3, 3)
    _check(cpp_op("dwconv3d")(x, w, None), reference.dwconv3d(x, w), torch.float32, "no bias")


@cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_float64_gradcheck(isa, layout):
    x = to_layout(torch.randn(1, 3, 4, 3, 5, dtype=torch.float64), layout).requires_grad_(True)
    w = torch.randn(3, 1, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cpp_op("dwconv3d"), (x, w, b))


@cpu_kernel
def test_kernel_grad_weight_is_deterministic_across_runs_and_thread_counts(isa):
    x = torch.randn(2, 24, 10, 9, 11)
    g = torch.randn_like(x)
    w = torch.randn(24, 1, 7, 7, 7)
    backward = cpp_op("dwconv3d_backward")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, gw1, gb1 = backward(g, x, w, [False, True, True])
        torch.set_num_threads(2)
        _, gw2, gb2 = backward(g, x, w, [False, True, True])
        _, gw3, gb3 = backward(g, x, w, [False, True, True])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gw1, gw2) and torch.equal(gw2, gw3), "grad_weight differs between runs / thread counts"
    assert torch.equal(gb1, gb2) and torch.equal(gb2, gb3), "grad_bias differs between runs / thread counts"


@cpu_kernel
def test_kernel_isas_agree():
    """Every ISA variant this machine runs gives the reference's answer on one shape bigger than a register block."""
    x, w, b = torch.randn(1, 21, 6, 7, 30), torch.randn(21, 1, 7, 5, 9), torch.randn(21)
    want = reference.dwconv3d(x, w, b)
    checked = []
    for isa_name in CPU_ISAS:
        if cpu_isa_unavailable(isa_name) is not None:
            continue
        with use_cpu_isa(isa_name):
            _check(cpp_op("dwconv3d")(x, w, b), want, torch.float32, isa_name)
        checked.append(isa_name)
    assert "generic" in checked


# ---- Triton (interpreter on CPU at tiny shapes, native on CUDA) ------------------------------------------------------


def _triton(x, w, b):
    return triton_op("dwconv3d_triton")(x, w, b)


def _conv_ref(x, w, b):
    return F.conv3d(x, w, b, padding=tuple(k // 2 for k in w.shape[2:]), groups=x.shape[1])


TRITON_CASES = [  # (kernel, layout): k = 7 once (the interpreter's cost grows with k^2 per program)
    ((3, 3, 3), "contiguous"),
    ((3, 3, 3), "channels_last_3d"),
    ((5, 3, 7), "contiguous"),
    ((5, 3, 7), "channels_last_3d"),
    ((7, 7, 7), "channels_last_3d"),
]
if ON_GPU:
    TRITON_CASES += [((7, 7, 7), "contiguous"), ((13, 13, 13), "channels_last_3d"),
                     ((21, 21, 21), "channels_last_3d")]


@pytest.mark.triton
@pytest.mark.parametrize("kernel,layout", TRITON_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_triton_float32(kernel, layout):
    args = dwconv3d_args(TRITON_SHAPE, kernel, layout=layout, grad=True)
    out = triton_check(_triton, _conv_ref, args, torch.float32, f"dwconv3d {kernel} {layout}")
    assert is_channels_last(out) == (layout == "channels_last_3d"), "output must keep the input's memory format"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_half(dtype):
    args = dwconv3d_args(TRITON_SHAPE, (3, 3, 3), layout="channels_last_3d", grad=True)
    triton_check(_triton, _conv_ref, args, dtype, f"dwconv3d {dtype}")


@pytest.mark.triton
def test_triton_no_bias_and_grad_out_in_other_layout():
    args = dwconv3d_args(TRITON_SHAPE, (3, 3, 5), layout="contiguous", bias=False, grad=True)
    triton_check(_triton, _conv_ref, args, torch.float32, "dwconv3d no bias", grad_layout="channels_last_3d")


@pytest.mark.triton
def test_triton_odd_strides_and_channel_blocks(triton_dwconv3d, monkeypatch):
    """Input that is neither contiguous nor channels_last_3d; more channels than one block; tiles that do not
    divide the volume; several tiles per grad-weight chunk and several width chunks."""
    if not ON_GPU:
        monkeypatch.setattr(triton_dwconv3d, "_INTERPRETER_FWD_TILE", 512)
        monkeypatch.setattr(triton_dwconv3d, "_INTERPRETER_GRAD_WEIGHT_TILE", 8192)
        monkeypatch.setenv("UXNET_TRITON_KW_CHUNK", "2")
    monkeypatch.setattr(triton_dwconv3d, "_TARGET_PROGRAMS", 12)
    shape = (1, 20, 3, 5, 11)  # KH = 1 below: Triton specialises an int argument of 1 to a constant
    x, w, b = dwconv3d_args(shape, (3, 1, 5), grad=True)
    x = x.detach().permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3).requires_grad_(True)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    triton_check(_triton, _conv_ref, [x, w, b], torch.float32, "dwconv3d odd strides")


@pytest.mark.triton
def test_triton_backward_output_mask():
    x, w, _ = triton_dev(dwconv3d_args(TRITON_SHAPE, (3, 3, 3)))
    g = torch.randn_like(x)
    backward = triton_op("dwconv3d_triton_backward")
    full = backward(g, x, w, [True, True, True])
    grad_x, grad_w, grad_b = backward(g, x, w, [False, True, False])
    assert grad_x.shape == (0,) and grad_b.shape == (0,)
    assert torch.equal(grad_w, full[1])
    assert full[0].shape == x.shape and full[1].shape == w.shape and full[2].shape == (x.shape[1],)


@pytest.mark.triton
def test_triton_grad_weight_is_deterministic():
    x, w, _ = triton_dev(dwconv3d_args(TRITON_SHAPE, (3, 3, 3), layout="channels_last_3d"))
    g = torch.randn_like(x)
    backward = triton_op("dwconv3d_triton_backward")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = backward(g, x, w, [False, True, True])
        second = backward(g, x, w, [False, True, True])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.triton
def test_triton_opcheck_schema_fake_and_autograd_registration():
    x, w, b = triton_dev(dwconv3d_args((2, 3, 4, 5, 6), (3, 5, 3), layout="channels_last_3d", grad=True))
    torch.library.opcheck(triton_op("dwconv3d_triton").default, (x, w, b), test_utils=TRITON_OPCHECK_TESTS)
    torch.library.opcheck(triton_op("dwconv3d_triton_backward").default,
                          (torch.randn_like(x), x.detach(), w.detach(), [True, False, True]),
                          test_utils=TRITON_OPCHECK_TESTS)


@pytest.mark.triton
def test_triton_backend_dispatch_and_report():
    from .samples import TRITON_DEVICE

    backend = dispatch.get_backend_instance("triton")
    assert backend.available() == (True, "")
    probe = torch.empty(1, 1, 1, 1, 1, device=TRITON_DEVICE)
    assert dispatch.family("dwconv3d").verdict("triton", probe) == (True, "")
    ok, why = dispatch.family("dwconv3d").verdict("triton", probe.double())
    assert not ok and "float64" in why
    x, w, b = triton_dev(dwconv3d_args(TRITON_SHAPE, (3, 3, 3)))
    with uk.use_backend("triton"):
        out = uk.dwconv3d(x, w, b)
    assert uk.backend_report()["last_used"][f"dwconv3d@{TRITON_DEVICE}"] == "triton"
    assert_close_rel(out.cpu(), reference.dwconv3d(x.cpu().double(), w.cpu().double(), b.cpu().double()),
                     torch.float32, "dwconv3d through use_backend('triton')")


@pytest.mark.triton
@pytest.mark.skipif(not ON_GPU, reason="needs a tensor over 2**31 elements: GPU memory, not interpreter speed")
def test_triton_int64_offsets_on_gpu():
    # 2 x 16 x 256 x 256 x 1025 fp16 = 2**31 + 2**26 elements: offsets past 2**31 must not wrap.
    x = torch.randn(2, 16, 256, 256, 1025, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 1, 3, 3, 3, device="cuda", dtype=torch.float16)
    out = _triton(x, w, None)
    tail = slice(-4, None)
    ref = _conv_ref(x[1:, :, tail].float(), w.float(), None)
    assert_close_rel(out[1:, :, tail][:, :, 1:-1].float().cpu(), ref[:, :, 1:-1].cpu(), torch.float16, "tail")
