"""Bring a volume onto the grid a model was trained on (orientation, voxel spacing) and its prediction back onto the
volume's own grid, with MONAI's invertible ``Orientation`` and ``Spacing`` transforms (needs ``uxnet[monai]``).

The forward direction records each operation on a MONAI ``MetaTensor``; the way back is MONAI's own inverse of
those operations (what ``Invertd`` does), so the result has the input's exact shape and affine.

How a prediction goes back (``mode``):

* ``"scores"`` (the default of ``uxnet segment``): the blended class scores are resampled linearly onto the input
  grid and the argmax is taken there, as nnU-Net's predictor and MONAI's ``Invertd`` + ``AsDiscrete(argmax)``
  tutorials do. Boundaries are placed between model voxels, so a structure keeps its shape when the model grid is
  coarser than the input (no staircase of model-sized blocks). Cost: ``out_chans`` float32 maps of the input's
  size.
* ``"labels"``: the argmax is taken on the model grid and the label map is resampled by nearest neighbour. One map
  instead of ``out_chans``, so it needs the least memory, at the price of blocky boundaries when upsampling.
"""

from typing import Optional, Sequence

import numpy as np
import torch

from ..preprocessing import AXIS_LETTERS

INVERT_MODES = ("scores", "labels")


class ModelGrid:
    """The resampling of one volume: ``to_model`` then, for its prediction, ``scores_to_input`` or
    ``labels_to_input``.

    Args:
        spacing: target voxel spacing in mm per axis of the reoriented volume, or None (kept).
        orientation: target orientation code such as "RAS", or None (kept).
    """

    def __init__(self, spacing: Optional[Sequence[float]] = None, orientation: Optional[str] = None):
        from monai import transforms as T

        steps = []
        if orientation is not None:
            steps.append(T.Orientation(axcodes=orientation, labels=AXIS_LETTERS))
        if spacing is not None:
            steps.append(T.Spacing(pixdim=tuple(spacing), mode="bilinear", padding_mode="border", dtype=torch.float32))
        self.transform = T.Compose(steps)
        self.spacing, self.orientation = spacing, orientation

    def to_model(self, volume: torch.Tensor, affine: np.ndarray):
        """volume (C, X, Y, Z) with its voxel-to-world ``affine`` (4, 4) -> a MONAI MetaTensor (C, X', Y', Z') on the
        model grid (its ``.affine`` is the new grid's) that remembers how to go back."""
        from monai.data import MetaTensor

        image = MetaTensor(volume, affine=torch.as_tensor(np.asarray(affine), dtype=torch.float64))
        return self.transform(image)

    def _back(self, values: torch.Tensor, model_volume, mode: Optional[str]) -> torch.Tensor:
        from monai.data import MetaTensor
        from monai.transforms.utils import convert_applied_interp_mode

        out = MetaTensor(values, meta=dict(model_volume.meta))
        operations = [dict(op) for op in model_volume.applied_operations]
        if mode is not None:
            operations = convert_applied_interp_mode(operations, mode=mode, align_corners=None)
        out.applied_operations = operations
        return self.transform.inverse(out).as_tensor()

    def scores_to_input(self, scores: torch.Tensor, model_volume) -> torch.Tensor:
        """scores (K, X', Y', Z') on the model grid -> (K, X, Y, Z) on the input grid, linear interpolation."""
        return self._back(scores, model_volume, None)

    def labels_to_input(self, labels: torch.Tensor, model_volume) -> torch.Tensor:
        """labels (X', Y', Z') integer map on the model grid -> (X, Y, Z) int64 on the input grid, nearest neighbour."""
        back = self._back(labels[None].to(torch.float32), model_volume, "nearest")
        return back[0].round().to(torch.int64)


def voxel_spacing(affine: np.ndarray) -> tuple:
    """The voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


__all__ = ["ModelGrid", "INVERT_MODES", "voxel_spacing"]
