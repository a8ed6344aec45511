"""Every fast backend that can run here against the reference ops: forward and all gradients, per kernel size,
dtype and layout; float64 gradcheck; backend selection and fallback reporting."""

import warnings

import pytest
import torch

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference
from conftest import TOLERANCES, assert_close_rel, reference_dtype, require_compiled
from op_cases import KERNELS, dwconv3d_args, layer_norm_args, upcast, ux_mlp_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The compiled backend of each device. Triton has its own interpreter-sized tests (test_triton_kernels.py).
FAST_BACKENDS = [("cpu", "cpu")] + ([("cuda", "cuda"), ("triton", "cuda")] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last_3d"]
# (backend, device, dtype): the GPU backends also take float16.
CASES = [(b, d, dt) for b, d in FAST_BACKENDS for dt in DTYPES + ([torch.float16] if d == "cuda" else [])]


def _require(backend: str, device: str) -> None:
    if backend in ("cpu", "cuda"):
        require_compiled(backend)
    elif not dispatch.get_backend_instance(backend).available()[0]:
        pytest.skip(f"{backend} not available")


def _to(args, device):
    return [None if a is None else a.detach().to(device).requires_grad_(a.requires_grad) for a in args]


def _run_and_grads(fn, args, backend, grad_out_seed, grad_dtype):
    """Output of fn(*args) on `backend` and the grads of sum(out * g) for every tensor arg (None where absent);
    g is rounded to `grad_dtype` (the kernel's dtype) for the kernel and its reference alike."""
    with uk.use_backend(backend):
        out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    g = g.to(grad_dtype).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [a for a in args if a is not None], g)
    it = iter(grads)
    return out, [None if a is None else next(it) for a in args]


def _compare(fn, args, backend, dtype, what, device="cpu"):
    """Run `fn` on `backend` in `dtype` and on the reference in float32/64 from the same rounded inputs."""
    rounded = upcast(args, dtype)
    fast_args = _to(rounded, device)
    ref_args = upcast(rounded, reference_dtype(dtype))
    out, grads = _run_and_grads(fn, fast_args, backend, 1, dtype)
    ref_out, ref_grads = _run_and_grads(fn, ref_args, "reference", 1, dtype)
    assert out.dtype == dtype
    assert_close_rel(out.cpu(), ref_out, dtype, f"{what} output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is not None:
            assert_close_rel(g.cpu(), rg, dtype, f"{what} grad of arg {i}")
    return out


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "x".join(map(str, k)))
def test_dwconv3d_matches_reference(backend, device, layout, dtype, kernel):
    _require(backend, device)
    args = dwconv3d_args(kernel=kernel, dtype=torch.float64, layout=layout)
    out = _compare(uk.dwconv3d, args, backend, dtype, f"dwconv3d[{backend}]", device)
    if layout == "channels_last_3d" and backend in ("cpu", "cuda"):
        assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv3d_without_bias(backend, device, layout, dtype):
    _require(backend, device)
    args = dwconv3d_args(kernel=(5, 3, 7), dtype=torch.float64, layout=layout, bias=False)
    _compare(uk.dwconv3d, args, backend, dtype, f"dwconv3d[{backend}] no bias", device)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_matches_reference(backend, device, layout, dtype):
    _require(backend, device)
    x, w, b = layer_norm_args(dtype=torch.float64, layout=layout)
    _compare(lambda x, w, b: uk.layer_norm_channels_first(x, w, b, 1e-6), (x, w, b), backend, dtype,
             f"layer_norm[{backend}]", device)


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual,gamma", [(True, True), (False, True), (True, False)])
def test_ux_mlp_matches_reference(backend, device, layout, dtype, residual, gamma):
    _require(backend, device)
    args = ux_mlp_args(dtype=torch.float64, layout=layout, residual=residual, gamma=gamma)
    _compare(lambda *a: uk.ux_mlp(*a, eps=1e-6), args, backend, dtype, f"ux_mlp[{backend}]", device)


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, device, layout):
    _require(backend, device)
    small = (2, 3, 4, 3, 5)
    with uk.use_backend(backend):
        args = _to(upcast(dwconv3d_args(small, (3, 5, 3), torch.float64, layout), torch.float64), device)
        assert torch.autograd.gradcheck(uk.dwconv3d, args)
        args = _to(upcast(layer_norm_args(small, torch.float64, layout), torch.float64), device)
        assert torch.autograd.gradcheck(lambda *a: uk.layer_norm_channels_first(*a, 1e-6), args)
        args = _to(upcast(ux_mlp_args(small, torch.float64, layout), torch.float64), device)
        assert torch.autograd.gradcheck(lambda *a: uk.ux_mlp(*a, eps=1e-6), args)
    assert dispatch._last_used[("dwconv3d", device)] == backend


def test_auto_uses_compiled_cpu_backend():
    require_compiled("cpu")
    x, w, b = dwconv3d_args()
    with uk.use_backend("auto"):
        uk.dwconv3d(x, w, b)
        report = uk.backend_report("cpu")
    assert report["would_use"] == {op: "cpu" for op in report["would_use"]}
    assert report["last_used"]["dwconv3d@cpu"] == "cpu"


def test_explicit_backend_that_cannot_serve_warns_and_falls_back():
    """float16 on CPU is not served by the cpu kernels: the call must say so and still be right."""
    x, w, b = dwconv3d_args(dtype=torch.float16)
    dispatch._warned.clear()
    with uk.use_backend("cpu"), pytest.warns(RuntimeWarning, match="cannot serve"):
        out = uk.dwconv3d(x, w, b)
    assert dispatch._last_used[("dwconv3d", "cpu")] == "reference"
    want = reference.dwconv3d(x.float(), w.float(), b.float())
    assert_close_rel(out.float(), want, torch.float16, "fp16 fallback")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        uk.set_backend("fastest")


def test_use_backend_restores_previous_setting():
    uk.set_backend("auto")
    with uk.use_backend("reference"):
        assert uk.get_backend() == "reference"
    assert uk.get_backend() == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_backend_report_lists_every_backend(device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = uk.backend_report(device)
    assert set(report["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert set(report["would_use"]) == {"dwconv3d", "layer_norm_channels_first", "ux_mlp",
                                        "instance_norm_lrelu", "instance_norm_add_lrelu"}
    assert report["backends"]["reference"]["available"]


def test_tolerance_table_covers_all_dtypes():
    assert set(TOLERANCES) >= set(DTYPES)
