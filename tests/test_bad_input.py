"""Bad input gets a clear error naming the op and stating expected versus got; empty tensors give empty results."""

import pytest
import torch

import uxnet_kernels as uk
from conftest import require_compiled
from op_cases import dwconv3d_args, layer_norm_args, ux_mlp_args

BACKENDS = ["reference", "cpu"]


def _mlp(*args, **kw):
    return uk.ux_mlp(*args, **kw)


BAD_DWCONV = [
    ("rank", lambda x, w, b: (x[0], w, b), r"dwconv3d: expected x of shape \(N, C, D, H, W\) \(5-d\), got 4-d"),
    ("even kernel", lambda x, w, b: (x, torch.randn(5, 1, 3, 4, 3), b), r"dwconv3d: expected odd kernel sizes.*\(3, 4, 3\)"),
    ("channels", lambda x, w, b: (x, w[:4], b), r"dwconv3d: expected weight of shape \(5, 1, KD, KH, KW\).*got \(4, 1"),
    ("bias", lambda x, w, b: (x, w, b[:3]), r"dwconv3d: expected bias of shape \(5,\), got \(3,\)"),
    ("dtype", lambda x, w, b: (x, w.double(), b), r"dwconv3d: expected weight dtype torch.float32"),
    ("device", lambda x, w, b: (x, w.to("meta"), b), r"dwconv3d: expected weight on device cpu"),
    ("integer", lambda x, w, b: (x.to(torch.int32), w, b), r"dwconv3d: expected x to have a floating dtype"),
    ("not a tensor", lambda x, w, b: (x.tolist(), w, b), r"dwconv3d: expected x to be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,mutate,message", BAD_DWCONV, ids=[c[0] for c in BAD_DWCONV])
def test_dwconv3d_rejects(backend, case, mutate, message):
    if backend == "cpu":
        require_compiled("cpu")
    with uk.use_backend(backend), pytest.raises(ValueError, match=message):
        uk.dwconv3d(*mutate(*dwconv3d_args()))


BAD_LN = [
    ("rank", lambda x, w, b: (x[0], w, b), r"layer_norm_channels_first: expected x of shape \(N, C, D, H, W\)"),
    ("channels", lambda x, w, b: (x, w[:2], b), r"layer_norm_channels_first: expected weight of shape \(5,\), got \(2,\)"),
    ("dtype", lambda x, w, b: (x, w, b.to(torch.bfloat16)), r"layer_norm_channels_first: expected bias dtype torch.float32"),
    ("integer", lambda x, w, b: (x.long(), w, b), r"layer_norm_channels_first: expected x to have a floating dtype"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_LN, ids=[c[0] for c in BAD_LN])
def test_layer_norm_rejects(case, mutate, message):
    with pytest.raises(ValueError, match=message):
        uk.layer_norm_channels_first(*mutate(*layer_norm_args()))


def test_layer_norm_rejects_non_positive_eps():
    with pytest.raises(ValueError, match=r"layer_norm_channels_first: expected eps > 0, got 0"):
        uk.layer_norm_channels_first(*layer_norm_args(), eps=0)


BAD_MLP = [
    ("rank", 0, lambda t: t[0], r"ux_mlp: expected y of shape \(N, C, D, H, W\)"),
    ("residual shape", 1, lambda t: t[:1], r"ux_mlp: expected residual of shape \(2, 5, 6, 7, 8\)"),
    ("w1 size", 4, lambda t: t[:8], r"ux_mlp: expected w1 with 20 elements"),
    ("w2 size", 6, lambda t: t[:, :3], r"ux_mlp: expected w2 with 20 elements"),
    ("gamma size", 8, lambda t: t[:4], r"ux_mlp: expected gamma with 5 elements"),
    ("dtype", 5, lambda t: t.double(), r"ux_mlp: expected b1 dtype torch.float32"),
    ("device", 7, lambda t: t.to("meta"), r"ux_mlp: expected b2 on device cpu"),
]


@pytest.mark.parametrize("case,index,mutate,message", BAD_MLP, ids=[c[0] for c in BAD_MLP])
def test_ux_mlp_rejects(case, index, mutate, message):
    args = list(ux_mlp_args())
    args[index] = mutate(args[index])
    with pytest.raises(ValueError, match=message):
        uk.ux_mlp(*args)


EMPTY_SHAPES = [(0, 5, 6, 7, 8), (2, 5, 0, 7, 8), (2, 5, 6, 7, 0), (2, 0, 6, 7, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_inputs_give_empty_results_and_zero_parameter_grads(backend, shape):
    if backend == "cpu":
        require_compiled("cpu")
    with uk.use_backend(backend):
        x, w, b = dwconv3d_args(shape, (3, 3, 3), grad=True)
        out = uk.dwconv3d(x, w, b)
        assert out.shape == shape
        out.sum().backward()
        assert w.grad.shape == w.shape and not w.grad.any()
        x, w, b = layer_norm_args(shape, grad=True)
        assert uk.layer_norm_channels_first(x, w, b).shape == shape
        args = ux_mlp_args(shape, grad=True)
        out = uk.ux_mlp(*args)
        assert out.shape == shape
        out.sum().backward()
        assert args[4].grad is not None and not args[4].grad.any()


def test_compiled_ops_reject_bad_input_directly():
    """The C++ ops check their inputs too (they can be called without the Python layer)."""
    require_compiled("cpu")
    x, w, b = dwconv3d_args()
    with pytest.raises(RuntimeError, match=r"dwconv3d: expected odd kernel sizes"):
        torch.ops.uxnet.dwconv3d(x, torch.randn(5, 1, 2, 3, 3), b)
    with pytest.raises(RuntimeError, match=r"expected weight dtype"):
        torch.ops.uxnet.dwconv3d(x, w.double(), b)
    with pytest.raises(RuntimeError, match=r"expected x of shape \(N, C, D, H, W\)"):
        torch.ops.uxnet.dwconv3d(x[0], w, b)
    x, lw, lb = layer_norm_args()
    with pytest.raises(RuntimeError, match=r"layer_norm_channels_first: expected weight with 5 channels"):
        torch.ops.uxnet.layer_norm_channels_first(x, lw[:3], lb, 1e-6)
