"""Comparison machinery shared by the op-family tests: a backend against the reference ops, a compiled kernel
against the reference (flash-attention's rule where ill-conditioned), a Triton kernel against the reference, and
non-finite propagation. Each keeps the rule (and tolerances) of the tests it came from."""

import pytest
import torch

import uxnet_kernels as uk
from uxnet_kernels import dispatch
from conftest import (
    TOLERANCES,
    assert_close_flash,
    assert_close_rel,
    reference_dtype,
    rel_error,
    require_compiled,
    to_layout,
)
from cpu_fuzz import UNIT_ROUNDOFF as _FUZZ_UNIT_ROUNDOFF

from .samples import TRITON_DEVICE, block_tail, expected_format, upcast

# ---- every fast backend that can run here against the reference, through the public op ------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The compiled backend of each device. Triton on CPU has its own interpreter-sized tests (marked triton).
FAST_BACKENDS = [("cpu", "cpu")] + ([("cuda", "cuda"), ("triton", "cuda")] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# (backend, device, dtype): the GPU backends also take float16.
CASES = [(b, d, dt) for b, d in FAST_BACKENDS for dt in DTYPES + ([torch.float16] if d == "cuda" else [])]


def require_backend(backend: str, device: str) -> None:
    if backend in ("cpu", "cuda"):
        require_compiled(backend)
    elif not dispatch.get_backend_instance(backend).available()[0]:
        pytest.skip(f"{backend} not available")


def to_device(args, device):
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


def compare_backend(fn, args, backend, dtype, what, device="cpu"):
    """Run `fn` on `backend` in `dtype` and on the reference in float32/64 from the same rounded inputs."""
    rounded = upcast(args, dtype)
    fast_args = to_device(rounded, device)
    ref_args = upcast(rounded, reference_dtype(dtype))
    out, grads = _run_and_grads(fn, fast_args, backend, 1, dtype)
    ref_out, ref_grads = _run_and_grads(fn, ref_args, "reference", 1, dtype)
    assert out.dtype == dtype
    assert_close_rel(out.cpu(), ref_out, dtype, f"{what} output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is not None:
            assert_close_rel(g.cpu(), rg, dtype, f"{what} grad of arg {i}")
    return out


# ---- a compiled CPU kernel (torch.ops.uxnet.*) against the reference: layer_norm_channels_first, ux_mlp --------------


def forward_and_grads(fn, args, grad_out):
    out = fn(*args)
    wrt = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(out, wrt, grad_out.to(out.dtype)))
    return out, [None if a is None else next(grads) for a in args]


def check_kernel(kernel, ref, args, dtype):
    """Kernel in `dtype` vs the reference in float32/64 from the same rounded inputs: output and every grad."""
    fast = upcast(args, dtype)
    slow = upcast(args, reference_dtype(dtype))
    grad_out = torch.randn(args[0].shape, dtype=torch.float64).to(dtype)  # both paths see the same rounded values
    out, grads = forward_and_grads(kernel, fast, grad_out)
    ref_out, ref_grads = forward_and_grads(ref, slow, grad_out)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(fast[0])), "output must keep the first input's memory format"
    cache = {}
    grad_scale = grad_out.double().norm().item()

    def exact():
        if "exact" not in cache:
            cache["exact"] = forward_and_grads(ref, upcast(args, torch.float64), grad_out)
        return cache["exact"]

    def float32_reference():
        if "float32" not in cache:
            cache["float32"] = forward_and_grads(ref, upcast(args, torch.float32), grad_out)
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
        bound = (1e-5 if dtype == torch.float64 else 2.0) * torchs + 2 * _FUZZ_UNIT_ROUNDOFF[dtype] * scale
        assert ours <= bound, (f"{what}: error {ours:.3e} vs float64 (norm {scale:.3e}) > {bound:.3e}, from PyTorch "
                               f"float32's {torchs:.3e}; relative error {rel_error(got, want):.3e} vs the reference "
                               f"> {TOLERANCES[dtype]:.0e}")

    assert_close(out, ref_out, lambda result: result[0], "output")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is None:
            continue
        assert_close(g, rg, lambda result, i=i: result[1][i], f"grad of argument {i}")


def bitwise_equal_across_thread_counts(run, counts=(1, 2, 3), repeats=2):
    """run() under each thread count (`repeats` times each): every result bitwise equal to the first."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            for _ in range(repeats):
                results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---- the instance-norm ops on the compiled CPU backend against the reference (public op) ---------------------------


def tail_call(op, args):
    """op: "lrelu" (instance_norm_lrelu) or a block-tail variant (instance_norm_add_lrelu, flat args)."""
    from .samples import IN_EPS, SLOPE

    if op == "lrelu":
        return uk.instance_norm_lrelu(args[0], SLOPE, IN_EPS)
    return block_tail(args)


def public_name(op):
    return "instance_norm_lrelu" if op == "lrelu" else "instance_norm_add_lrelu"


def run_instance_norm(op, args, backend, grad_out):
    with uk.use_backend(backend):
        out = tail_call(op, args)
    grads = torch.autograd.grad(out, args, grad_out.to(out.dtype))
    return out, list(grads)


def check_instance_norm(op, args, dtype):
    """The compiled CPU backend in `dtype` vs the reference in float32/64 from the same rounded inputs, under
    assert_close_flash; the output keeps z's memory format; each gradient has its argument's dtype and shape."""
    fast = upcast(args, dtype)
    grad_out = torch.randn(args[0].shape, dtype=torch.float64).to(dtype)
    out, grads = run_instance_norm(op, fast, "cpu", grad_out)
    assert uk.backend_report()["last_used"][f"{public_name(op)}@cpu"] == "cpu"
    ref_out, ref_grads = run_instance_norm(op, upcast(fast, reference_dtype(dtype)), "reference", grad_out)
    cache = {}

    def exact():
        if "exact" not in cache:
            cache["exact"] = run_instance_norm(op, upcast(fast, torch.float64), "reference", grad_out)
        return cache["exact"]

    def same_dtype():
        if "same" not in cache:
            cache["same"] = run_instance_norm(op, upcast(fast, dtype), "reference", grad_out)
        return cache["same"]

    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_format(fast[0])), "the output keeps z's memory format"
    assert_close_flash(out, ref_out, dtype, f"{op} output", lambda: exact()[0], lambda: same_dtype()[0])
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == args[i].shape
        assert_close_flash(g, rg, dtype, f"{op} grad of argument {i}", lambda i=i: exact()[1][i],
                           lambda i=i: same_dtype()[1][i])


# ---- Triton kernels (interpreter on CPU, native on CUDA) against the reference ------------------------------------

F64 = torch.float64
# Unit roundoff of each storage dtype: the relative error of rounding a result to it once.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def triton_dev(args):
    return to_device(args, TRITON_DEVICE)


def grads_of(out, args, grad_out):
    wanted = [a for a in args if a is not None and a.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [next(grads) if a is not None and a.requires_grad else None for a in args]


def triton_check(fast_fn, ref_fn, args, dtype, what, grad_layout="contiguous"):
    """fast_fn on `args` rounded to `dtype` vs ref_fn in float64 (float32 kernels) or float32 (half kernels) from
    the same rounded inputs; forward and the gradient of every tensor argument."""
    ref_dtype = F64 if dtype == torch.float32 else torch.float32
    fast_args = triton_dev(upcast(args, dtype))
    ref_args = upcast(fast_args, ref_dtype)
    out = fast_fn(*fast_args)
    ref = ref_fn(*ref_args)
    assert out.dtype == dtype and out.device.type == TRITON_DEVICE
    assert_close_rel(out, ref, dtype, f"{what} output")
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d) if grad_layout != "contiguous" else grad_out
    grad_out = grad_out.to(TRITON_DEVICE)
    grads = grads_of(out, fast_args, grad_out)
    ref_grads = grads_of(ref, ref_args, grad_out.to(ref_dtype))
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is not None:
            assert g is not None, f"{what}: no gradient for argument {i}"
            assert_close_rel(g, rg, dtype, f"{what} grad of argument {i}")
    return out


def triton_check_flash(fast_fn, ref_fn, args, dtype, what, grad_layout=None):
    """The flash-attention rule: fast_fn on `args` rounded to `dtype`, and PyTorch (ref_fn) in `dtype`, against a
    float64 truth (ref_fn in float64) from the same rounded inputs; the output and every gradient must be
    within 2x PyTorch's own error plus one unit roundoff of `dtype`, and within the dtype's tolerance (PyTorch
    itself can be far off: a constant channel in float32). Returns the kernel's output."""
    fast_args = triton_dev(upcast(args, dtype))
    torch_args = upcast(fast_args, dtype)
    truth_args = upcast(fast_args, F64)
    out = fast_fn(*fast_args)
    assert out.dtype == dtype and out.device.type == TRITON_DEVICE
    grad_out = torch.randn(out.shape, dtype=F64).to(dtype).to(TRITON_DEVICE)
    if grad_layout is not None:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d if grad_layout == "channels_last_3d"
                                       else torch.contiguous_format)
    results = {}
    for name, fn, fn_args in (("kernel", fast_fn, fast_args), ("torch", ref_fn, torch_args),
                              ("truth", ref_fn, truth_args)):
        value = out if name == "kernel" else fn(*fn_args)
        results[name] = [value] + grads_of(value, fn_args, grad_out.to(value.dtype))
    for i, (got, torchs, truth) in enumerate(zip(results["kernel"], results["torch"], results["truth"])):
        part = "output" if i == 0 else f"grad of argument {i - 1}"
        assert got is not None and got.shape == truth.shape, f"{what}: {part} missing or misshapen"
        ours, theirs = rel_error(got, truth), rel_error(torchs, truth)
        bound = min(2 * theirs + UNIT_ROUNDOFF[dtype], TOLERANCES[dtype])
        assert ours <= bound, (f"{what} {part}: error {ours:.2e} vs float64, PyTorch {dtype}'s {theirs:.2e}: "
                               f"> min(2x + u, {TOLERANCES[dtype]:.0e})")
    return out


TRITON_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


# ---- non-finite values: kernel vs the float64 reference ----------------------------------------------------------
# NaN and Inf in x or in a weight: the CPU kernels' outputs and gradients are non-finite at exactly the positions
# where the float64 reference's are (docs/ARCHITECTURE.md, "Numerics the kernels guarantee"), and match it elsewhere.
# Positions cover the borders (where dwconv3d's zero padding meets a non-finite tap) and the interior.

# (value, dtype, layout): each value, dtype and layout at least once.
NON_FINITE_COMBOS = [(float("nan"), torch.float32, "contiguous"), (float("inf"), torch.bfloat16, "channels_last_3d"),
                     (-float("inf"), torch.float64, "contiguous"), (float("inf"), torch.float32, "channels_last_3d")]
NON_FINITE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def non_finite_cases(make):
    """(argument name, value, dtype, layout) for every argument of make(dtype, layout) (a dict) and every combo."""
    return [(name, *combo) for name in make(torch.float32, "contiguous") for combo in NON_FINITE_COMBOS]


def _named_forward_and_grads(fn, inputs, grad_out, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in inputs.items()}
    out = fn(leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(dtype))
    return [("out", out.detach())] + [(f"grad_{k}", g) for k, g in zip(leaves, grads)]


def _positions(t):
    """Flat indices to poison: the first and last element and one in the middle (borders and interior)."""
    return sorted({0, t.numel() // 2 + 1, t.numel() - 1})


def check_non_finite(op, make, kernel, ref, name, value, dtype, layout):
    """`value` at each of _positions of argument `name`: kernel and float64 reference non-finite at the same
    positions of the output and every gradient, and the finite values close."""
    checked = 0
    for position in _positions(make(dtype, layout)[name]):
        inputs = make(dtype, layout)
        poisoned = inputs[name].detach().contiguous()
        poisoned.view(-1)[position] = value
        inputs[name] = to_layout(poisoned, layout) if poisoned.dim() == 5 else poisoned
        grad_out = torch.randn(inputs[next(iter(inputs))].shape, dtype=torch.float64).to(dtype)
        got = _named_forward_and_grads(kernel, inputs, grad_out, dtype)
        want = _named_forward_and_grads(ref, inputs, grad_out, torch.float64)
        for (what, g), (_, w) in zip(got, want):
            tag = f"{op}: {name}[{position}] = {value}: {what}"
            finite = torch.isfinite(w)
            assert torch.equal(torch.isfinite(g), finite), (
                f"{tag}: non-finite at {int((~torch.isfinite(g)).sum())} positions, reference at "
                f"{int((~finite).sum())}")
            if finite.any():
                err = (g.double()[finite] - w[finite]).norm() / w[finite].norm().clamp_min(1e-30)
                assert err <= NON_FINITE_TOL[dtype], f"{tag}: finite values off by {err:.2e}"
            checked += 1
    assert checked >= 3 * 2  # every position, forward and at least one gradient
