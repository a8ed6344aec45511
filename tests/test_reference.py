"""The reference ops are the ground truth, so they are checked against independent formulations in float64."""

import torch
import torch.nn.functional as F

from uxnet_kernels import reference
from conftest import rel_error
from op_cases import dwconv3d_args, layer_norm_args, ux_mlp_args


def _naive_dwconv3d(x, w, b):
    """Sum of shifted copies of the zero-padded input, one kernel tap at a time."""
    kd, kh, kw = w.shape[2:]
    n, c, d, h, wd = x.shape
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kd // 2, kd // 2))
    out = torch.zeros_like(x) + b.view(1, c, 1, 1, 1)
    for i in range(kd):
        for j in range(kh):
            for k in range(kw):
                out += w[:, 0, i, j, k].view(1, c, 1, 1, 1) * xp[:, :, i:i + d, j:j + h, k:k + wd]
    return out


def test_dwconv3d_reference_is_a_same_padded_depthwise_conv():
    x, w, b = dwconv3d_args(kernel=(5, 3, 7), dtype=torch.float64)
    assert rel_error(reference.dwconv3d(x, w, b), _naive_dwconv3d(x, w, b)) < 1e-12


def test_layer_norm_reference_matches_layer_norm_over_channels():
    x, w, b = layer_norm_args(dtype=torch.float64)
    want = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), w, b, 1e-6).permute(0, 4, 1, 2, 3)
    assert rel_error(reference.layer_norm_channels_first(x, w, b, 1e-6), want) < 1e-12


def test_ux_mlp_reference_matches_per_channel_formula():
    y, res, ln_w, ln_b, w1, b1, w2, b2, g = ux_mlp_args(dtype=torch.float64)
    c = y.shape[1]
    mean = y.mean(1, keepdim=True)
    var = y.var(1, unbiased=False, keepdim=True)
    n = (y - mean) / torch.sqrt(var + 1e-6) * ln_w.view(1, c, 1, 1, 1) + ln_b.view(1, c, 1, 1, 1)
    hidden = w1.view(1, c, 4, 1, 1, 1) * n.unsqueeze(2) + b1.view(1, c, 4, 1, 1, 1)
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    z = (w2.view(1, c, 4, 1, 1, 1) * hidden).sum(2) + b2.view(1, c, 1, 1, 1)
    want = res + g.view(1, c, 1, 1, 1) * z
    got = reference.ux_mlp(y, res, ln_w, ln_b, w1, b1, w2, b2, g, 1e-6)
    assert rel_error(got, want) < 1e-12
