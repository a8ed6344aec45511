"""The ISA variants of the CPU kernels (csrc/cpu/simd): the UXNET_CPU_ISA knob, what `uxnet info` reports, and the
strongest check of the AVX-512 emulation: where this machine also runs real AVX-512, both variants must give
bitwise-identical results (same 16-lane code, explicit FMAs, no compiler contraction)."""

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

import uxnet_kernels  # noqa: F401  (loads _C and registers autograd)
from uxnet_kernels import cpu_isa, reference

EPS = 1e-6
SLOPE = 0.01  # the decoder's LeakyReLU


@pytest.fixture(autouse=True)
def _compiled():
    require_compiled("cpu")


def _ln_args(shape, dtype, layout):
    c = shape[1]
    x = to_layout((torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7).to(dtype), layout)
    return x, (1 + 0.5 * torch.randn(c, dtype=torch.float64)).to(dtype), (0.5 * torch.randn(c)).to(dtype)


def _mlp_args(shape, dtype, layout):
    c = shape[1]

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, dtype=torch.float64)).to(dtype)

    y, res = to_layout(r(*shape), layout), to_layout(r(*shape), layout)
    return [y, res, 1 + r(c, scale=0.5), r(c, scale=0.5), r(c, 4), r(c, 4, scale=0.5), r(c, 4, scale=0.5),
            r(c, scale=0.5), r(c)]


def _inputs(op, shape, dtype, layout, seed):
    """The seeded inputs of one case of `op` (forward arguments and grad_out)."""
    torch.manual_seed(seed)
    if op == "dwconv3d":
        c = shape[1]
        x = to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
        w = (0.2 * torch.randn(c, 1, 7, 5, 3, dtype=torch.float64)).to(dtype)
        b = torch.randn(c, dtype=torch.float64).to(dtype)
        return [x, w, b], to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
    if op == "conv3d_3x3x3":  # C_out = C_in + 4: other partial channel vectors on the output side
        n, c = shape[:2]
        x = to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
        w = (torch.randn(c + 4, c, 3, 3, 3, dtype=torch.float64) / (27 * c) ** 0.5).to(dtype)
        b = torch.randn(c + 4, dtype=torch.float64).to(dtype)
        return [x, w, b], to_layout(torch.randn(n, c + 4, *shape[2:], dtype=torch.float64).to(dtype), layout)
    if op in ("instance_norm_lrelu", "instance_norm_add_lrelu"):
        n, c = shape[:2]
        z = to_layout((torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7).to(dtype), layout)
        if op == "instance_norm_lrelu":
            args = [z]
        else:  # a two-input projection shortcut (the split up block's conv3)
            xs = [to_layout(torch.randn(n, ci, *shape[2:], dtype=torch.float64).to(dtype), layout) for ci in (5, 3)]
            ws = [(0.4 * torch.randn(c, ci, 1, 1, 1, dtype=torch.float64)).to(dtype) for ci in (5, 3)]
            args = [z, xs, ws]
        return args, to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
    args = list(_ln_args(shape, dtype, layout)) if op == "layer_norm" else _mlp_args(shape, dtype, layout)
    return args, torch.randn(shape, dtype=torch.float64).to(dtype)


def _run(op, args, g):
    """Every output and gradient of `op` through the raw forward and backward ops."""
    ops = torch.ops.uxnet
    if op == "dwconv3d":
        x, w, b = args
        return [ops.dwconv3d(x, w, b), *ops.dwconv3d_backward(g, x, w, [True, True, True])]
    if op == "conv3d_3x3x3":
        x, w, b = args
        return [ops.conv3d_3x3x3(x, w, b), *ops.conv3d_3x3x3_backward(g, x, w, [True, True, True])]
    if op == "layer_norm":
        x, w, b = args
        out, mean, rstd = ops.layer_norm_channels_first(x, w, b, EPS)
        return [out, mean, rstd, *ops.layer_norm_channels_first_backward(g, x, w, mean, rstd, [True, True, True])]
    if op == "instance_norm_lrelu":
        out, mean, rstd = ops.instance_norm_lrelu(args[0], SLOPE, EPS)
        return [out, mean, rstd, ops.instance_norm_lrelu_backward(g, out, rstd, SLOPE)]
    if op == "instance_norm_add_lrelu":
        z, xs, ws = args
        out, mean, rstd, s_mean, s_rstd = ops.instance_norm_add_lrelu(z, None, xs, ws, SLOPE, EPS)
        grad_z, _, grad_xs, grad_ws = ops.instance_norm_add_lrelu_backward(g, out, None, xs, ws, rstd, s_mean, s_rstd,
                                                                          SLOPE)
        return [out, mean, rstd, s_mean, s_rstd, grad_z, *grad_xs, *grad_ws]
    out, mean, rstd = ops.ux_mlp(*args, EPS)
    return [out, mean, rstd, *ops.ux_mlp_backward(g, args[0], *args[2:], mean, rstd)]


def _all_outputs(op, shape, dtype, layout, seed):
    return _run(op, *_inputs(op, shape, dtype, layout, seed))


def _bits(t):
    """The bytes of t (NaN and signed zeros compared exactly)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


# Shapes that reach the 16-lane tails: C = 13, 19 and 33 leave partial channel vectors of 13, 3 and 1 lanes; W = 16
# and 37 give W register blocks of 16 and 13; odd voxel counts leave partial voxel vectors and tiles.
BITWISE_CASES = [
    (op, shape, dtype, layout)
    for op in ("dwconv3d", "layer_norm", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu", "conv3d_3x3x3")
    for shape in ((2, 13, 3, 5, 16), (1, 19, 4, 3, 37), (1, 33, 2, 7, 9))
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
    for layout in ("contiguous", "channels_last_3d")
]


@pytest.mark.parametrize("op, shape, dtype, layout", BITWISE_CASES, ids=str)
def test_avx512_and_emulation_are_bitwise_identical(op, shape, dtype, layout):
    for name in ("avx512", "avx512-emulated"):
        why = cpu_isa_unavailable(name)
        if why is not None:
            pytest.skip(f"needs a CPU with AVX-512 to compare with the emulation ({why})")
    results = {}
    for name in ("avx512", "avx512-emulated"):
        with use_cpu_isa(name):
            results[name] = _all_outputs(op, shape, dtype, layout, seed=1234)
    for i, (real, emulated) in enumerate(zip(results["avx512"], results["avx512-emulated"])):
        assert real.dtype == emulated.dtype and real.shape == emulated.shape and real.stride() == emulated.stride()
        assert torch.equal(_bits(real), _bits(emulated)), (
            f"{op} output {i}: avx512 and avx512-emulated differ by up to "
            f"{(real.double() - emulated.double()).abs().max().item():.3e}")


@pytest.mark.parametrize("name", CPU_ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_every_variant_matches_the_reference(name, layout):
    """LayerNorm and UX MLP forward + backward on each variant (dwconv3d, conv3d_3x3x3: the `isa` fixture of their
    tests in tests/ops/)."""
    why = cpu_isa_unavailable(name)
    if why is not None:
        pytest.skip(f"this machine cannot run the variant ({why})")
    shape = (2, 19, 3, 4, 7)  # C = 19: a whole vector plus a partial one on every width; 84 voxels: partial tiles
    x, w, b = _ln_args(shape, torch.float32, layout)
    args = _mlp_args(shape, torch.float32, layout)
    grad = torch.randn(shape)
    with use_cpu_isa(name):
        fast = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = torch.ops.uxnet.layer_norm_channels_first(*fast, EPS)[0]
        got = [out, *torch.autograd.grad(out, fast, grad)]
        fast_mlp = [t.detach().clone().requires_grad_() for t in args]
        out_mlp = torch.ops.uxnet.ux_mlp(*fast_mlp, EPS)[0]
        got_mlp = [out_mlp, *torch.autograd.grad(out_mlp, fast_mlp, grad)]
    slow = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference.layer_norm_channels_first(*slow, EPS)
    want = [ref, *torch.autograd.grad(ref, slow, grad.double())]
    slow_mlp = [t.detach().double().requires_grad_() for t in args]
    ref_mlp = reference.ux_mlp(*slow_mlp, EPS)
    want_mlp = [ref_mlp, *torch.autograd.grad(ref_mlp, slow_mlp, grad.double())]
    for i, (g, r) in enumerate(zip(got + got_mlp, want + want_mlp)):
        assert_close_rel(g, r, reference_dtype(torch.float32), f"{name} output/grad {i}")


@pytest.mark.parametrize("op", ["dwconv3d", "layer_norm", "ux_mlp", "conv3d_3x3x3"])
def test_unknown_variant_is_a_clear_error_naming_the_op(op):
    with use_cpu_isa("avx1024"):
        with pytest.raises(RuntimeError, match=r"uxnet::\w+: uxnet CPU kernels: UXNET_CPU_ISA must be one of auto, "
                                               r"generic, avx2, avx512, avx512-emulated; got 'avx1024'"):
            _all_outputs(op, (1, 3, 2, 2, 2), torch.float32, "contiguous", seed=0)


def test_unavailable_variant_is_a_clear_error():
    missing = [name for name in CPU_ISAS if cpu_isa_unavailable(name) is not None]
    if not missing:
        pytest.skip("this machine runs every variant")
    with use_cpu_isa(missing[0]):
        with pytest.raises(RuntimeError, match=f"UXNET_CPU_ISA={missing[0]} is not available here"):
            _all_outputs("layer_norm", (1, 3, 2, 2, 2), torch.float32, "contiguous", seed=0)


def test_report_lists_selected_and_available_variants():
    rep = cpu_isa.report()
    assert set(rep) == {"requested", "selected", "error", "available", "unavailable"}
    assert "generic" in rep["available"]
    assert sorted(rep["available"] + [line.split(":")[0] for line in rep["unavailable"]]) == sorted(CPU_ISAS)
    for name in rep["available"]:
        with use_cpu_isa(name):
            assert cpu_isa.report()["selected"] == name
    with use_cpu_isa("auto"):
        best = cpu_isa.report()["selected"]
        assert best in rep["available"] and best != "avx512-emulated"
    with use_cpu_isa("nope"):
        bad = cpu_isa.report()
        assert bad["selected"] == "" and "UXNET_CPU_ISA must be one of" in bad["error"]


def test_uxnet_info_shows_the_kernel_isa(capsys):
    from uxnet import cli

    with use_cpu_isa("generic"):
        assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "cpu kernels: ISA generic (UXNET_CPU_ISA=generic); available: generic" in text


def test_concurrent_python_threads_give_bitwise_identical_results():
    """Four Python threads calling every op (forward and backward) at once get the bits of a lone call."""
    import concurrent.futures

    cases = [(op, (2, 19, 3, 5, 16), torch.float32, layout)
             for op in ("dwconv3d", "layer_norm", "ux_mlp", "conv3d_3x3x3")
             for layout in ("contiguous", "channels_last_3d")]
    inputs = [_inputs(*case, seed=99) for case in cases]
    alone = [[_bits(t) for t in _run(case[0], *inp)] for case, inp in zip(cases, inputs)]

    def work(_):
        return [[_bits(t) for t in _run(case[0], *inp)] for case, inp in zip(cases, inputs)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(8)))
    for got in results:
        for case, want_case, got_case in zip(cases, alone, got):
            for i, (want, have) in enumerate(zip(want_case, got_case)):
                assert torch.equal(want, have), f"{case} output {i} differs between a lone call and a concurrent one"
