"""Sample inputs for the three ops, shared by the op, opcheck and bad-input tests."""

import torch

from conftest import randn

KERNELS = [(3, 3, 3), (5, 5, 5), (7, 7, 7), (13, 13, 13), (7, 5, 3)]
SHAPE = (2, 5, 6, 7, 8)  # odd channel count, all spatial sizes different


def dwconv3d_args(shape=SHAPE, kernel=(3, 3, 3), dtype=torch.float32, layout="contiguous", bias=True, grad=False):
    c = shape[1]
    x = randn(shape, dtype, layout, requires_grad=grad)
    w = randn((c, 1) + tuple(kernel), dtype, scale=0.2, requires_grad=grad)
    b = randn((c,), dtype, requires_grad=grad) if bias else None
    return x, w, b


def layer_norm_args(shape=SHAPE, dtype=torch.float32, layout="contiguous", grad=False):
    c = shape[1]
    x = randn(shape, dtype, layout, requires_grad=grad)
    w = (1 + 0.5 * randn((c,))).to(dtype).requires_grad_(grad)
    b = randn((c,), dtype, scale=0.5, requires_grad=grad)
    return x, w, b


def ux_mlp_args(shape=SHAPE, dtype=torch.float32, layout="contiguous", residual=True, gamma=True, grad=False):
    """(y, residual, ln_weight, ln_bias, w1 (4C,1,1,1,1), b1 (4C,), w2 (C,4,1,1,1), b2, gamma) as in a UX block."""
    c = shape[1]
    y = randn(shape, dtype, layout, requires_grad=grad)
    res = randn(shape, dtype, layout, requires_grad=grad) if residual else None
    ln_w = (1 + 0.5 * randn((c,))).to(dtype).requires_grad_(grad)
    ln_b = randn((c,), dtype, scale=0.5, requires_grad=grad)
    w1 = randn((4 * c, 1, 1, 1, 1), dtype, requires_grad=grad)
    b1 = randn((4 * c,), dtype, scale=0.5, requires_grad=grad)
    w2 = randn((c, 4, 1, 1, 1), dtype, scale=0.5, requires_grad=grad)
    b2 = randn((c,), dtype, scale=0.5, requires_grad=grad)
    g = randn((c,), dtype, requires_grad=grad) if gamma else None
    return y, res, ln_w, ln_b, w1, b1, w2, b2, g


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
