"""The UNETR-style decoder blocks of 3D UX-Net, equivalent to MONAI's UnetrBasicBlock / UnetrUpBlock /
UnetOutBlock with ``res_block=True`` (instance norm without affine, LeakyReLU 0.01, bias-free convs), written here
so MONAI is not required. Submodule names follow MONAI so state_dict keys match the official checkpoints.

With ``fused=True`` (the default in ``UXNet``) and a plain instance norm, a residual block runs its norms and
activations as two ``uxnet_kernels`` ops, which keep only what their backward needs:

    a1  = instance_norm_lrelu(conv1(x))                    # keeps a1 (conv2 keeps it anyway) + (N, C) stats
    out = instance_norm_add_lrelu(conv2(a1), x)             # identity shortcut: keeps out and x (conv1 keeps x)
    out = instance_norm_add_lrelu(conv2(a1), None, [x], [w3])  # projection shortcut: conv3 recomputed in backward

so a block keeps x, a1 and out instead of x, conv1(x), a1, conv2(a1), conv3(x) and out. The tail is called with
``donate_z=True``: on CPU its output is written over conv2(a1), which no backward needs. An up block passes the
upsampled tensor and the skip connection as separate inputs (``split_concat``): conv1 and conv3 run on both halves
with the matching slices of their weights, so the concatenation is never materialised or kept.

``fold_upsample`` (on CPU, set by ``UXNet`` for the full-resolution up block): conv1's slice over the upsampled
tensor is one transposed convolution of the low-resolution input with the composed kernel. A bias-free 2x2x2
stride-2 transposed conv followed by a 3x3x3 conv (padding 1) is the same linear map as one 4x4x4 stride-2
transposed conv (padding 1) whose kernel is their full convolution (``compose_upsample_conv``): about 40 % fewer
FLOPs than the 3x3x3 conv alone. The upsampled tensor is still computed for the 1x1x1 shortcut.

``recompute_a1`` (set by ``UXNet(activation_checkpointing=True)``) runs conv1 -> instance_norm_lrelu -> conv2 under
non-reentrant activation checkpointing: a1, the only tensor the fused block keeps besides its input and output, is
dropped and recomputed in backward from x by conv1 (the recomputation stops before conv2's forward, whose saved
tensors are a1 and its weight). The block's output op stays outside the region, so neither its output nor the
shortcut is recomputed.
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import uxnet_kernels as uk

from .conv3x3x3 import WinogradWeightCache, channels_last, conv3x3x3, runs_winograd

NEGATIVE_SLOPE = 0.01


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


def fusable_instance_norm_eps(name: Union[str, tuple]) -> Optional[float]:
    """The eps of ``name`` when it is a plain instance norm (no affine, no running statistics), which the fused
    decoder ops implement; None for any other normalisation."""
    kind, kwargs = (name, {}) if isinstance(name, str) else (name[0], dict(name[1]) if len(name) > 1 else {})
    if str(kind).lower() != "instance" or kwargs.get("affine") or kwargs.get("track_running_stats"):
        return None
    if set(kwargs) - {"eps", "affine", "track_running_stats", "momentum"}:
        return None
    return float(kwargs.get("eps", 1e-5))


class UnetResBlock(nn.Module):
    """conv3x3 -> norm -> lrelu -> conv3x3 -> norm, plus a 1x1x1 conv + norm shortcut when channels change.

    ``fused``: with a plain instance norm, run norms and activations as the memory-lean ``uxnet_kernels`` ops (see
    the module docstring); otherwise, or with another norm, the modules below run as in MONAI.

    ``winograd`` (3x3x3 kernels): run conv1, conv2 and conv1's split parts through ``conv3x3x3`` (Winograd on the
    CPU, block input taken channels-last, packed weights cached in eval without autograd); CUDA keeps cuDNN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_name, fused: bool = False,
                 winograd: bool = False):
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.padding = pad
        self.conv1 = _Conv(nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad, bias=False))
        self.conv2 = _Conv(nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad, bias=False))
        self.lrelu = nn.LeakyReLU(negative_slope=NEGATIVE_SLOPE, inplace=True)
        self.norm1 = _norm(norm_name, out_channels)
        self.norm2 = _norm(norm_name, out_channels)
        self.downsample = in_channels != out_channels
        if self.downsample:
            self.conv3 = _Conv(nn.Conv3d(in_channels, out_channels, 1, bias=False))
            self.norm3 = _norm(norm_name, out_channels)
        self.fused_eps = fusable_instance_norm_eps(norm_name) if fused else None
        self.recompute_a1 = False
        self.winograd = winograd and kernel_size == 3
        self.winograd_cache = WinogradWeightCache()

    @property
    def fused(self) -> bool:
        return self.fused_eps is not None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, key: str, module: Optional[nn.Module] = None):
        """conv1 / conv2 (``module``, or the slice ``weight`` of conv1's weight) of x."""
        if self.winograd:
            return conv3x3x3(x, weight, self.winograd_cache, key)
        return module(x) if module is not None else F.conv3d(x, weight, padding=self.padding)

    def _entry_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x (the block input, or one part of it) channels-last when conv1 runs Winograd on it, so conv1 and the
        shortcut read one copy."""
        return channels_last(x) if self.winograd and runs_winograd(x, x.shape[1]) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.forward_parts([x])
        x = self._entry_layout(x)
        out = self.lrelu(self.norm1(self._conv(x, self.conv1.conv.weight, "conv1", self.conv1)))
        out = self.norm2(self._conv(out, self.conv2.conv.weight, "conv2", self.conv2))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        return self.lrelu(out + residual)

    def forward_parts(self, parts: Sequence[torch.Tensor], upsampled_from: Optional[tuple] = None) -> torch.Tensor:
        """The fused block on the channel concatenation of ``parts``, without concatenating them: conv1 and conv3
        run on each part with the matching input-channel slice of their weight.

        ``upsampled_from = (x, transp_conv)`` says ``parts[0]`` is ``transp_conv(x)`` (bias-free, kernel = stride):
        conv1 then reads x through the composed kernel instead of reading ``parts[0]``."""
        if not self.fused:
            return self.forward(torch.cat(tuple(parts), dim=1))
        eps, parts = self.fused_eps, [self._entry_layout(p) for p in parts]
        conv1_inputs = parts if upsampled_from is None else [upsampled_from[0], *parts[1:]]
        transp = None if upsampled_from is None else upsampled_from[1]
        if self.recompute_a1 and self.training and torch.is_grad_enabled():
            z2 = checkpoint(self._conv_norm_conv, *conv1_inputs, use_reentrant=False, transp=transp,
                            part_channels=[p.shape[1] for p in parts])
        else:
            z2 = self._conv_norm_conv(*conv1_inputs, transp=transp, part_channels=[p.shape[1] for p in parts])
        # z2 is needed by nothing else (conv2's backward keeps its input), so the tail may write over it.
        if self.downsample:
            w3 = _split_in_channels(self.conv3.conv.weight, parts)
            return uk.instance_norm_add_lrelu(z2, None, parts, w3, NEGATIVE_SLOPE, eps, donate_z=True)
        return uk.instance_norm_add_lrelu(z2, parts[0], negative_slope=NEGATIVE_SLOPE, eps=eps, donate_z=True)

    def _conv_norm_conv(self, *inputs: torch.Tensor, transp: Optional[nn.ConvTranspose3d] = None,
                        part_channels: Sequence[int] = ()) -> torch.Tensor:
        """conv2(instance_norm_lrelu(conv1(concat(parts)))) without the concatenation; with ``transp``, inputs[0]
        is the low-resolution tensor that ``transp`` upsamples into the first part."""
        if len(inputs) == 1 and transp is None:
            z1 = self._conv(inputs[0], self.conv1.conv.weight, "conv1", self.conv1)
        else:
            w1 = _split_by_channels(self.conv1.conv.weight, part_channels)
            if transp is None:
                z1 = self._conv(inputs[0], w1[0], "conv1.0")
            else:
                z1 = F.conv_transpose3d(inputs[0], compose_upsample_conv(transp.weight, w1[0]),
                                        stride=transp.stride, padding=self.padding)
            for i, (part, w) in enumerate(zip(inputs[1:], w1[1:]), start=1):
                z1 = z1.add_(self._conv(part, w, f"conv1.{i}"))  # in place: no conv keeps its output
        if self.winograd and runs_winograd(z1, z1.shape[1]):
            # a1 is kept for backward by the norm and by conv2: one channels-last copy serves both (z1 is kept by
            # nothing, so converting it costs no memory; converting a1 inside conv2 would keep two copies).
            z1 = channels_last(z1)
        a1 = uk.instance_norm_lrelu(z1, NEGATIVE_SLOPE, self.fused_eps)
        return self._conv(a1, self.conv2.conv.weight, "conv2", self.conv2)


def compose_upsample_conv(transp_weight: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """The kernel of ``conv3d(conv_transpose3d(x, transp_weight, stride=u), conv_weight, padding=(k - 1) // 2)`` as
    one ``conv_transpose3d(x, K, stride=u, padding=(k - 1) // 2)``, for a bias-free transposed conv whose kernel
    equals its stride.

    transp_weight (C_in, C, u, u, u), conv_weight (C_out, C, k, k, k) -> K (C_in, C_out, u + k - 1, ...): the full
    convolution of the two kernels over the shared channels, composed in float32 or wider even under autocast."""
    dtype = torch.promote_types(transp_weight.dtype, torch.float32)
    with torch.autocast(transp_weight.device.type, enabled=False):
        kernel = F.conv_transpose3d(transp_weight.to(dtype), conv_weight.to(dtype).flip(2, 3, 4).transpose(0, 1))
    return kernel.to(conv_weight.dtype)


def _split_in_channels(weight: torch.Tensor, parts: Sequence[torch.Tensor]):
    return _split_by_channels(weight, [p.shape[1] for p in parts])


def _split_by_channels(weight: torch.Tensor, channels: Sequence[int]):
    if len(channels) == 1:
        return [weight]
    if sum(channels) != weight.shape[1]:
        raise ValueError(f"UnetResBlock: inputs with {list(channels)} channels do not add up to the "
                         f"{weight.shape[1]} input channels of the block")
    return list(torch.split(weight, list(channels), dim=1))


class UnetrBasicBlock(nn.Module):
    """MONAI ``UnetrBasicBlock(res_block=True)``: a residual block kept under ``.layer``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm_name="instance",
                 fused: bool = False, winograd: bool = False):
        super().__init__()
        self.layer = UnetResBlock(in_channels, out_channels, kernel_size, norm_name, fused, winograd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    @property
    def res_block(self) -> UnetResBlock:
        return self.layer


class UnetrUpBlock(nn.Module):
    """MONAI ``UnetrUpBlock(res_block=True)``: 2x2x2 stride-2 transposed conv, concat skip, residual block.

    ``split_concat`` (fused blocks only): hand the upsampled tensor and the skip to the residual block as two parts
    instead of concatenating them. ``fold_upsample`` (fused, split, CPU tensors): conv1 reads the low-resolution
    input through ``compose_upsample_conv`` (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, upsample_kernel_size: int = 2,
                 norm_name="instance", fused: bool = False, split_concat: bool = True, fold_upsample: bool = False,
                 winograd: bool = False):
        super().__init__()
        self.transp_conv = _Conv(nn.ConvTranspose3d(in_channels, out_channels, upsample_kernel_size,
                                                    stride=upsample_kernel_size, bias=False))
        self.conv_block = UnetResBlock(2 * out_channels, out_channels, kernel_size, norm_name, fused, winograd)
        self.split_concat = split_concat
        self.fold_upsample = fold_upsample

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.transp_conv(x)
        if self.conv_block.fused and self.split_concat:
            # Without autograd the Winograd conv of the upsampled tensor beats oneDNN's folded transposed conv
            # (docs/PERFORMANCE.md); in training the fold stays faster.
            winograd = self.conv_block.winograd and runs_winograd(up, up.shape[1])
            fold = self.fold_upsample and x.device.type == "cpu" and (torch.is_grad_enabled() or not winograd)
            return self.conv_block.forward_parts([up, skip], (x, self.transp_conv.conv) if fold else None)
        return self.conv_block(torch.cat((up, skip), dim=1))

    @property
    def res_block(self) -> UnetResBlock:
        return self.conv_block


class UnetOutBlock(nn.Module):
    """MONAI ``UnetOutBlock``: a 1x1x1 conv with bias.

    ``as_matmul`` (set by ``UXNet(fused_decoder=True)``): run it as one batched matrix product of the weight with
    the (N, C, D*H*W) view of x (for a channels_last_3d x: of its (N*D*H*W, C) rows, so its gradient stays
    channels-last). The output is NCDHW-contiguous. On CPU, PyTorch's 1x1x1 conv of a full-resolution
    48-channel input runs about 2.5x slower forward and backward (``docs/PERFORMANCE.md``)."""

    def __init__(self, in_channels: int, out_channels: int, as_matmul: bool = False):
        super().__init__()
        self.conv = _Conv(nn.Conv3d(in_channels, out_channels, 1, bias=True))
        self.as_matmul = as_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_matmul or x.dim() != 5:
            return self.conv(x)
        conv = self.conv.conv
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"UnetOutBlock: expected {conv.in_channels} input channels, got {x.shape[1]}")
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
            n, c, d, h, w = x.shape
            rows = x.permute(0, 2, 3, 4, 1).reshape(n, -1, c)  # (N, D·H·W, C), a view
            weight = conv.weight.view(1, -1, c).expand(n, -1, -1)
            if not torch.is_grad_enabled():
                # (C_out, C) times the transposed rows writes NCDHW directly (no transposing copy of the output)
                out = torch.baddbmm(conv.bias.view(1, -1, 1), weight, rows.transpose(1, 2))
                return out.view(n, -1, d, h, w)
            # (N·D·H·W, C) rows: the gradient reaching x is channels-last as well, so the blocks before it get the
            # layout they computed in (a (N, C, V) product would hand them NCDHW gradients to copy back).
            rows = torch.addmm(conv.bias, rows.reshape(-1, c), conv.weight.view(-1, c).t())
            return rows.view(n, d, h, w, -1).permute(0, 4, 1, 2, 3).contiguous()
        weight = conv.weight.view(1, conv.out_channels, conv.in_channels).expand(x.shape[0], -1, -1)
        out = torch.baddbmm(conv.bias.view(1, -1, 1), weight, x.flatten(2))
        return out.view(x.shape[0], conv.out_channels, *x.shape[2:])
