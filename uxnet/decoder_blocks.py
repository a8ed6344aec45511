"""The UNETR-style decoder blocks of 3D UX-Net, equivalent to MONAI's UnetrBasicBlock / UnetrUpBlock /
UnetOutBlock with ``res_block=True`` (instance norm without affine, LeakyReLU 0.01, bias-free convs), written here
so MONAI is not required. Submodule names follow MONAI so state_dict keys match the official checkpoints.
"""

from typing import Union

import torch
from torch import nn


class _Conv(nn.Module):
    """Holds the conv as ``.conv`` (MONAI's ``Convolution`` with conv_only=True has the same key layout)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _norm(name: Union[str, tuple], channels: int) -> nn.Module:
    kind, kwargs = (name, {}) if isinstance(name, str) else (name[0], dict(name[1]) if len(name) > 1 else {})
    kind = kind.lower()
    if kind == "instance":
        return nn.InstanceNorm3d(channels, **kwargs)
    if kind == "batch":
        return nn.BatchNorm3d(channels, **kwargs)
    if kind == "group":
        return nn.GroupNorm(num_channels=channels, **kwargs)
    raise ValueError(f"UXNet: unsupported norm_name {name!r}; expected 'instance', 'batch' or ('group', {{...}})")


class UnetResBlock(nn.Module):
    """conv3x3 -> norm -> lrelu -> conv3x3 -> norm, plus a 1x1x1 conv + norm shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_name):
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.conv1 = _Conv(nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad, bias=False))
        self.conv2 = _Conv(nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad, bias=False))
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = _norm(norm_name, out_channels)
        self.norm2 = _norm(norm_name, out_channels)
        self.downsample = in_channels != out_channels
        if self.downsample:
            self.conv3 = _Conv(nn.Conv3d(in_channels, out_channels, 1, bias=False))
            self.norm3 = _norm(norm_name, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        return self.lrelu(out + residual)


class UnetrBasicBlock(nn.Module):
    """MONAI ``UnetrBasicBlock(res_block=True)``: a residual block kept under ``.layer``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm_name="instance"):
        super().__init__()
        self.layer = UnetResBlock(in_channels, out_channels, kernel_size, norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """MONAI ``UnetrUpBlock(res_block=True)``: 2x2x2 stride-2 transposed conv, concat skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, upsample_kernel_size: int = 2,
                 norm_name="instance"):
        super().__init__()
        self.transp_conv = _Conv(nn.ConvTranspose3d(in_channels, out_channels, upsample_kernel_size,
                                                    stride=upsample_kernel_size, bias=False))
        self.conv_block = UnetResBlock(2 * out_channels, out_channels, kernel_size, norm_name)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """MONAI ``UnetOutBlock``: a 1x1x1 conv with bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _Conv(nn.Conv3d(in_channels, out_channels, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
