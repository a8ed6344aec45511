"""The CPU kernels (dwconv3d, LayerNorm, UX MLP, the decoder's instance norm + LeakyReLU, conv3d_3x3x3) on a
volume past 2**31 elements (a 512x512x300 CT at 48 channels has 3.8e9): the last depth planes of the second batch
item lie at offsets that wrap in int32. Each case checks those planes against the reference ops on a slice. The parameter
gradients (dwconv3d grad_weight / grad_bias, the UX MLP's) and the instance norm's plane sums are sums over every
voxel; their cases use an input that is zero except on those last planes, so the reference on the slice gives the
whole sum.

Opt-in (UXNET_LARGE_TESTS=1): a case allocates 5-13 GiB and runs for about half a minute, more than CI machines
are promised."""

import os

import pytest
import torch
from conftest import assert_close_rel, require_compiled

from uxnet_kernels import reference

pytestmark = pytest.mark.skipif(
    os.environ.get("UXNET_LARGE_TESTS") != "1", reason="opt-in: set UXNET_LARGE_TESTS=1 (needs 9-13 GiB of RAM)"
)

SHAPE = (2, 8, 128, 1024, 1025)  # 2,149,580,800 elements; item 1's last ~3 depth planes start past 2**31
BLOCK_PLANES = 16
TAIL = 4  # depth planes of item 1 compared with the reference
EPS = 1e-6
LAYOUTS = ["contiguous", "channels_last_3d"]


@pytest.fixture(autouse=True)
def _compiled():
    require_compiled("cpu")


def big_input(layout: str) -> torch.Tensor:
    """bfloat16 SHAPE in `layout`; every block of BLOCK_PLANES depth planes is a differently rolled copy of one
    random block, so reading from a wrong block gives wrong values (filling 2e9 values with randn takes minutes)."""
    n, c, d, h, w = SHAPE
    block = torch.randn(n, c, BLOCK_PLANES, h, w).to(torch.bfloat16)
    memory_format = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.empty(SHAPE, dtype=torch.bfloat16, memory_format=memory_format)
    for i in range(d // BLOCK_PLANES):
        x[:, :, i * BLOCK_PLANES:(i + 1) * BLOCK_PLANES] = block.roll(37 * i, dims=-1)
    assert x.numel() > 2**31
    return x


def tail(t: torch.Tensor, planes: int = TAIL) -> torch.Tensor:
    """Item 1's last `planes` depth planes, contiguous, float32."""
    return t[1:, :, -planes:].float().contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv3d_forward_and_grad_input_past_2_31(layout):
    x = big_input(layout)
    weight = torch.randn(SHAPE[1], 1, 3, 3, 3).to(torch.bfloat16)
    out = torch.ops.uxnet.dwconv3d(x, weight, None)
    # k = 3: output plane p needs input planes p-1..p+1, so the reference on the last TAIL planes is exact for all
    # but its first plane (whose lower neighbour it pads with zeros).
    want = reference.dwconv3d(tail(x), weight.float(), None)[:, :, 1:]
    assert_close_rel(tail(out, TAIL - 1), want, torch.bfloat16, "dwconv3d forward, item 1's last planes")
    del out
    # grad_x is the forward with the flipped kernel; x serves as grad_out.
    grad_x = torch.ops.uxnet.dwconv3d_backward(x, x, weight, [True, False, False])[0]
    want = reference.dwconv3d(tail(x), weight.float().flip(2, 3, 4), None)[:, :, 1:]
    assert_close_rel(tail(grad_x, TAIL - 1), want, torch.bfloat16, "dwconv3d grad_x, item 1's last planes")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_forward_and_grad_input_past_2_31(layout):
    x = big_input(layout)
    c = SHAPE[1]
    weight = (1 + 0.1 * torch.randn(c)).to(torch.bfloat16)
    bias = (0.1 * torch.randn(c)).to(torch.bfloat16)
    out, mean, rstd = torch.ops.uxnet.layer_norm_channels_first(x, weight, bias, EPS)
    x_tail = tail(x).requires_grad_()
    want = reference.layer_norm_channels_first(x_tail, weight.float(), bias.float(), EPS)
    assert_close_rel(tail(out), want, torch.bfloat16, "layer_norm forward, item 1's last planes")
    del out
    # LayerNorm is per voxel: grad_x of the slice is exact; x serves as grad_out.
    grad_x = torch.ops.uxnet.layer_norm_channels_first_backward(x, x, weight, mean, rstd, [True, False, False])[0]
    (want_grad,) = torch.autograd.grad(want, x_tail, tail(x))
    assert_close_rel(tail(grad_x), want_grad, torch.bfloat16, "layer_norm grad_x, item 1's last planes")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ux_mlp_forward_past_2_31(layout):
    x = big_input(layout)
    c = SHAPE[1]
    # the schema's shapes: ln_weight, ln_bias (C); w1, b1, w2 (C, 4); b2, gamma (C)
    params = [1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c), 0.5 * torch.randn(c, 4), 0.1 * torch.randn(c, 4),
              0.5 * torch.randn(c, 4), 0.1 * torch.randn(c), torch.randn(c)]
    lnw, lnb, w1, b1, w2, b2, gamma = [p.to(torch.bfloat16) for p in params]
    out = torch.ops.uxnet.ux_mlp(x, x, lnw, lnb, w1, b1, w2, b2, gamma, EPS)[0]
    want = reference.ux_mlp(tail(x), tail(x), *[p.float() for p in (lnw, lnb, w1, b1, w2, b2, gamma)], EPS)
    assert_close_rel(tail(out), want, torch.bfloat16, "ux_mlp forward, item 1's last planes")


def tail_only_input(layout: str) -> torch.Tensor:
    """bfloat16 SHAPE in `layout`, zero except item 1's last TAIL depth planes (random)."""
    n, c, d, h, w = SHAPE
    memory_format = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.empty(SHAPE, dtype=torch.bfloat16, memory_format=memory_format).zero_()
    x[1, :, -TAIL:] = torch.randn(c, TAIL, h, w).to(torch.bfloat16)
    assert x.numel() > 2**31
    return x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv3d_grad_weight_past_2_31(layout):
    """x (zero but for item 1's last planes) also serves as grad_out: every product of the weight gradient sits in
    those planes, past 2**31, and the reference on them (one zero plane below for the k = 3 halo) gives the sum."""
    x = tail_only_input(layout)
    weight = torch.randn(SHAPE[1], 1, 3, 3, 3).to(torch.bfloat16)
    _, grad_weight, grad_bias = torch.ops.uxnet.dwconv3d_backward(x, x, weight, [False, True, True])
    slab = x[1:, :, -(TAIL + 1):].float().contiguous()  # its first plane is zero
    w_ref = weight.float().requires_grad_()
    b_ref = torch.zeros(SHAPE[1], requires_grad=True)
    want_w, want_b = torch.autograd.grad(reference.dwconv3d(slab, w_ref, b_ref), [w_ref, b_ref], slab)
    assert_close_rel(grad_weight, want_w, torch.bfloat16, "dwconv3d grad_weight")
    assert_close_rel(grad_bias, want_b, torch.bfloat16, "dwconv3d grad_bias")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ux_mlp_backward_past_2_31(layout):
    """y (zero but for item 1's last planes) also serves as grad_out: grad_y of those planes and every parameter
    gradient (zero grad_out elsewhere contributes nothing) against the reference on the planes."""
    y = tail_only_input(layout)
    c = SHAPE[1]
    params = [1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c), 0.5 * torch.randn(c, 4), 0.1 * torch.randn(c, 4),
              0.5 * torch.randn(c, 4), 0.1 * torch.randn(c), torch.randn(c)]
    params = [p.to(torch.bfloat16) for p in params]
    _, mean, rstd = torch.ops.uxnet.ux_mlp(y, None, *params, EPS)
    grads = torch.ops.uxnet.ux_mlp_backward(y, y, *params, mean, rstd)
    del mean, rstd
    y_tail = tail(y).requires_grad_()
    p_ref = [p.float().requires_grad_() for p in params]
    out_ref = reference.ux_mlp(y_tail, None, *p_ref, EPS)
    want = torch.autograd.grad(out_ref, [y_tail, *p_ref], tail(y))
    assert_close_rel(tail(grads[0]), want[0], torch.bfloat16, "ux_mlp grad_y, item 1's last planes")
    names = ["ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "gamma"]
    for name, got, ref in zip(names, grads[1:], want[1:]):
        assert_close_rel(got, ref, torch.bfloat16, f"ux_mlp grad_{name}")


def plane_stats(x: torch.Tensor):
    """float64 (N, C) mean and rstd of big_input's planes: every block of BLOCK_PLANES depth planes is a roll of
    the first along W, so the first block's statistics are the whole plane's."""
    first = x[:, :, :BLOCK_PLANES].double()
    return first.mean((2, 3, 4)), (first.var((2, 3, 4), unbiased=False) + 1e-5).rsqrt()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_lrelu_past_2_31(layout):
    """The decoder's instance norm + LeakyReLU: the statistics of item 1's planes (which end past 2**31), its last
    planes' output, and grad_x there for a grad_out that is zero but on those planes (the plane sums of the
    backward then come from them alone, divided by the whole plane's voxel count)."""
    slope = 0.01
    x = big_input(layout)
    out, mean, rstd = torch.ops.uxnet.instance_norm_lrelu(x, slope, 1e-5)
    want_mean, want_rstd = plane_stats(x)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-5, atol=0)
    xhat = (tail(x).double() - want_mean[1:, :, None, None, None]) * want_rstd[1:, :, None, None, None]
    assert_close_rel(tail(out), torch.nn.functional.leaky_relu(xhat, slope), torch.bfloat16,
                     "instance_norm_lrelu forward, item 1's last planes")
    del x
    grad_out = tail_only_input(layout)
    grad_x = torch.ops.uxnet.instance_norm_lrelu_backward(grad_out, out, rstd, slope)
    voxels = SHAPE[2] * SHAPE[3] * SHAPE[4]
    g = tail(grad_out).double() * torch.where(xhat > 0, 1.0, slope)
    sum_g = g.sum((2, 3, 4), keepdim=True) / voxels
    sum_gx = (g * xhat).sum((2, 3, 4), keepdim=True) / voxels
    want = want_rstd[1:, :, None, None, None] * (g - sum_g - xhat * sum_gx)
    assert_close_rel(tail(grad_x), want, torch.bfloat16, "instance_norm_lrelu grad_x, item 1's last planes")


def test_conv3d_3x3x3_forward_past_2_31():
    """The Winograd convolution (forward; grad_x is the same driver on grad_out): item 1's last planes, whose tiles
    read and write offsets past 2**31. channels_last_3d only: the kernels compute in float32, and an NCDHW input
    would add an 8.6 GB channels-last copy to the 13 GB this case holds. Both paths run: the one for the whole
    volume (blocks of tiles in parallel) and the packed weight's."""
    x = big_input("channels_last_3d")
    weight = (0.2 * torch.randn(3, SHAPE[1], 3, 3, 3)).to(torch.bfloat16)
    bias = torch.randn(3).to(torch.bfloat16)
    # Output plane p needs input planes p-1..p+1: the reference on the last TAIL planes is exact but for its first.
    want = reference.conv3d_3x3x3(tail(x), weight.float(), bias.float())[:, :, 1:]
    out = torch.ops.uxnet.conv3d_3x3x3(x, weight, bias)
    assert_close_rel(tail(out, TAIL - 1), want, torch.bfloat16, "conv3d_3x3x3 forward, item 1's last planes")
    del out
    packed = torch.ops.uxnet.conv3d_3x3x3_pack_weight(weight)
    out = torch.ops.uxnet.conv3d_3x3x3_packed(x, weight, packed, bias)
    assert_close_rel(tail(out, TAIL - 1), want, torch.bfloat16, "conv3d_3x3x3 packed, item 1's last planes")
