"""The Triton kernels against the reference ops: forward and every gradient, per kernel size, layout and dtype.

Without CUDA the kernels run under the Triton interpreter on CPU tensors at small shapes (this module sets
TRITON_INTERPRET=1 at import, see _import_ops); with CUDA the same tests run natively at larger shapes. Every buffer a kernel writes is NaN-poisoned first (UXNET_POISON_OUTPUTS=1), and every
element is compared (NaN anywhere fails ``rel_error``).
"""

import importlib
import importlib.util
import os

import pytest
import torch

from conftest import TOLERANCES, assert_close_rel, randn, rel_error
from op_cases import dwconv3d_args, layer_norm_args, upcast, ux_mlp_args

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _import_ops():
    if not ON_GPU:
        # Kept for the rest of the session: triton reads it both when kernels are decorated and lazily at launch
        # (restoring it after the import breaks the interpreter). Nothing else runs Triton on CPU: backend "auto"
        # never picks "triton" for CPU tensors, and TorchInductor's CPU code generation does not use Triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return importlib.import_module("uxnet_kernels.triton.ops")


ops = _import_ops()

# Interpreter shapes are tiny (each Triton op runs at Python speed, once per program); GPU shapes are not.
SHAPE = (2, 24, 12, 10, 14) if ON_GPU else (2, 4, 6, 5, 7)
LAYOUTS = ["contiguous", "channels_last_3d"]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison_and_mode(monkeypatch):
    if not ON_GPU and not ops.INTERPRETED:
        pytest.fail("uxnet_kernels.triton kernels were imported without TRITON_INTERPRET=1 before this module; "
                    "on a machine without CUDA they cannot run")
    monkeypatch.setenv("UXNET_POISON_OUTPUTS", "1")
    yield


def _dev(args):
    return [None if a is None else a.detach().to(DEVICE).requires_grad_(a.requires_grad) for a in args]


def _grads(out, args, grad_out):
    wanted = [a for a in args if a is not None and a.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [next(grads) if a is not None and a.requires_grad else None for a in args]


def _check(fast_fn, ref_fn, args, dtype, what, grad_layout="contiguous"):
    """fast_fn on `args` rounded to `dtype` vs ref_fn in float64 (float32 kernels) or float32 (half kernels) from
    the same rounded inputs; forward and the gradient of every tensor argument."""
    ref_dtype = F64 if dtype == torch.float32 else torch.float32
    fast_args = _dev(upcast(args, dtype))
    ref_args = upcast(fast_args, ref_dtype)
    out = fast_fn(*fast_args)
    ref = ref_fn(*ref_args)
    assert out.dtype == dtype and out.device.type == DEVICE
    assert_close_rel(out, ref, dtype, f"{what} output")
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d) if grad_layout != "contiguous" else grad_out
    grad_out = grad_out.to(DEVICE)
    grads = _grads(out, fast_args, grad_out)
    ref_grads = _grads(ref, ref_args, grad_out.to(ref_dtype))
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if rg is not None:
            assert g is not None, f"{what}: no gradient for argument {i}"
            assert_close_rel(g, rg, dtype, f"{what} grad of argument {i}")
    return out


def _dwconv(x, w, b):
    return torch.ops.uxnet.dwconv3d_triton(x, w, b)


def _dwconv_ref(x, w, b):
    return torch.nn.functional.conv3d(x, w, b, padding=tuple(k // 2 for k in w.shape[2:]), groups=x.shape[1])


def _ln(x, w, b):
    return torch.ops.uxnet.layer_norm_cf_triton(x, w, b, 1e-6)[0]


def _ln_ref(x, w, b):
    from uxnet_kernels import reference

    return reference.layer_norm_channels_first(x, w, b, 1e-6)


def _mlp_args(shape, dtype=torch.float32, layout="contiguous", residual=True, gamma=True):
    """ux_mlp inputs with w1, b1, w2 in the backend's canonical (C, 4) shape."""
    y, res, ln_w, ln_b, w1, b1, w2, b2, g = ux_mlp_args(shape, dtype, layout, residual, gamma, grad=True)
    c = shape[1]
    return [y, res, ln_w, ln_b] + [t.detach().reshape(c, 4).requires_grad_(True) for t in (w1, b1, w2)] + [b2, g]


def _mlp(*args):
    return torch.ops.uxnet.ux_mlp_triton(*args, 1e-6)[0]


def _mlp_ref(*args):
    from uxnet_kernels import reference

    return reference.ux_mlp(*args, 1e-6)


# ---- dwconv3d ----------------------------------------------------------------------------------------------------

DW_CASES = [  # (kernel, layout): k = 7 once (the interpreter's cost grows with k^2 per program)
    ((3, 3, 3), "contiguous"),
    ((3, 3, 3), "channels_last_3d"),
    ((5, 3, 7), "contiguous"),
    ((5, 3, 7), "channels_last_3d"),
    ((7, 7, 7), "channels_last_3d"),
]
if ON_GPU:
    DW_CASES += [((7, 7, 7), "contiguous"), ((13, 13, 13), "channels_last_3d"), ((21, 21, 21), "channels_last_3d")]


@pytest.mark.parametrize("kernel,layout", DW_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_dwconv3d_float32(kernel, layout):
    args = dwconv3d_args(SHAPE, kernel, layout=layout, grad=True)
    out = _check(_dwconv, _dwconv_ref, args, torch.float32, f"dwconv3d {kernel} {layout}")
    expected = layout == "channels_last_3d"
    assert ops._is_channels_last(out) == expected, "output must keep the input's memory format"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dwconv3d_half(dtype):
    args = dwconv3d_args(SHAPE, (3, 3, 3), layout="channels_last_3d", grad=True)
    _check(_dwconv, _dwconv_ref, args, dtype, f"dwconv3d {dtype}")


def test_dwconv3d_no_bias_and_grad_out_in_other_layout():
    args = dwconv3d_args(SHAPE, (3, 3, 5), layout="contiguous", bias=False, grad=True)
    _check(_dwconv, _dwconv_ref, args, torch.float32, "dwconv3d no bias", grad_layout="channels_last_3d")


def test_dwconv3d_odd_strides_and_channel_blocks(monkeypatch):
    """Input that is neither contiguous nor channels_last_3d; more channels than one block; tiles that do not
    divide the volume; several tiles per grad-weight chunk and several width chunks."""
    if not ON_GPU:
        monkeypatch.setattr(ops, "_INTERPRETER_FWD_TILE", 512)
        monkeypatch.setattr(ops, "_INTERPRETER_GRAD_WEIGHT_TILE", 8192)
        monkeypatch.setenv("UXNET_TRITON_KW_CHUNK", "2")
    monkeypatch.setattr(ops, "_TARGET_PROGRAMS", 12)
    shape = (1, 20, 3, 5, 11)  # KH = 1 below: Triton specialises an int argument of 1 to a constant
    x, w, b = dwconv3d_args(shape, (3, 1, 5), grad=True)
    x = x.detach().permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3).requires_grad_(True)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    _check(_dwconv, _dwconv_ref, [x, w, b], torch.float32, "dwconv3d odd strides")


def test_dwconv3d_backward_output_mask():
    x, w, _ = _dev(dwconv3d_args(SHAPE, (3, 3, 3)))
    g = torch.randn_like(x)
    full = torch.ops.uxnet.dwconv3d_triton_backward(g, x, w, [True, True, True])
    grad_x, grad_w, grad_b = torch.ops.uxnet.dwconv3d_triton_backward(g, x, w, [False, True, False])
    assert grad_x.shape == (0,) and grad_b.shape == (0,)
    assert torch.equal(grad_w, full[1])
    assert full[0].shape == x.shape and full[1].shape == w.shape and full[2].shape == (x.shape[1],)


def test_dwconv3d_grad_weight_is_deterministic():
    x, w, _ = _dev(dwconv3d_args(SHAPE, (3, 3, 3), layout="channels_last_3d"))
    g = torch.randn_like(x)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.ops.uxnet.dwconv3d_triton_backward(g, x, w, [False, True, True])
        second = torch.ops.uxnet.dwconv3d_triton_backward(g, x, w, [False, True, True])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


# ---- layer_norm_cf -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_float32(layout):
    args = layer_norm_args(SHAPE, layout=layout, grad=True)
    _check(_ln, _ln_ref, args, torch.float32, f"layer_norm_cf {layout}")
    x, w, b = _dev(args)
    _, mean, rstd = torch.ops.uxnet.layer_norm_cf_triton(x, w, b, 1e-6)
    x64 = x.detach().cpu().double()
    assert mean.dtype == torch.float32 and mean.shape == (SHAPE[0],) + SHAPE[2:]
    assert_close_rel(mean.cpu(), x64.mean(1), torch.float32, "mean")
    assert_close_rel(rstd.cpu(), (x64.var(1, unbiased=False) + 1e-6).rsqrt(), torch.float32, "rstd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_half(dtype):
    shape = (2, 5) + SHAPE[2:]  # a channel count that is not a power of two
    _check(_ln, _ln_ref, layer_norm_args(shape, layout="channels_last_3d", grad=True), dtype, f"layer_norm {dtype}")


def test_layer_norm_backward_output_mask():
    x, w, b = _dev(layer_norm_args(SHAPE))
    _, mean, rstd = torch.ops.uxnet.layer_norm_cf_triton(x, w, b, 1e-6)
    g = torch.randn_like(x)
    full = torch.ops.uxnet.layer_norm_cf_triton_backward(g, x, w, mean, rstd, [True, True, True])
    part = torch.ops.uxnet.layer_norm_cf_triton_backward(g, x, w, mean, rstd, [False, False, True])
    assert part[0].shape == (0,) and part[1].shape == (0,)
    assert torch.equal(part[2], full[2])


# ---- ux_mlp ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual,gamma", [(True, True), (False, False)], ids=["res-gamma", "plain"])
def test_ux_mlp_float32(layout, residual, gamma):
    args = _mlp_args(SHAPE, layout=layout, residual=residual, gamma=gamma)
    _check(_mlp, _mlp_ref, args, torch.float32, f"ux_mlp {layout} residual={residual} gamma={gamma}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ux_mlp_half(dtype):
    shape = (2, 6) + SHAPE[2:]
    _check(_mlp, _mlp_ref, _mlp_args(shape, layout="channels_last_3d"), dtype, f"ux_mlp {dtype}")


def test_ux_mlp_residual_in_other_layout_and_stats():
    args = _mlp_args(SHAPE, layout="channels_last_3d")
    args[1] = args[1].detach().contiguous().requires_grad_(True)
    _check(_mlp, _mlp_ref, args, torch.float32, "ux_mlp mixed layouts")
    y = args[0].detach().to(DEVICE)
    _, mean, rstd = torch.ops.uxnet.ux_mlp_triton(*_dev(args), 1e-6)
    assert_close_rel(mean.cpu(), y.cpu().double().mean(1), torch.float32, "mean")
    assert_close_rel(rstd.cpu(), (y.cpu().double().var(1, unbiased=False) + 1e-6).rsqrt(), torch.float32, "rstd")


# ---- instance_norm_lrelu / instance_norm_add_lrelu ---------------------------------------------------------------

SLOPE, IN_EPS = 0.01, 1e-5
# 150 voxels per plane under the interpreter: with the tiles of _small_instance_tiles, several chunks per plane, a
# partial last tile and an empty tile in the last chunk, in both layouts (test_instance_norm_tiles_cross_chunks).
IN_SHAPE = (2, 24, 11, 12, 13) if ON_GPU else (2, 3, 5, 6, 5)
DTYPES = [torch.float32, torch.bfloat16]
# Unit roundoff of each storage dtype: the relative error of rounding a result to it once.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def _small_instance_tiles(monkeypatch):
    """Tiles of a few voxels and two tiles per reduction chunk, so the chunked statistics and sums are exercised."""
    monkeypatch.setattr(ops, "_INTERPRETER_INSTANCE_TILE", 32)
    monkeypatch.setattr(ops, "_INSTANCE_TILE", 256)
    monkeypatch.setattr(ops, "_INSTANCE_MAX_TILES", 2)
    monkeypatch.setattr(ops, "_INSTANCE_REDUCE_PROGRAMS", 1)


def _in_lrelu(x):
    return torch.ops.uxnet.instance_norm_lrelu_triton(x, SLOPE, IN_EPS)[0]


def _in_lrelu_ref(x):
    from uxnet_kernels import reference

    return reference.instance_norm_lrelu(x, SLOPE, IN_EPS)


def _in_add(variant):
    """(kernel, reference) over flat args: (z, residual) or (z, x_0, w_0[, x_1, w_1])."""
    from uxnet_kernels import reference

    def split(args):
        if variant == "residual":
            return args[0], args[1], [], []
        return args[0], None, list(args[1::2]), list(args[2::2])

    def fast(*args):
        return torch.ops.uxnet.instance_norm_add_lrelu_triton(*split(args), SLOPE, IN_EPS)[0]

    def ref(*args):
        return reference.instance_norm_add_lrelu(*split(args), SLOPE, IN_EPS)

    return fast, ref


def _in_add_args(variant, shape, layout, input_layouts=None):
    """Flat args of _in_add(variant): z, then the residual or shortcut (input, weight) pairs (channels 4 and 5)."""
    n, c, *spatial = shape
    args = [randn(shape, layout=layout, requires_grad=True)]
    if variant == "residual":
        return args + [randn(shape, layout=layout, requires_grad=True)]
    pairs = 1 if variant == "shortcut1" else 2
    layouts = input_layouts or [layout] * pairs
    for i in range(pairs):
        ci = 4 + i
        args.append(randn((n, ci, *spatial), layout=layouts[i], requires_grad=True))
        args.append(randn((c, ci, 1, 1, 1), scale=ci ** -0.5, requires_grad=True))
    return args


def _check_flash(fast_fn, ref_fn, args, dtype, what, grad_layout=None):
    """The flash-attention rule: fast_fn on `args` rounded to `dtype`, and PyTorch (ref_fn) in `dtype`, against a
    float64 truth (ref_fn in float64) from the same rounded inputs; the output and every gradient must be
    within 2x PyTorch's own error plus one unit roundoff of `dtype`, and within the dtype's tolerance (PyTorch
    itself can be far off: a constant channel in float32). Returns the kernel's output."""
    fast_args = _dev(upcast(args, dtype))
    torch_args = upcast(fast_args, dtype)
    truth_args = upcast(fast_args, F64)
    out = fast_fn(*fast_args)
    assert out.dtype == dtype and out.device.type == DEVICE
    grad_out = torch.randn(out.shape, dtype=F64).to(dtype).to(DEVICE)
    if grad_layout is not None:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d if grad_layout == "channels_last_3d"
                                       else torch.contiguous_format)
    results = {}
    for name, fn, fn_args in (("kernel", fast_fn, fast_args), ("torch", ref_fn, torch_args),
                              ("truth", ref_fn, truth_args)):
        value = out if name == "kernel" else fn(*fn_args)
        results[name] = [value] + _grads(value, fn_args, grad_out.to(value.dtype))
    for i, (got, torchs, truth) in enumerate(zip(results["kernel"], results["torch"], results["truth"])):
        part = "output" if i == 0 else f"grad of argument {i - 1}"
        assert got is not None and got.shape == truth.shape, f"{what}: {part} missing or misshapen"
        ours, theirs = rel_error(got, truth), rel_error(torchs, truth)
        bound = min(2 * theirs + UNIT_ROUNDOFF[dtype], TOLERANCES[dtype])
        assert ours <= bound, (f"{what} {part}: error {ours:.2e} vs float64, PyTorch {dtype}'s {theirs:.2e}: "
                               f"> min(2x + u, {TOLERANCES[dtype]:.0e})")
    return out


def _in_manual(x):
    """Float64 instance norm written out: also defined for single-voxel planes (F.instance_norm rejects those)."""
    mean = x.mean((2, 3, 4), keepdim=True)
    return (x - mean) / torch.sqrt(x.var((2, 3, 4), unbiased=False, keepdim=True) + IN_EPS)


def test_instance_norm_tiles_cross_chunks(_small_instance_tiles):
    """The tiling the tests below run with: several chunks per plane, a partial last tile, an empty tile."""
    for channels_last in (False, True):
        g = ops._instance_grid(IN_SHAPE, channels_last)
        assert g.chunks > 1 and g.tiles_per_chunk > 1, g
        assert g.voxels % g.block_v != 0 and g.tiles % g.tiles_per_chunk != 0, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_lrelu(layout, dtype, _small_instance_tiles):
    args = [randn(IN_SHAPE, layout=layout, scale=3.0, requires_grad=True)]
    args[0] = (args[0].detach() + 5.0).requires_grad_(True)  # a channel mean far from zero
    out = _check_flash(_in_lrelu, _in_lrelu_ref, args, dtype, f"instance_norm_lrelu {layout} {dtype}")
    assert ops._is_channels_last(out) == (layout == "channels_last_3d"), "output must keep the input's layout"
    if dtype == torch.float32:
        x = args[0].detach().to(DEVICE)
        _, mean, rstd = torch.ops.uxnet.instance_norm_lrelu_triton(x, SLOPE, IN_EPS)
        x64 = x.cpu().double()
        assert mean.dtype == torch.float32 and mean.shape == IN_SHAPE[:2]
        assert_close_rel(mean.cpu(), x64.mean((2, 3, 4)), torch.float32, "mean")
        assert_close_rel(rstd.cpu(), (x64.var((2, 3, 4), unbiased=False) + IN_EPS).rsqrt(), torch.float32, "rstd")


VARIANTS = ["residual", "shortcut1", "shortcut2"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_instance_norm_add_lrelu(variant, layout, dtype, _small_instance_tiles):
    fast, ref = _in_add(variant)
    args = _in_add_args(variant, IN_SHAPE, layout)
    out = _check_flash(fast, ref, args, dtype, f"instance_norm_add_lrelu {variant} {layout} {dtype}")
    assert ops._is_channels_last(out) == (layout == "channels_last_3d"), "output must keep z's layout"


def test_instance_norm_float16(_small_instance_tiles):
    _check_flash(_in_lrelu, _in_lrelu_ref, [randn(IN_SHAPE, layout="channels_last_3d", requires_grad=True)],
                 torch.float16, "instance_norm_lrelu float16")
    fast, ref = _in_add("shortcut2")
    _check_flash(fast, ref, _in_add_args("shortcut2", IN_SHAPE, "contiguous"), torch.float16,
                 "instance_norm_add_lrelu shortcut2 float16")


def test_instance_norm_add_lrelu_mixed_layouts(_small_instance_tiles):
    """z channels_last_3d, shortcut inputs one of each layout, grad_out contiguous; gradients keep each input's
    layout; the statistics of both norms."""
    fast, ref = _in_add("shortcut2")
    args = _in_add_args("shortcut2", IN_SHAPE, "channels_last_3d", ["contiguous", "channels_last_3d"])
    _check_flash(fast, ref, args, torch.float32, "instance_norm_add_lrelu mixed layouts", grad_layout="contiguous")
    z, x0, w0, x1, w1 = _dev(args)
    out, mean, rstd, s_mean, s_rstd = torch.ops.uxnet.instance_norm_add_lrelu_triton(z, None, [x0, x1], [w0, w1],
                                                                                      SLOPE, IN_EPS)
    grads = torch.autograd.grad(out, [z, x0, x1], torch.randn_like(out))
    assert [ops._is_channels_last(g) for g in grads] == [True, False, True]
    projected = (torch.nn.functional.conv3d(x0, w0) + torch.nn.functional.conv3d(x1, w1)).detach().cpu().double()
    assert_close_rel(s_mean.cpu(), projected.mean((2, 3, 4)), torch.float32, "shortcut mean")
    assert_close_rel(s_rstd.cpu(), (projected.var((2, 3, 4), unbiased=False) + IN_EPS).rsqrt(), torch.float32,
                     "shortcut rstd")
    assert_close_rel(mean.cpu(), z.detach().cpu().double().mean((2, 3, 4)), torch.float32, "mean")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_constant_channel(layout, _small_instance_tiles):
    """var = 0: the normalised values are exactly 0 (LeakyReLU's slope side in backward, as PyTorch's)."""
    x = randn(IN_SHAPE, layout=layout)
    x[:, 1] = 1.5
    out = _check_flash(_in_lrelu, _in_lrelu_ref, [x.requires_grad_(True)], torch.float32, "constant channel")
    assert torch.equal(out[:, 1].cpu(), torch.zeros_like(out[:, 1].cpu()))
    fast, ref = _in_add("shortcut1")
    args = _in_add_args("shortcut1", IN_SHAPE, layout)
    args[0] = x.detach().requires_grad_(True)
    args[2] = args[2].detach().clone()
    args[2][1] = 0.0  # the shortcut's channel 1 is constant (zero) too
    args[2].requires_grad_(True)
    _check_flash(fast, ref, args, torch.float32, "constant channel, shortcut")


@pytest.mark.parametrize("variant", ["plain"] + VARIANTS)
def test_instance_norm_single_voxel_planes(variant):
    """D = H = W = 1 (a 16^3 input's bottleneck): xhat = 0, so out = lrelu(r_hat) and grad_z = 0. F.instance_norm
    rejects such input, so the truth is the normalisation written out in float64."""
    shape = (2, 3, 1, 1, 1)
    if variant == "plain":
        args, fast = [randn(shape, requires_grad=True)], _in_lrelu
    else:
        args, fast = _in_add_args(variant, shape, "contiguous"), _in_add(variant)[0]

    def truth(*a):
        r = a[1] if variant == "residual" else 0.0 if variant == "plain" else _in_manual(
            sum(torch.nn.functional.conv3d(x, w) for x, w in zip(a[1::2], a[2::2])))
        return torch.nn.functional.leaky_relu(_in_manual(a[0]) + r, SLOPE)

    fast_args = _dev(args)
    truth_args = upcast(fast_args, F64)
    out = fast(*fast_args)
    want = truth(*truth_args)
    assert_close_rel(out, want, torch.float32, f"single voxel {variant} output")
    grad_out = torch.randn(out.shape, dtype=F64).float().to(DEVICE)
    grads = _grads(out, fast_args, grad_out)
    for i, (g, w) in enumerate(zip(grads, _grads(want, truth_args, grad_out.double()))):
        assert_close_rel(g, w, torch.float32, f"single voxel {variant} grad of argument {i}")
    if variant != "residual":  # out = lrelu(0): s = 0 exactly (with a residual s = r only up to out / slope)
        assert torch.equal(grads[0].cpu(), torch.zeros(shape)), "grad_z must be exactly 0"


def test_instance_norm_non_finite_propagation(_small_instance_tiles):
    """NaN / inf in one plane make that plane's output NaN, and a NaN in grad_out that plane's gradient, exactly
    where the reference has them; other planes are unaffected."""
    x = randn(IN_SHAPE, layout="channels_last_3d")
    x[0, 1, 2, 3, 1] = float("nan")
    x[1, 2, 0, 0, 0] = float("inf")
    x = x.to(DEVICE).requires_grad_(True)
    out = _in_lrelu(x)
    ref = _in_lrelu_ref(x.detach().cpu().double().requires_grad_(True))
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)) and torch.isnan(out[0, 1]).all()
    finite = torch.isfinite(ref)
    assert_close_rel(out.cpu()[finite], ref.detach()[finite], torch.float32, "finite planes")

    z = randn(IN_SHAPE).to(DEVICE).requires_grad_(True)
    r = randn(IN_SHAPE).to(DEVICE).requires_grad_(True)
    out = torch.ops.uxnet.instance_norm_add_lrelu_triton(z, r, [], [], SLOPE, IN_EPS)[0]
    grad_out = torch.randn_like(out)
    grad_out[1, 0, 4, 5, 4] = float("nan")
    gz, gr = torch.autograd.grad(out, [z, r], grad_out)
    z64, r64 = (t.detach().cpu().double().requires_grad_(True) for t in (z, r))
    ref = _in_add("residual")[1](z64, r64)
    rgz, rgr = torch.autograd.grad(ref, [z64, r64], grad_out.cpu().double())
    assert torch.equal(torch.isnan(gz).cpu(), torch.isnan(rgz)) and torch.isnan(gz[1, 0]).all()
    assert torch.equal(torch.isnan(gr).cpu(), torch.isnan(rgr)) and torch.isnan(gr).sum() == 1

    xs = [randn((2, 4) + IN_SHAPE[2:]).to(DEVICE)]
    xs[0][1, 3, 1, 1, 1] = float("nan")  # every output channel of item 1 sees it through the shortcut
    ws = [randn((IN_SHAPE[1], 4, 1, 1, 1)).to(DEVICE)]
    out = torch.ops.uxnet.instance_norm_add_lrelu_triton(z.detach(), None, xs, ws, SLOPE, IN_EPS)[0]
    ref = _in_add("shortcut1")[1](z.detach().cpu().double(), xs[0].cpu().double(), ws[0].cpu().double())
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)) and torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all()


def test_instance_norm_empty_and_backward_conventions():
    """Empty input: empty output and NaN statistics (as the compiled ops); unused residual outputs are (0,)."""
    empty = torch.randn(2, 3, 0, 4, 4, device=DEVICE)
    out, mean, rstd = torch.ops.uxnet.instance_norm_lrelu_triton(empty, SLOPE, IN_EPS)
    assert out.shape == empty.shape and mean.shape == (2, 3) and torch.isnan(mean).all() and torch.isnan(rstd).all()
    z, r = (randn(IN_SHAPE).to(DEVICE) for _ in range(2))
    out, mean, rstd, s_mean, s_rstd = torch.ops.uxnet.instance_norm_add_lrelu_triton(z, r, [], [], SLOPE, IN_EPS)
    assert s_mean.shape == (0,) and s_rstd.shape == (0,) and mean.shape == IN_SHAPE[:2]
    g = torch.randn_like(out)
    grad_z, grad_r, grad_xs, grad_ws = torch.ops.uxnet.instance_norm_add_lrelu_triton_backward(
        g, out, r, [], [], rstd, s_mean, s_rstd, SLOPE)
    assert grad_z.shape == z.shape and grad_r.shape == z.shape and grad_xs == [] and grad_ws == []
    again = torch.ops.uxnet.instance_norm_add_lrelu_triton_backward(g, out, r, [], [], rstd, s_mean, s_rstd, SLOPE)
    assert torch.equal(again[0], grad_z) and torch.equal(again[1], grad_r), "backward must be deterministic"


# ---- ops layer and backend ---------------------------------------------------------------------------------------


def test_poisoning_fills_new_buffers_with_nan():
    assert torch.isnan(ops._new(torch.empty(7))).all()
    assert torch.isnan(ops._empty_like_layout(torch.zeros(1, 2, 3, 4, 5), True)).all()


def test_opcheck_schema_fake_and_autograd_registration():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    small = (2, 3, 4, 5, 6)
    x, w, b = _dev(dwconv3d_args(small, (3, 5, 3), layout="channels_last_3d", grad=True))
    torch.library.opcheck(torch.ops.uxnet.dwconv3d_triton.default, (x, w, b), test_utils=tests)
    torch.library.opcheck(torch.ops.uxnet.dwconv3d_triton_backward.default,
                          (torch.randn_like(x), x.detach(), w.detach(), [True, False, True]), test_utils=tests)
    x, w, b = _dev(layer_norm_args(small, grad=True))
    torch.library.opcheck(torch.ops.uxnet.layer_norm_cf_triton.default, (x, w, b, 1e-6), test_utils=tests)
    args = _dev(_mlp_args(small, layout="channels_last_3d"))
    torch.library.opcheck(torch.ops.uxnet.ux_mlp_triton.default, (*args, 1e-6), test_utils=tests)
    _, mean, rstd = torch.ops.uxnet.ux_mlp_triton(*args, 1e-6)
    bwd_args = [torch.randn_like(args[0])] + [a.detach() for a in args[:1] + args[2:]] + [mean, rstd]
    torch.library.opcheck(torch.ops.uxnet.ux_mlp_triton_backward.default, tuple(bwd_args), test_utils=tests)


def test_backend_dispatch_and_report():
    import uxnet_kernels as uk
    from uxnet_kernels import dispatch, reference

    backend = dispatch.get_backend_instance("triton")
    assert backend.available() == (True, "")
    probe = torch.empty(1, 1, 1, 1, 1, device=DEVICE)
    assert backend.supports("dwconv3d", probe) == (True, "")
    ok, why = backend.supports("dwconv3d", probe.double())
    assert not ok and "float64" in why
    x, w, b = _dev(dwconv3d_args(SHAPE, (3, 3, 3)))
    with uk.use_backend("triton"):
        out = uk.dwconv3d(x, w, b)
    assert uk.backend_report()["last_used"][f"dwconv3d@{DEVICE}"] == "triton"
    assert_close_rel(out.cpu(), reference.dwconv3d(x.cpu().double(), w.cpu().double(), b.cpu().double()),
                     torch.float32, "dwconv3d through use_backend('triton')")


def test_instance_norm_opcheck():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    small = (2, 3, 4, 5, 6)
    for layout in LAYOUTS:
        x = _dev([randn(small, layout=layout, requires_grad=True)])[0]
        torch.library.opcheck(torch.ops.uxnet.instance_norm_lrelu_triton.default, (x, SLOPE, IN_EPS), test_utils=tests)
        out, _, rstd = torch.ops.uxnet.instance_norm_lrelu_triton(x.detach(), SLOPE, IN_EPS)
        torch.library.opcheck(torch.ops.uxnet.instance_norm_lrelu_triton_backward.default,
                              (torch.randn_like(out), out, rstd, SLOPE), test_utils=tests)
        for variant in VARIANTS:
            args = _dev(_in_add_args(variant, small, layout))
            z, residual, xs, ws = (args[0], args[1], [], []) if variant == "residual" else (
                args[0], None, args[1::2], args[2::2])
            torch.library.opcheck(torch.ops.uxnet.instance_norm_add_lrelu_triton.default,
                                  (z, residual, xs, ws, SLOPE, IN_EPS), test_utils=tests)
            out, _, rstd, s_mean, s_rstd = torch.ops.uxnet.instance_norm_add_lrelu_triton(
                z.detach(), None if residual is None else residual.detach(), [t.detach() for t in xs],
                [t.detach() for t in ws], SLOPE, IN_EPS)
            torch.library.opcheck(torch.ops.uxnet.instance_norm_add_lrelu_triton_backward.default,
                                  (torch.randn_like(out), out, None if residual is None else residual.detach(),
                                   [t.detach() for t in xs], [t.detach() for t in ws], rstd, s_mean, s_rstd, SLOPE),
                                  test_utils=tests)


def test_instance_norm_backend_dispatch():
    import uxnet_kernels as uk
    from uxnet_kernels import dispatch, reference

    backend = dispatch.get_backend_instance("triton")
    probe = torch.empty(1, 1, 1, 1, 1, device=DEVICE)
    z, r = (randn(SHAPE).to(DEVICE) for _ in range(2))
    with uk.use_backend("triton"):
        out = uk.instance_norm_lrelu(z)
        out_add = uk.instance_norm_add_lrelu(z, r)
    for op in ("instance_norm_lrelu", "instance_norm_add_lrelu"):
        assert backend.supports(op, probe) == (True, "")
        ok, why = backend.supports(op, probe.double())
        assert not ok and "float64" in why
        assert uk.backend_report()["last_used"][f"{op}@{DEVICE}"] == "triton"
    assert_close_rel(out.cpu(), reference.instance_norm_lrelu(z.cpu().double()), torch.float32, "instance_norm_lrelu")
    assert_close_rel(out_add.cpu(), reference.instance_norm_add_lrelu(z.cpu().double(), r.cpu().double()),
                     torch.float32, "instance_norm_add_lrelu")


@pytest.mark.skipif(not ON_GPU, reason="needs a tensor over 2**31 elements: GPU memory, not interpreter speed")
def test_dwconv3d_int64_offsets_on_gpu():
    # 2 x 16 x 256 x 256 x 1025 fp16 = 2**31 + 2**26 elements: offsets past 2**31 must not wrap.
    x = torch.randn(2, 16, 256, 256, 1025, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 1, 3, 3, 3, device="cuda", dtype=torch.float16)
    out = torch.ops.uxnet.dwconv3d_triton(x, w, None)
    tail = slice(-4, None)
    ref = _dwconv_ref(x[1:, :, tail].float(), w.float(), None)
    assert_close_rel(out[1:, :, tail][:, :, 1:-1].float().cpu(), ref[:, :, 1:-1].cpu(), torch.float16, "tail")


def _check_instance_norm_last_plane(shape, layout):
    """instance_norm_lrelu forward and backward on a bfloat16 tensor, checked on its last (n, c) plane in float32
    torch ops: with 2**31 elements or more, offsets past 2**31 must not wrap."""
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out, mean, rstd = torch.ops.uxnet.instance_norm_lrelu_triton(x, SLOPE, IN_EPS)
    plane = x[-1, -1].float()
    var, m = torch.var_mean(plane, unbiased=False)
    assert_close_rel(mean[-1, -1:].float().cpu(), m.reshape(1).cpu(), torch.float32, "mean of the last plane")
    assert_close_rel(rstd[-1, -1:].float().cpu(), (var + IN_EPS).rsqrt().reshape(1).cpu(), torch.float32, "rstd")
    want = torch.nn.functional.leaky_relu((plane - m) * (var + IN_EPS).rsqrt(), SLOPE)
    assert_close_rel(out[-1, -1, -2:].float().cpu(), want[-2:].cpu(), torch.bfloat16, "output tail")
    del plane, want
    grad_out = torch.ones_like(out)
    grad_x = torch.ops.uxnet.instance_norm_lrelu_triton_backward(grad_out, out, rstd, SLOPE)
    o = out[-1, -1].float()
    gs = torch.where(o > 0, 1.0, SLOPE)
    xhat = torch.where(o > 0, o, o / SLOPE)
    want = rstd[-1, -1] * (gs - gs.mean() - xhat * (gs * xhat).mean())
    assert_close_rel(grad_x[-1, -1, -2:].float().cpu(), want[-2:].cpu(), torch.bfloat16, "grad tail")


def test_instance_norm_last_plane_check_itself(_small_instance_tiles):
    """The check of test_instance_norm_int64_offsets_on_gpu, at a small size (where it runs everywhere)."""
    for layout in LAYOUTS:
        _check_instance_norm_last_plane((2, 3, 4, 5, 6), layout)


@pytest.mark.skipif(not ON_GPU, reason="needs a tensor over 2**31 elements: GPU memory, not interpreter speed")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_int64_offsets_on_gpu(layout):
    _check_instance_norm_last_plane((1, 2, 1024, 1024, 1025), layout)  # 2**31 + 2**21 elements, bfloat16
    torch.cuda.empty_cache()


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code that triton.compile rejects: compile every kernel for an H100 (sm_90) too."""
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no NVIDIA backend (ptxas)")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu",
                          "compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, script, "--dtypes", "fp32", "--layouts", "cl,cf"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("\n") == 26, proc.stdout  # 13 kernel variants x 2 layouts
