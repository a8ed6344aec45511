"""Pure-PyTorch reference implementations: the ground truth of every test.

They follow the official 3D UX-Net code operation for operation (``F.conv3d`` with ``groups=C``,
the channels-first LayerNorm written with ``mean``/``pow``, grouped 1x1x1 convolutions and exact GELU),
so autograd through them gives reference gradients, and they run on any device and dtype PyTorch does.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu"]


def dwconv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution, stride 1, zero "same" padding. x: (N, C, D, H, W); weight: (C, 1, KD, KH, KW)."""
    kd, kh, kw = weight.shape[2:]
    return F.conv3d(x, weight, bias, padding=(kd // 2, kh // 2, kw // 2), groups=x.shape[1])


def layer_norm_channels_first(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, D, H, W), biased variance, as the official ``LayerNorm(channels_first)``."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + eps)
    return weight[:, None, None, None] * normed + bias[:, None, None, None]


def ux_mlp(
    y: torch.Tensor,
    residual: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The UX block tail ``residual + gamma * pwconv2(GELU(pwconv1(LN(y))))`` as the official block computes it.

    y, residual: (N, C, D, H, W); ln_weight, ln_bias, b2, gamma: (C,); w1: (4C, 1, 1, 1, 1); b1: (4C,);
    w2: (C, 4, 1, 1, 1). ``residual=None`` omits the residual; ``gamma=None`` omits the layer scale.
    """
    channels = y.shape[1]
    w1 = w1.reshape(4 * channels, 1, 1, 1, 1)
    w2 = w2.reshape(channels, 4, 1, 1, 1)
    normed = F.layer_norm(y.permute(0, 2, 3, 4, 1), (channels,), ln_weight, ln_bias, eps)
    hidden = F.gelu(F.conv3d(normed.permute(0, 4, 1, 2, 3), w1, b1.reshape(-1), groups=channels))
    out = F.conv3d(hidden, w2, b2, groups=channels)
    if gamma is not None:
        out = gamma[:, None, None, None] * out
    return out if residual is None else residual + out


def instance_norm_lrelu(x: torch.Tensor, negative_slope: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` as the official decoder computes it (``InstanceNorm3d`` without affine or
    running statistics, then ``LeakyReLU``). x: (N, C, D, H, W)."""
    return F.leaky_relu(F.instance_norm(x, eps=eps), negative_slope)


def instance_norm_add_lrelu(
    z: torch.Tensor,
    residual: Optional[torch.Tensor],
    shortcut_inputs: Sequence[torch.Tensor] = (),
    shortcut_weights: Sequence[torch.Tensor] = (),
    negative_slope: float = 0.01,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The residual-block tail ``leaky_relu(instance_norm(z) + r)`` of the official decoder.

    r is ``residual`` (shaped like z), or, for a projection shortcut, ``instance_norm(sum_i conv3d(x_i, w_i))``
    over ``shortcut_inputs`` x_i (N, C_i, D, H, W) and bias-free 1x1x1 ``shortcut_weights`` w_i (C, C_i, 1, 1, 1)
    (one pair for the official ``conv3``; the channel halves of a concatenated input for a split one).
    """
    if residual is None:
        projected = sum(F.conv3d(x, w) for x, w in zip(shortcut_inputs, shortcut_weights))
        residual = F.instance_norm(projected, eps=eps)
    return F.leaky_relu(F.instance_norm(z, eps=eps) + residual, negative_slope)
