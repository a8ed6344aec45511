"""The deep-supervision heads of UXNet, as nnU-Net trains it: extra 1x1x1 output heads on the lower decoder scales.

``UXNet(..., deep_supervision=True)`` holds a :class:`DeepSupervisionHeads` under ``deep_supervision_heads`` (keys
``deep_supervision_heads.<i>.weight`` / ``.bias``, outside the official key space). In training mode its forward
returns ``[full, 1/2, 1/4, 1/8]`` resolution logits; in eval mode the full-resolution tensor alone. Train them with
``uxnet.losses.DeepSupervisionLoss``.
"""

from typing import List, Sequence

import torch
from torch import nn


class DeepSupervisionHeads(nn.ModuleList):
    """One 1x1x1 conv with bias per lower decoder scale, ``in_channels[i] -> out_chans``.

    Args:
        in_channels: channels of the decoder feature maps, highest resolution first (1/2, 1/4, 1/8 of the input).
        out_chans: classes.

    Shapes:
        forward(features): features[i] (N, in_channels[i], *S_i) -> list of (N, out_chans, *S_i).
    """

    def __init__(self, in_channels: Sequence[int], out_chans: int):
        super().__init__([nn.Conv3d(c, out_chans, kernel_size=1, bias=True) for c in in_channels])

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [head(f) for head, f in zip(self, features)]


__all__ = ["DeepSupervisionHeads"]
