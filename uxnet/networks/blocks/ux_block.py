"""The UX block of 3D UX-Net and its LayerNorms: the official block's parameters and state_dict keys, computed by
the ``uxnet_kernels`` ops (``dwconv3d`` for the large-kernel depthwise conv, ``ux_mlp`` for the block tail)."""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import uxnet_kernels as uk

from ..kernel_size import KernelSize, as_kernel_3d
from .rep_branches import RepBranch, kernel_prior_mask, merged_kernel, parse_branches


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (N, C, D, H, W); the official ``LayerNorm(data_format="channels_first")``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uk.layer_norm_channels_first(x, self.weight, self.bias, self.eps)


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the last dim of (N, D, H, W, C); the official ``LayerNorm(data_format="channels_last")``.

    ``UXBlock`` does not call it: ``ux_mlp`` applies this norm (with these parameters) to (N, C, D, H, W) tensors."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class UXBlock(nn.Module):
    """dwconv (k^3 depthwise) -> LayerNorm -> grouped 1x1x1 conv C->4C -> GELU -> grouped 1x1x1 conv 4C->C
    -> layer scale -> drop path -> residual. Input and output: (N, C, D, H, W).

    ``rep_branches`` and ``kernel_prior`` make the dwconv a training-time re-parameterised conv (see
    ``uxnet.networks.blocks.rep_branches``); the branches live under ``rep_branches.<i>``, outside the official key
    space."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 kernel_size: KernelSize = 7, rep_branches: Sequence = (), kernel_prior: Optional[str] = None):
        super().__init__()
        ks = as_kernel_3d(kernel_size)
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=ks, padding=tuple(k // 2 for k in ks), groups=dim)
        self.rep_branches = nn.ModuleList([RepBranch(dim, spec) for spec in parse_branches(rep_branches, ks)])
        # fixed, so not in the state_dict (which keeps the official keys); folded into dwconv by reparameterize.
        # Kept in float64 (cast to the weight's dtype in forward) so float64 training sees the exact prior.
        self.register_buffer("kernel_prior_mask",
                             None if kernel_prior is None else kernel_prior_mask(ks, kernel_prior),
                             persistent=False)
        self.norm = ChannelsLastLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path)

    def effective_kernel(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The one depthwise kernel and bias the block applies: dwconv's own for a plain block; otherwise
        ``dwconv.weight * prior`` plus every branch merged in (recomputed each call, differentiable)."""
        if self.kernel_prior_mask is None and len(self.rep_branches) == 0:
            return self.dwconv.weight, self.dwconv.bias
        return merged_kernel(self.dwconv.weight, self.dwconv.bias, self.kernel_prior_mask, list(self.rep_branches))

    def large_kernel_conv(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective_kernel()
        return uk.dwconv3d(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel_conv(x)
        tail = (self.norm.weight, self.norm.bias, self.pwconv1.weight, self.pwconv1.bias,
                self.pwconv2.weight, self.pwconv2.bias, self.gamma, self.norm.eps)
        if self.training and self.drop_path.rate > 0.0:
            return x + self.drop_path(uk.ux_mlp(y, None, *tail))
        return uk.ux_mlp(y, x, *tail)


__all__ = ["UXBlock", "ChannelsFirstLayerNorm", "ChannelsLastLayerNorm", "DropPath"]
