"""torch.library.opcheck on every registered uxnet op: schema, fake (meta) impl, autograd registration and
AOT dispatch, with sample inputs in both layouts."""

import pytest
import torch

import uxnet_kernels  # noqa: F401  (registers fake impls and autograd)
from conftest import randn, require_compiled
from op_cases import dwconv3d_args, layer_norm_args, ux_mlp_args

LAYOUTS = ["contiguous", "channels_last_3d"]


def _canonical_mlp(args):
    y, res, ln_w, ln_b, w1, b1, w2, b2, g = args
    c = y.shape[1]
    return (y, res, ln_w, ln_b, w1.detach().reshape(c, 4).requires_grad_(w1.requires_grad),
            b1.detach().reshape(c, 4).requires_grad_(b1.requires_grad),
            w2.detach().reshape(c, 4).requires_grad_(w2.requires_grad), b2, g, 1e-6)


def _samples(layout):
    small = (2, 3, 4, 5, 6)
    yield "dwconv3d", dwconv3d_args(small, (3, 5, 3), layout=layout, grad=True)
    yield "dwconv3d", dwconv3d_args(small, (3, 3, 3), layout=layout, bias=False, grad=True)
    yield "layer_norm_channels_first", (*layer_norm_args(small, layout=layout, grad=True), 1e-6)
    yield "ux_mlp", _canonical_mlp(ux_mlp_args(small, layout=layout, grad=True))
    yield "ux_mlp", _canonical_mlp(ux_mlp_args(small, layout=layout, residual=False, gamma=False, grad=True))
    for args in _instance_norm_samples(layout, grad=True):
        yield args
    # The in-place tail has no registered autograd (uxnet_kernels differentiates it with an autograd.Function that
    # marks z dirty), so its samples do not require grad; z is a copy, as the op writes over it.
    for name, args in _instance_norm_samples(layout, grad=False):
        if name == "instance_norm_add_lrelu":
            yield "instance_norm_add_lrelu_inplace", (args[0].clone(), *args[1:])


def _instance_norm_samples(layout, grad):
    shape = (2, 3, 4, 5, 6)
    z = randn(shape, layout=layout, requires_grad=grad)
    yield "instance_norm_lrelu", (z, 0.01, 1e-5)
    yield "instance_norm_add_lrelu", (z, randn(shape, layout=layout, requires_grad=grad), [], [], 0.2, 1e-5)
    z16 = randn(shape, torch.bfloat16, layout=layout, requires_grad=grad)
    yield "instance_norm_add_lrelu", (z16, randn(shape, torch.bfloat16, layout=layout, requires_grad=grad), [], [],
                                      0.01, 1e-5)
    inputs = [randn((2, 2, 4, 5, 6), layout=layout, requires_grad=grad), randn((2, 4, 4, 5, 6), requires_grad=grad)]
    weights = [randn((3, 2, 1, 1, 1), requires_grad=grad), randn((3, 4, 1, 1, 1), requires_grad=grad)]
    yield "instance_norm_add_lrelu", (z, None, inputs[:1], weights[:1], 0.01, 1e-5)
    yield "instance_norm_add_lrelu", (z, None, inputs, weights, 0.01, 1e-5)


def _backward_samples(layout):
    x, w, _ = dwconv3d_args((2, 3, 4, 5, 6), (3, 5, 3), layout=layout)
    yield "dwconv3d_backward", (torch.randn_like(x), x, w, [True, True, True])
    yield "dwconv3d_backward", (torch.randn_like(x), x, w, [False, True, False])
    x, w, b = layer_norm_args((2, 3, 4, 5, 6), layout=layout)
    _, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, w, b, 1e-6)
    yield "layer_norm_channels_first_backward", (torch.randn_like(x), x, w, mean, rstd, [True, True, True])
    args = _canonical_mlp(ux_mlp_args((2, 3, 4, 5, 6), layout=layout))
    _, mean, rstd = torch.ops.uxnet.ux_mlp(*args)
    y, _res, ln_w, ln_b, w1, b1, w2, b2, g, _eps = args
    yield "ux_mlp_backward", (torch.randn_like(y), y, ln_w, ln_b, w1, b1, w2, b2, g, mean, rstd)
    for name, args in _instance_norm_samples(layout, grad=False):
        if name == "instance_norm_lrelu":
            out, _, rstd = torch.ops.uxnet.instance_norm_lrelu(*args)
            yield "instance_norm_lrelu_backward", (torch.randn_like(out), out, rstd, args[1])
        else:
            z, residual, inputs, weights, slope, eps = args
            out, _, rstd, sc_mean, sc_rstd = torch.ops.uxnet.instance_norm_add_lrelu(*args)
            yield "instance_norm_add_lrelu_backward", (torch.randn_like(out), out, residual, inputs, weights, rstd,
                                                       sc_mean, sc_rstd, slope)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_forward_ops(layout):
    require_compiled("cpu")
    for name, args in _samples(layout):
        torch.library.opcheck(getattr(torch.ops.uxnet, name).default, args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_backward_ops(layout):
    require_compiled("cpu")
    for name, args in _backward_samples(layout):
        torch.library.opcheck(getattr(torch.ops.uxnet, name).default, args)


def test_every_schema_is_checked():
    require_compiled("cpu")
    names = {name for layout in LAYOUTS for name, _ in _samples(layout)}
    names |= {name for layout in LAYOUTS for name, _ in _backward_samples(layout)}
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("uxnet::")}
    cpp_ops = {n for n in registered if "triton" not in n}
    assert cpp_ops == names, f"ops without an opcheck sample: {sorted(cpp_ops - names)}"
