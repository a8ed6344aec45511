"""The training-time re-parameterisation building blocks a UX block is made of: branch specs, ``RepBranch``,
the fixed kernel prior and ``merged_kernel`` (the one depthwise kernel a block applies).

They live apart from ``uxnet.networks.reparam`` (the inference folds and ``reparameterize``, which builds a
``UXNet``) so that the network imports only this module and never the module that imports the network.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..kernel_size import KernelSize, as_kernel_3d

KERNEL_PRIORS = ("distance",)


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
        ks = as_kernel_3d(entry[0], "rep_branches kernel_size")
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
    ks = as_kernel_3d(kernel_size)
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


__all__ = ["BranchSpec", "RepBranch", "parse_branches", "kernel_prior_mask", "merged_kernel", "dense_branch_kernel",
           "KERNEL_PRIORS"]
