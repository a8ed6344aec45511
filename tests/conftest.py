"""Shared test helpers: tolerances, poisoning, error metrics and random inputs."""

import contextlib
import importlib.util
import os
import zlib

import pytest
import torch

# The Triton kernels run under the interpreter on a machine without CUDA (the op tests marked `triton`, in
# tests/ops/). Triton reads TRITON_INTERPRET when the kernels are defined, so it must be set before anything imports
# uxnet_kernels' Triton ops, hence here, before any test module is imported; it stays set for the session (triton
# also reads it lazily at launch). Nothing else runs Triton on CPU: backend "auto" never picks "triton" for CPU
# tensors, and TorchInductor's CPU code generation does not use Triton.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Relative error bounds (||got - want|| / ||want||) per dtype, against a float32/float64 reference computed from
# the same (rounded) inputs. float64 bounds are for comparisons with a float64 reference.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

REQUIRE_EXTENSION = os.environ.get("UXNET_REQUIRE_EXTENSION") == "1"


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; NaN/inf anywhere in `got` gives inf."""
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.isfinite(got64).all():
        return float("inf")
    denom = want64.norm().item()
    diff = (got64 - want64).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_error(got, want)
    assert err <= TOLERANCES[dtype], f"{what}: relative error {err:.3e} > {TOLERANCES[dtype]:.0e} ({dtype})"


def assert_close_flash(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "",
                       exact=None, same_dtype=None) -> None:
    """Within the dtype's relative tolerance of the reference ``want`` or, failing that, flash-attention's rule:
    no further from the float64 result ``exact`` than 2x PyTorch's own error in the same dtype (``same_dtype``,
    the reference run in ``dtype``; ``want`` itself when omitted). Callables are evaluated only when needed."""
    if dtype == torch.float64 or rel_error(got, want) <= TOLERANCES[dtype]:
        assert_close_rel(got, want, dtype, what)
        return
    exact = exact() if callable(exact) else exact
    same_dtype = same_dtype() if callable(same_dtype) else (want if same_dtype is None else same_dtype)
    if exact is None:
        assert_close_rel(got, want, dtype, what)
    ours, torchs = rel_error(got, exact), rel_error(same_dtype, exact)
    assert ours <= 2 * torchs, f"{what}: error {ours:.3e} vs float64, > 2x PyTorch's own {dtype} error {torchs:.3e}"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and strided like `t` filled with NaN, for out= buffers that the kernel must fully write."""
    return torch.full_like(t, float("nan"))


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """layout: "contiguous" or "channels_last_3d"."""
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in for a kernel of `dtype` (inputs rounded to `dtype` first)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=torch.float32, layout="contiguous", seed=None, scale=1.0, requires_grad=False):
    """A fresh random tensor (new values each call unless `seed` is given), rounded to `dtype`."""
    gen = make_generator(seed) if seed is not None else None
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if len(shape) == 5:
        t = to_layout(t, layout)
    return t.requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (reported on failure via the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def compiled_backend_available(device_type: str = "cpu") -> bool:
    from uxnet_kernels import dispatch

    return dispatch.get_backend_instance(device_type).available()[0]


def require_compiled(device_type: str = "cpu"):
    """Skip when the compiled backend is absent, unless UXNET_REQUIRE_EXTENSION=1 (CI), where that is a failure."""
    if compiled_backend_available(device_type):
        return
    if REQUIRE_EXTENSION and device_type == "cpu":
        pytest.fail("UXNET_REQUIRE_EXTENSION=1 but the compiled CPU backend is not available")
    pytest.skip(f"compiled {device_type} backend not available")


def require_cpu_kernels(*ops: str) -> None:
    """Skip when an op has no compiled CPU kernel, unless UXNET_REQUIRE_EXTENSION=1 (CI), where that is a failure."""
    from uxnet_kernels import _extension

    missing = [op for op in ops if not _extension.has_kernel(op, "CPU")]
    if missing:
        if REQUIRE_EXTENSION:
            pytest.fail(f"UXNET_REQUIRE_EXTENSION=1 but no CPU kernel for {missing}")
        pytest.skip(f"no CPU kernel registered for {missing}")


@contextlib.contextmanager
def poisoned_empty_tensors():
    """torch.empty returns NaN-filled memory meanwhile (deterministic mode's fill_uninitialized_memory), so a value a
    kernel fails to write shows up as NaN."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det)


# ---- ISA variants of the CPU kernels (UXNET_CPU_ISA, uxnet_kernels.cpu_isa) --------------------------------------

CPU_ISAS = ("generic", "avx2", "avx512", "avx512-emulated")
# Set for the whole run (e.g. CI's `UXNET_CPU_ISA=avx512-emulated pytest`): the per-ISA tests then run that variant
# only, and every other CPU test runs it too.
SESSION_CPU_ISA = os.environ.get("UXNET_CPU_ISA") or "auto"


def cpu_isa_unavailable(name: str):
    """None if this machine runs the variant, else why not."""
    from uxnet_kernels import cpu_isa as isa_info

    rep = isa_info.report()
    if name in rep["available"]:
        return None
    for line in rep["unavailable"]:
        if line.startswith(name + ":"):
            return line
    return f"{name}: {rep['error'] or 'not available'}"


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Runs the block with UXNET_CPU_ISA=name (the kernels read it at every call), then restores it."""
    previous = os.environ.get("UXNET_CPU_ISA")
    os.environ["UXNET_CPU_ISA"] = name
    try:
        yield name
    finally:
        if previous is None:
            os.environ.pop("UXNET_CPU_ISA", None)
        else:
            os.environ["UXNET_CPU_ISA"] = previous


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Each ISA variant this machine runs (only the session's when UXNET_CPU_ISA is set for the run)."""
    require_compiled("cpu")
    if SESSION_CPU_ISA != "auto" and request.param != SESSION_CPU_ISA:
        pytest.skip(f"UXNET_CPU_ISA={SESSION_CPU_ISA} restricts this run to that variant")
    why = cpu_isa_unavailable(request.param)
    if why is not None:
        pytest.skip(f"this machine cannot run the variant ({why})")
    with use_cpu_isa(request.param):
        yield request.param
