"""Grow a trained UXNet to a larger depthwise kernel (7 -> 13 or 21, the RepUX-Net regime), as MedNeXt's UpKern
does for MedNeXt: each UX block's depthwise kernel is interpolated trilinearly to the new size, every other tensor
is copied unchanged.

The interpolated kernel is rescaled so that each channel keeps its sum, which is the conv's response to a constant
input: at voxels farther than the new kernel radius from the zero-padded border, the grown model's first UX-block
convs give exactly the old outputs on constant regions. The rescaling is linear in the kernel (no division by the
kernel's own sum, which may be near zero):

    w' = interp(w) * K / K' + (sum(w) - sum(interp(w)) * K / K') / K'

with K, K' the old and new tap counts: the first term is the trilinear resampling scaled to the new tap density
(its sum is already close to sum(w)); the second spreads the small remainder evenly over the taps.
"""

import math
import re
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_size import KernelSize, as_kernel_3d
from .nets.uxnet import UXNet
from .reparam import reparameterize, unwrap

UX_BLOCK_DWCONV_WEIGHT = re.compile(r"^uxnet_3d\.stages\.\d+\.\d+\.dwconv\.weight$")


def grow_depthwise_kernel(weight: torch.Tensor, kernel_size: Tuple[int, int, int]) -> torch.Tensor:
    """A depthwise kernel resampled to ``kernel_size`` with its per-channel sum kept (see the module docstring).

    Trilinear interpolation with ``align_corners=False`` (the kernel's extent, taps as cells, is stretched onto the
    new one, as ``F.interpolate`` does by default and UpKern uses), computed in float64 and cast back once.

    Shapes:
        weight (C, 1, KD, KH, KW) -> (C, 1, *kernel_size).
    """
    if weight.dim() != 5 or weight.shape[1] != 1:
        raise ValueError(f"grow_depthwise_kernel: expected a depthwise kernel (C, 1, KD, KH, KW), got "
                         f"{tuple(weight.shape)}")
    kernel_size = tuple(kernel_size)
    if tuple(weight.shape[2:]) == kernel_size:
        return weight.clone()
    w = weight.double()
    old_taps, new_taps = math.prod(w.shape[2:]), math.prod(kernel_size)
    grown = F.interpolate(w, size=kernel_size, mode="trilinear", align_corners=False) * (old_taps / new_taps)
    remainder = w.sum(dim=(1, 2, 3, 4), keepdim=True) - grown.sum(dim=(1, 2, 3, 4), keepdim=True)
    return (grown + remainder / new_taps).to(weight.dtype)


@torch.no_grad()
def grow_kernel(model: nn.Module, kernel_size: KernelSize) -> UXNet:
    """A new ``UXNet`` like ``model`` but with the depthwise kernel ``kernel_size`` in every UX block.

    Each block's ``dwconv.weight`` is grown by :func:`grow_depthwise_kernel`; every other tensor (biases, the stem,
    norms, MLPs, decoder, deep-supervision heads) is copied bit for bit. A model with training-time branches or a
    kernel prior is first merged into its plain kernels (``reparameterize(model, fold_norms=False)``, which leaves
    all other tensors as they are), so the result is a plain model. ``model`` is left unchanged; the result has its
    device, dtype and training mode.

    Args:
        model: a ``UXNet`` (torch.compile / DDP wrappers are looked through).
        kernel_size: odd int or 3-tuple, at least the current kernel on every axis.

    Raises:
        TypeError: ``model`` is not a UXNet.
        ValueError: ``kernel_size`` is not odd and positive, or smaller than the current kernel on some axis.
    """
    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"grow_kernel: expected a uxnet.UXNet, got {type(model).__name__}")
    new = as_kernel_3d(kernel_size)
    old = as_kernel_3d(model.config["kernel_size"])
    if any(n < o for n, o in zip(new, old)):
        raise ValueError(f"grow_kernel: kernel_size {new} is smaller than the model's kernel {old} on some axis; "
                         f"it can only grow")
    training = model.training
    source = model
    if "rep_branches" in model.config or "kernel_prior" in model.config:
        source = reparameterize(model, fold_norms=False)
    config = dict(source.config, kernel_size=new[0] if len(set(new)) == 1 else list(new))
    param = next(model.parameters())
    grown = UXNet(**config).to(device=param.device, dtype=param.dtype)
    state = {k: grow_depthwise_kernel(v, new) if UX_BLOCK_DWCONV_WEIGHT.match(k) else v.clone()
             for k, v in source.state_dict().items()}
    grown.load_state_dict(state, strict=True)
    return grown.train(training)


__all__ = ["grow_kernel", "grow_depthwise_kernel", "UX_BLOCK_DWCONV_WEIGHT"]
