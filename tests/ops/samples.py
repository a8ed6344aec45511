"""Shared sample inputs of the five ops, and the one place the op tests reach into uxnet_kernels internals.

Per op: a generator of its argument list (shape, dtype, layout, with/without bias / residual / gamma / shortcut, the
spread of the values) and the reference call. Equality, opcheck, gradcheck, Triton, non-finite and CPU-kernel tests
all build their inputs here. Every generator draws from torch's global RNG (seeded per test by tests/conftest.py)
in float64, rounds to `dtype` and then lays the tensor out, so a kernel in `dtype` and its reference see the same
values.

Layouts: "contiguous", "channels_last_3d", and for x-like inputs also "strided_view" (every other channel and W
column of a bigger tensor) and "permuted_view" (H and W swapped in memory): neither dense format.
"""

import importlib
from pathlib import Path
import importlib.util

import pytest
import torch

from conftest import require_cpu_kernels as _require_cpu_kernels_by_schema
from conftest import to_layout

# ---- internals -------------------------------------------------------------------------------------------------------
# Everything below this line up to "inputs" is the op tests' whole contact with uxnet_kernels internals besides
# uxnet_kernels.dispatch.{get_backend_instance, _last_used, _warned} and conftest's helpers.


def cpp_op(name: str):
    """torch.ops.uxnet.<name>: a schema is named after its public op (ux_mlp, ux_mlp_backward, ux_mlp_triton, ...)."""
    import uxnet_kernels  # noqa: F401  (loads the extension; registers fake impls and autograd of the schemas)

    return getattr(torch.ops.uxnet, name)


def triton_op(name: str):
    """torch.ops.uxnet.<name> of a Triton schema, e.g. triton_op("layer_norm_channels_first_triton_backward");
    registers the Triton ops first (triton_internals)."""
    triton_internals()
    return cpp_op(name)


def require_cpu_kernels(*ops: str) -> None:
    """conftest.require_cpu_kernels: skip unless the compiled CPU kernels of these schemas are registered."""
    _require_cpu_kernels_by_schema(*ops)


ON_GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"


def triton_internals(module: str = "launch"):
    """uxnet_kernels.triton.<module> (default: the shared launch helpers), once the package's import has registered
    the uxnet::*_triton ops (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports uxnet_kernels on a
    machine without CUDA). Tile-size constants of the op modules are monkeypatched by a few Triton tests. Skips
    where triton is not installed; fails where the kernels were imported without the interpreter on a machine
    without CUDA (they cannot run there)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import uxnet_kernels  # noqa: F401  (registers the Triton ops where the Triton backend is available)

    launch = importlib.import_module("uxnet_kernels.triton.launch")
    if not ON_GPU and not launch.INTERPRETED:
        pytest.fail("uxnet_kernels.triton kernels were imported without TRITON_INTERPRET=1; on a machine without "
                    "CUDA they cannot run (tests/conftest.py sets it before uxnet_kernels is imported)")
    return importlib.import_module(f"uxnet_kernels.triton.{module}")


# The op families, by the test module of each (tests/ops/test_<op>.py): an op is known to the tests by having one.
OP_TEST_MODULES = {path.stem[len("test_"):]: path.stem
                   for path in sorted(Path(__file__).parent.glob("test_*.py"))}


# ---- inputs ----------------------------------------------------------------------------------------------------------

SHAPE = (2, 5, 6, 7, 8)  # odd channel count, all spatial sizes different
KERNELS = [(3, 3, 3), (5, 5, 5), (7, 7, 7), (13, 13, 13), (7, 5, 3)]
LAYOUTS = ["contiguous", "channels_last_3d"]
LN_EPS = 1e-6  # layer_norm_channels_first / ux_mlp
SLOPE, IN_EPS = 0.01, 1e-5  # instance_norm_lrelu / instance_norm_add_lrelu
# Triton under the interpreter runs at Python speed, once per program: tiny shapes on CPU, real ones on a GPU.
TRITON_SHAPE = (2, 24, 12, 10, 14) if ON_GPU else (2, 4, 6, 5, 7)
# 150 voxels per plane under the interpreter: with small_instance_tiles, several chunks per plane, a partial last
# tile and an empty tile in the last chunk, in both layouts.
TRITON_IN_SHAPE = (2, 24, 11, 12, 13) if ON_GPU else (2, 3, 5, 6, 5)


def tensor(shape, dtype=torch.float32, layout="contiguous", scale=1.0, offset=0.0, grad=False):
    """N(offset, scale^2) drawn in float64, rounded to `dtype`, in `layout` (5-d tensors only)."""
    shape = tuple(shape)
    if layout == "strided_view":  # every other channel and W column of a larger tensor
        n, c, d, h, w = shape
        base = (torch.randn(n, 2 * c, d, h, 2 * w, dtype=torch.float64) * scale + offset).to(dtype)
        t = base[:, ::2, :, :, ::2]
    elif layout == "permuted_view":  # H and W swapped in memory
        n, c, d, h, w = shape
        t = (torch.randn(n, c, d, w, h, dtype=torch.float64) * scale + offset).to(dtype).transpose(3, 4)
    else:
        t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
        if len(shape) == 5:
            t = to_layout(t, layout)
    return t.requires_grad_(grad)


def is_channels_last(t: torch.Tensor) -> bool:
    """Exactly channels_last_3d (not also contiguous): the memory format a kernel output should keep."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def expected_format(t: torch.Tensor):
    return torch.channels_last_3d if is_channels_last(t) else torch.contiguous_format


def upcast(args, dtype):
    """Detached copies of `args` in `dtype` (None stays None), keeping memory format, requiring grad."""
    out = []
    for a in args:
        if a is None:
            out.append(None)
            continue
        fmt = torch.channels_last_3d if a.dim() == 5 and not a.is_contiguous() else torch.contiguous_format
        out.append(a.detach().to(dtype).contiguous(memory_format=fmt).requires_grad_(True))
    return out


# dwconv3d(x, weight, bias) --------------------------------------------------------------------------------------------


def dwconv3d_args(shape=SHAPE, kernel=(3, 3, 3), dtype=torch.float32, layout="contiguous", bias=True, grad=False,
                  weight_scale=0.2):
    """[x (N, C, D, H, W), weight (C, 1, KD, KH, KW), bias (C,) or None]."""
    c = shape[1]
    x = tensor(shape, dtype, layout, grad=grad)
    w = tensor((c, 1) + tuple(kernel), dtype, scale=weight_scale, grad=grad)
    b = tensor((c,), dtype, grad=grad) if bias else None
    return [x, w, b]


def dwconv3d_reference(x, w, b=None):
    from uxnet_kernels import reference

    return reference.dwconv3d(x, w, b)


# conv3d_3x3x3(x, weight, bias) ----------------------------------------------------------------------------------------


def conv3d_3x3x3_args(shape=SHAPE, out_channels=4, dtype=torch.float32, layout="contiguous", bias=True, grad=False):
    """[x (N, C_in, D, H, W), weight (C_out, C_in, 3, 3, 3) scaled to keep outputs O(1), bias (C_out,) or None]."""
    c = shape[1]
    x = tensor(shape, dtype, layout, grad=grad)
    w = tensor((out_channels, c, 3, 3, 3), dtype, scale=(27 * max(c, 1)) ** -0.5, grad=grad)
    b = tensor((out_channels,), dtype, grad=grad) if bias else None
    return [x, w, b]


# layer_norm_channels_first(x, weight, bias, eps) ----------------------------------------------------------------------


def layer_norm_args(shape=SHAPE, dtype=torch.float32, layout="contiguous", grad=False, scale=1.0, offset=0.0,
                    affine_scale=0.5):
    """[x, weight (C,) around 1, bias (C,)]. An `offset` (a common mean per voxel) makes the statistics matter."""
    c = shape[1]
    x = tensor(shape, dtype, layout, scale=scale, offset=offset, grad=grad)
    w = tensor((c,), dtype, scale=affine_scale, offset=1.0, grad=grad)
    b = tensor((c,), dtype, scale=affine_scale, grad=grad)
    return [x, w, b]


def layer_norm_reference(x, w, b):
    from uxnet_kernels import reference

    return reference.layer_norm_channels_first(x, w, b, LN_EPS)


# ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps) -------------------------------------------------


def ux_mlp_args(shape=SHAPE, dtype=torch.float32, layout="contiguous", residual=True, gamma=True, grad=False,
                canonical=False, offset=0.0, ln_scale=0.5):
    """[y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma] as in a UX block: w1 (4C, 1, 1, 1, 1), b1 (4C,),
    w2 (C, 4, 1, 1, 1) (the public op's shapes) or, with `canonical`, w1, b1, w2 (C, 4) (the schemas')."""
    c = shape[1]
    w_shapes = [(c, 4)] * 3 if canonical else [(4 * c, 1, 1, 1, 1), (4 * c,), (c, 4, 1, 1, 1)]
    return [
        tensor(shape, dtype, layout, offset=offset, grad=grad),
        tensor(shape, dtype, layout, grad=grad) if residual else None,
        tensor((c,), dtype, scale=ln_scale, offset=1.0, grad=grad),
        tensor((c,), dtype, scale=ln_scale, grad=grad),
        tensor(w_shapes[0], dtype, grad=grad),
        tensor(w_shapes[1], dtype, scale=0.5, grad=grad),
        tensor(w_shapes[2], dtype, scale=0.5, grad=grad),
        tensor((c,), dtype, scale=0.5, grad=grad),
        tensor((c,), dtype, grad=grad) if gamma else None,
    ]


def canonical_mlp(args):
    """Public-shaped ux_mlp args -> the schemas' (C, 4) w1, b1, w2 (keeping requires_grad)."""
    y, res, ln_w, ln_b, w1, b1, w2, b2, g = args
    c = y.shape[1]
    return [y, res, ln_w, ln_b] + [t.detach().reshape(c, 4).requires_grad_(t.requires_grad) for t in (w1, b1, w2)] + [
        b2, g]


def ux_mlp_reference(*args):
    from uxnet_kernels import reference

    return reference.ux_mlp(*args, LN_EPS)


# instance_norm_lrelu(z, negative_slope, eps) ---------------------------------------------------------------------


def instance_norm_lrelu_args(shape, dtype=torch.float64, layout="contiguous", scale=1.5, offset=0.7, grad=False):
    """[z]: a common offset, so its statistics matter."""
    return [tensor(shape, dtype, layout, scale=scale, offset=offset, grad=grad)]


def instance_norm_lrelu_reference(z):
    from uxnet_kernels import reference

    return reference.instance_norm_lrelu(z, SLOPE, IN_EPS)


# instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps) (the block tail) -----

TAIL_VARIANTS = ["residual", "shortcut", "split_shortcut"]  # a residual; one shortcut 1x1x1 conv; a split one


def block_tail_args(variant, shape, dtype=torch.float64, layout="contiguous", widths=None, scale=1.5, offset=0.7,
                    weight_scale=0.4, input_layouts=None, grad=False):
    """Flat args of the block tail: [z, residual] or [z, *shortcut_inputs, *shortcut_weights] (split_tail splits
    them). Shortcut input widths: (3,) / (3, 5) unless `widths`; weight_scale None: 1/sqrt(fan-in)."""
    n, c, d, h, w = shape
    z = tensor(shape, dtype, layout, scale=scale, offset=offset, grad=grad)
    if variant == "residual":
        return [z, tensor(shape, dtype, layout, grad=grad)]
    widths = list(widths or ([3] if variant == "shortcut" else [3, 5]))
    layouts = input_layouts or [layout] * len(widths)
    inputs = [tensor((n, ci, d, h, w), dtype, lay, grad=grad) for ci, lay in zip(widths, layouts)]
    weights = [tensor((c, ci, 1, 1, 1), dtype, scale=ci ** -0.5 if weight_scale is None else weight_scale, grad=grad)
               for ci in widths]
    return [z, *inputs, *weights]


def split_tail(args):
    """Flat block-tail args -> (z, residual, shortcut_inputs, shortcut_weights). A 2-element list is (z, residual)."""
    if len(args) == 2:
        return args[0], args[1], [], []
    k = (len(args) - 1) // 2
    return args[0], None, list(args[1:1 + k]), list(args[1 + k:])


def block_tail(args, **kw):
    """The public op on flat block-tail args."""
    import uxnet_kernels as uk

    z, residual, inputs, weights = split_tail(args)
    if residual is not None:
        return uk.instance_norm_add_lrelu(z, residual, negative_slope=SLOPE, eps=IN_EPS, **kw)
    return uk.instance_norm_add_lrelu(z, None, inputs, weights, SLOPE, IN_EPS, **kw)


def block_tail_reference(*args):
    from uxnet_kernels import reference

    return reference.instance_norm_add_lrelu(*split_tail(list(args)), SLOPE, IN_EPS)
