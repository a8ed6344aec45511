"""Structural re-parameterisation of 3D UX-Net: training-time branches, the kernel prior, and exact inference folds.

Training-time model (``UXNet(rep_branches=..., kernel_prior=...)``): each UX block's large-kernel depthwise conv
computes ``conv(x, W * M) + sum_b [scale_b * conv_dil_b(x, w_b) + b_b]`` where ``M`` is the fixed kernel prior
(:func:`kernel_prior_mask`) and each branch ``b`` is a small (dilated) depthwise conv.

Because every term is a zero-padded "same" depthwise conv centred on the same tap, the sum is ONE depthwise conv
whose kernel is ``W * M`` plus each branch kernel dilated into its dense equivalent and zero-padded to the main
kernel's size (:func:`merged_kernel`) -- equal everywhere, borders included. The block computes that merged kernel
in every forward (a few thousand multiply-adds per channel) and runs a single ``dwconv3d``: one pass over the
volume instead of 1 + len(branches), on the fast kernels, with the same gradients as separate branches (it is the
same function of the same parameters).

:func:`reparameterize` turns such a model (or a plain one) into a plain ``UXNet`` with the official state_dict:
branches and prior merged into ``dwconv``, and the folds that are exact at volume borders: layer scale gamma into
pwconv2, the block LayerNorm affine into pwconv1, and the LayerNorm affine before each 2x2x2 stride-2 downsampling
conv into that conv (no padding there). The stem's and stage outputs' LayerNorm affines feed zero-padded convs, so
folding them would change border voxels; they are kept.
"""

import copy
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

KernelSize = Union[int, Sequence[int]]
KERNEL_PRIORS = ("distance",)


def _kernel_3d(kernel_size: KernelSize, what: str) -> Tuple[int, int, int]:
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 == 1 for k in ks):
        raise ValueError(f"UXNet: {what} must be an odd positive int or a 3-tuple of them, got {kernel_size!r}")
    return ks


class BranchSpec:
    """One training-time branch: ``(kernel_size, dilation)`` or ``(kernel_size, dilation, scaled)``.

    kernel_size: odd int or 3-tuple; dilation: positive int; scaled: give the branch a learnable per-channel scale.
    """

    def __init__(self, kernel_size: Tuple[int, int, int], dilation: int, scaled: bool):
        self.kernel_size, self.dilation, self.scaled = kernel_size, dilation, scaled

    @property
    def span(self) -> Tuple[int, ...]:
        """The dense extent of the dilated kernel per axis: dilation * (k - 1) + 1."""
        return tuple(self.dilation * (k - 1) + 1 for k in self.kernel_size)

    def as_config(self) -> list:
        ks = self.kernel_size[0] if len(set(self.kernel_size)) == 1 else list(self.kernel_size)
        return [ks, self.dilation, True] if self.scaled else [ks, self.dilation]

    def __repr__(self) -> str:
        return f"BranchSpec(kernel_size={self.kernel_size}, dilation={self.dilation}, scaled={self.scaled})"


def parse_branches(rep_branches, main_kernel: Tuple[int, int, int]) -> List[BranchSpec]:
    """Validate ``rep_branches`` against the main kernel; ValueError naming the bad entry otherwise."""
    if rep_branches is None:
        return []
    specs = []
    for entry in rep_branches:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ValueError(f"UXNet: each rep_branches entry must be (kernel_size, dilation) or "
                             f"(kernel_size, dilation, scaled), got {entry!r}")
        ks = _kernel_3d(entry[0], "rep_branches kernel_size")
        dilation = entry[1]
        if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
            raise ValueError(f"UXNet: rep_branches dilation must be a positive int, got {dilation!r} in {entry!r}")
        scaled = bool(entry[2]) if len(entry) == 3 else False
        spec = BranchSpec(ks, dilation, scaled)
        if any(s > k for s, k in zip(spec.span, main_kernel)):
            raise ValueError(f"UXNet: rep branch {entry!r} spans {spec.span} (dilation * (k - 1) + 1 per axis), "
                             f"which exceeds the main kernel {main_kernel}; use a smaller kernel or dilation")
        specs.append(spec)
    return specs


class RepBranch(nn.Module):
    """A training-time depthwise branch: ``scale * conv_dilated(x, weight) + bias`` (scale only if ``scaled``).

    Never run as its own conv: :func:`merged_kernel` folds it into the block's large kernel.
    """

    def __init__(self, channels: int, spec: BranchSpec):
        super().__init__()
        self.kernel_size, self.dilation = spec.kernel_size, spec.dilation
        self.weight = nn.Parameter(torch.empty(channels, 1, *spec.kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.scale = nn.Parameter(torch.ones(channels)) if spec.scaled else None
        # the initialisation nn.Conv3d would give this depthwise conv
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(math.prod(spec.kernel_size))
        nn.init.uniform_(self.bias, -bound, bound)

    def scaled_weight(self) -> torch.Tensor:
        return self.weight if self.scale is None else self.weight * self.scale.reshape(-1, 1, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.kernel_size}, dilation={self.dilation}, " \
               f"scaled={self.scale is not None}"


def kernel_prior_mask(kernel_size: KernelSize, kind: str = "distance") -> torch.Tensor:
    """The fixed per-tap scale M (1, 1, KD, KH, KW): 1 / (1 + Euclidean distance of the tap from the centre),
    distances in tap units per axis. The centre tap is 1; the corners of a 7^3 kernel are 1 / (1 + sqrt(27))."""
    if kind not in KERNEL_PRIORS:
        raise ValueError(f"UXNet: kernel_prior must be None or one of {KERNEL_PRIORS}, got {kind!r}")
    ks = _kernel_3d(kernel_size, "kernel_size")
    axes = [torch.arange(k, dtype=torch.float64) - k // 2 for k in ks]
    dz, dy, dx = torch.meshgrid(*axes, indexing="ij")
    distance = torch.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
    return (1.0 / (1.0 + distance)).reshape(1, 1, *ks)


def dense_branch_kernel(branch: RepBranch, main_kernel: Sequence[int]) -> torch.Tensor:
    """The branch's (scaled) kernel dilated into its dense equivalent and zero-padded, centred, to ``main_kernel``."""
    w = branch.scaled_weight()
    d = branch.dilation
    dense = w.new_zeros(w.shape[0], 1, *main_kernel)
    index = tuple(slice((big - (d * (k - 1) + 1)) // 2, (big + d * (k - 1) + 1) // 2, d)
                  for big, k in zip(main_kernel, branch.kernel_size))
    dense[(slice(None), slice(None)) + index] = w
    return dense


def merged_kernel(weight: torch.Tensor, bias: Optional[torch.Tensor], prior: Optional[torch.Tensor],
                  branches: Sequence[RepBranch]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The single depthwise kernel and bias equal to the main conv (with prior) plus all branches.

    Differentiable: gradients reach ``weight`` (through the prior, which stays fixed) and every branch parameter.
    With no prior and no branches it returns ``weight`` and ``bias`` themselves.
    """
    if prior is not None:
        weight = weight * prior.to(weight.dtype)
    if not branches:
        return weight, bias
    main_kernel = tuple(weight.shape[2:])
    weight = weight + sum(dense_branch_kernel(b, main_kernel) for b in branches)
    branch_bias = sum(b.bias for b in branches)
    bias = branch_bias if bias is None else bias + branch_bias
    return weight, bias


# ---- inference folds, all exact at volume borders ---------------------------------------------------------

def fold_layer_scale(pwconv2: nn.Conv3d, gamma: nn.Parameter) -> None:
    """``gamma * (w2 h + b2)`` == ``(gamma w2) h + gamma b2``; gamma := 1."""
    _assign(pwconv2.weight, pwconv2.weight * gamma.reshape(-1, 1, 1, 1, 1))
    _assign(pwconv2.bias, pwconv2.bias * gamma)
    _assign(gamma, torch.ones_like(gamma))


def fold_norm_into_grouped_pointwise(norm: nn.Module, pwconv1: nn.Conv3d) -> None:
    """pwconv1 (C -> 4C, groups=C) sees ``ln_w[c] n_c + ln_b[c]`` on outputs 4c..4c+3:
    ``w1' = w1 ln_w[c]``, ``b1' = b1 + w1 ln_b[c]``; LN affine := identity."""
    out_per_group = pwconv1.weight.shape[0] // norm.weight.shape[0]
    ln_w = norm.weight.repeat_interleave(out_per_group)
    ln_b = norm.bias.repeat_interleave(out_per_group)
    w1 = pwconv1.weight.reshape(-1)
    _assign(pwconv1.bias, pwconv1.bias + w1 * ln_b)
    _assign(pwconv1.weight, (w1 * ln_w).reshape(pwconv1.weight.shape))
    _reset_affine(norm)


def fold_norm_into_unpadded_conv(norm: nn.Module, conv: nn.Conv3d) -> None:
    """A dense conv without padding sees ``ln_w[c] n + ln_b[c]`` at every tap:
    ``W'[o, c] = W[o, c] ln_w[c]``, ``b'[o] = b[o] + sum_{c, taps} W[o, c] ln_b[c]``; LN affine := identity."""
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError("fold_norm_into_unpadded_conv: the conv must have no padding and groups=1 to fold exactly")
    w = conv.weight
    _assign(conv.bias, conv.bias + (w * norm.bias.reshape(1, -1, 1, 1, 1)).sum(dim=(1, 2, 3, 4)))
    _assign(conv.weight, w * norm.weight.reshape(1, -1, 1, 1, 1))
    _reset_affine(norm)


def _reset_affine(norm: nn.Module) -> None:
    _assign(norm.weight, torch.ones_like(norm.weight))
    _assign(norm.bias, torch.zeros_like(norm.bias))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``_orig_mod``) and DistributedDataParallel / DataParallel (``module``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def plain_config(config: dict) -> dict:
    """``config`` without the training-time re-parameterisation options."""
    return {k: v for k, v in config.items() if k not in ("rep_branches", "kernel_prior")}


@torch.no_grad()
def reparameterize(model: nn.Module, fold_norms: bool = True):
    """A new plain ``UXNet`` (eval mode, same dtype and device) equal to ``model`` in eval mode.

    Branches and the kernel prior are merged into each block's ``dwconv``; with ``fold_norms`` (default) gamma,
    the block LayerNorm affines and the pre-downsampling LayerNorm affines are folded as described in the module
    docstring. All of it is computed in float64 and cast back once. The result's state_dict has exactly the
    official keys and shapes, so it loads with strict=True into a plain ``UXNet(**plain_config(model.config))``
    or the official ``UXNET``. ``model`` is left unchanged.
    """
    from .model import UXNet  # model.py imports this module

    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"reparameterize: expected a uxnet.UXNet, got {type(model).__name__}")
    param = next(model.parameters())
    source = copy.deepcopy(model).double()
    plain = UXNet(**plain_config(model.config)).double()
    source_state = source.state_dict()
    plain.load_state_dict({k: source_state[k] for k in plain.state_dict()}, strict=True)

    for src_stage, dst_stage in zip(source.uxnet_3d.stages, plain.uxnet_3d.stages):
        for src, dst in zip(src_stage, dst_stage):
            weight, bias = src.effective_kernel()
            _assign(dst.dwconv.weight, weight)
            _assign(dst.dwconv.bias, bias)
            if fold_norms:
                if dst.gamma is not None:
                    fold_layer_scale(dst.pwconv2, dst.gamma)
                fold_norm_into_grouped_pointwise(dst.norm, dst.pwconv1)
    if fold_norms:
        for layer in list(plain.uxnet_3d.downsample_layers)[1:]:
            fold_norm_into_unpadded_conv(layer[0], layer[1])
    return plain.to(device=param.device, dtype=param.dtype).eval()


__all__ = ["BranchSpec", "RepBranch", "parse_branches", "kernel_prior_mask", "merged_kernel", "dense_branch_kernel",
           "reparameterize", "plain_config", "unwrap", "fold_layer_scale", "fold_norm_into_grouped_pointwise",
           "fold_norm_into_unpadded_conv", "KERNEL_PRIORS"]
