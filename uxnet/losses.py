"""Losses for UXNet: deep supervision as nnU-Net trains it.

:class:`DeepSupervisionLoss` turns the list of logits that ``UXNet(deep_supervision=True)`` returns in training mode
(``[full, 1/2, 1/4, 1/8]`` resolution, from the heads in ``uxnet.networks.blocks.deep_supervision``) and one
full-resolution label into one loss, weighting the scales.
"""

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def deep_supervision_weights(n: int) -> List[float]:
    """nnU-Net's loss weights for ``n`` outputs (full resolution first): ``1 / 2**i``, the lowest resolution set to
    0, normalised to sum 1. For 4 outputs: ``[1, 1/2, 1/4, 0] / 1.75``."""
    if n < 1:
        raise ValueError(f"deep_supervision_weights: need at least one output, got {n}")
    if n == 1:
        return [1.0]
    weights = [0.5 ** i for i in range(n)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``labels`` resized to the spatial ``size`` by nearest neighbour (``nearest-exact``: output voxel i takes the
    input voxel under its centre), dtype kept.

    Shapes:
        labels (N, C, *S) (class indices with C = 1, or one-hot) or (N, *S) (class indices) -> same layout, ``size``.
    """
    size = tuple(int(s) for s in size)
    if tuple(labels.shape[-len(size):]) == size:
        return labels
    batched = labels.dim() == len(size) + 2
    x = labels if batched else labels.unsqueeze(1)
    out = F.interpolate(x if x.is_floating_point() else x.float(), size=size, mode="nearest-exact")
    out = out.to(labels.dtype)
    return out if batched else out.squeeze(1)


class DeepSupervisionLoss(nn.Module):
    """``sum_i w_i * loss_fn(outputs[i], labels resized to outputs[i])``, the nnU-Net deep-supervision loss.

    Args:
        loss_fn: the loss of one scale, ``loss_fn(logits, labels) -> scalar`` (e.g. MONAI ``DiceCELoss``).
        weights: one weight per output; default :func:`deep_supervision_weights` (``1 / 2**i``, the lowest scale 0,
            normalised). Every scale's loss is computed, even a weight-0 one, so every head takes part in the graph
            (DistributedDataParallel needs no ``find_unused_parameters``).

    Shapes:
        outputs: a list of (N, K, *S_i) logits, full resolution first (UXNet's training-mode output), or one
            (N, K, *S) tensor (eval mode, or a model without deep supervision: then ``loss_fn`` alone).
        labels: (N, 1, *S) class indices, (N, K, *S) one-hot, or (N, *S) class indices, at full resolution; resized
            by nearest neighbour (:func:`downsample_labels`) to each output's spatial size.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.loss_fn = loss_fn
        self.weights = None if weights is None else [float(w) for w in weights]

    def scale_weights(self, n: int) -> List[float]:
        if self.weights is None:
            return deep_supervision_weights(n)
        if len(self.weights) != n:
            raise ValueError(f"DeepSupervisionLoss: {len(self.weights)} weights for {n} outputs")
        return self.weights

    def scale_losses(self, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> List[torch.Tensor]:
        """The unweighted loss of every scale, full resolution first."""
        if len(outputs) == 0:
            raise ValueError("DeepSupervisionLoss: expected a non-empty list of outputs")
        full = tuple(outputs[0].shape[2:])
        if tuple(labels.shape[-len(full):]) != full:
            raise ValueError(f"DeepSupervisionLoss: labels of spatial size {tuple(labels.shape[-len(full):])} do not "
                             f"match the full-resolution output {full} (outputs[0] shape {tuple(outputs[0].shape)})")
        for i, out in enumerate(outputs[1:], start=1):
            if out.dim() != outputs[0].dim() or any(s > f for s, f in zip(out.shape[2:], full)):
                raise ValueError(f"DeepSupervisionLoss: outputs[{i}] has shape {tuple(out.shape)}; expected a "
                                 f"lower-resolution version of outputs[0] {tuple(outputs[0].shape)}")
        return [self.loss_fn(out, downsample_labels(labels, out.shape[2:])) for out in outputs]

    def forward(self, outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss_fn(outputs, labels)
        losses = self.scale_losses(outputs, labels)
        weights = self.scale_weights(len(losses))
        return sum(w * loss for w, loss in zip(weights, losses))


__all__ = ["DeepSupervisionLoss", "deep_supervision_weights", "downsample_labels"]
