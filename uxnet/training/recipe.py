"""The training recipe: the official 3D UX-Net settings (``main_train.py``) as MONAI transform chains, every part
overridable.

The official chain, per training sample: LoadImage, EnsureChannelFirst, Orientation RAS, Spacing, ScaleIntensityRange
(CT -125..275 -> 0..1, clipped), CropForeground, RandCropByPosNegLabel (ROI 96^3, pos 1, neg 1, 2 crops per
volume), RandShiftIntensity (0.1, p 0.5), RandAffine (p 1, rotation about z up to pi/30, scale +-0.1).

``--flip-prob P`` adds a random flip per axis (not in the official recipe; the MONAI example and nnU-Net use it).

``uxnet train`` splits it where the randomness starts: :func:`load_transforms` (deterministic, cached once per
volume) ends with MONAI's ``FgBgToIndicesd``, so the positive/negative crop centres are drawn from cached indices
instead of rescanning the whole volume for every crop (what the official chain does); :func:`augment_transforms`
(random, per sample) crops, shifts and warps only the ROI-sized crops (``RandAffined`` with a cached grid), on the
CPU workers or, on CUDA, on the GPU. :func:`official_transforms` is the official single chain, kept for the
benchmark (``benchmarks/scripts/train_data.py``).
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from . import TrainError

KEYS = ("image", "label")
FG_KEY, BG_KEY = "label_fg_indices", "label_bg_indices"
AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
SPATIAL_MULTIPLE = 16


@dataclass(frozen=True)
class Recipe:
    """What is trained and how. Defaults: the official recipe (FLARE spacing; AMOS used 1.5 1.5 2.0).

    ``intensity`` (a_min, a_max) maps linearly to [0, 1], clipped (CT windows); None: each volume's 0.5-99.5
    percentiles to [0, 1] (for MR). ``batch`` volumes per process and step, each giving ``crops_per_volume``
    crops, so a step sees ``batch * crops_per_volume`` crops of ``roi`` per process."""

    spacing: Optional[Tuple[float, float, float]] = (1.0, 1.0, 1.2)
    orientation: Optional[str] = "RAS"
    intensity: Optional[Tuple[float, float]] = (-125.0, 275.0)
    roi: Tuple[int, int, int] = (96, 96, 96)
    batch: int = 1
    crops_per_volume: int = 2
    pos: float = 1.0
    neg: float = 1.0
    shift_offset: float = 0.1
    shift_prob: float = 0.5
    flip_prob: float = 0.0  # not in the official recipe: a random flip per axis (RandFlipd), e.g. 0.5
    affine_prob: float = 1.0
    rotate_z: float = math.pi / 30
    scale: float = 0.1
    lr: float = 1e-4
    weight_decay: float = 0.01
    iterations: int = 40_000
    val_every: int = 500
    overlap: float = 0.25
    sw_batch: int = 2

    def replace(self, **changes) -> "Recipe":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def crops_per_step(self) -> int:
        return self.batch * self.crops_per_volume


RECIPES = {"official": Recipe()}


def check_recipe(r: Recipe) -> Recipe:
    """Raises TrainError for values that cannot train (the ROI not a multiple of 16, non-positive counts...)."""
    if len(r.roi) != 3 or any(int(v) != v or v <= 0 or v % SPATIAL_MULTIPLE for v in r.roi):
        raise TrainError(f"--roi must be 1 or 3 positive multiples of {SPATIAL_MULTIPLE} (UXNet has four stride-2 "
                         f"stages), got {list(r.roi)}")
    if all(v == SPATIAL_MULTIPLE for v in r.roi):
        raise TrainError(f"--roi {list(r.roi)} leaves one voxel at UXNet's 1/16 bottleneck, where instance norm is "
                         f"undefined: make at least one axis 32 or more")
    for name in ("batch", "crops_per_volume", "iterations", "val_every", "sw_batch"):
        if int(getattr(r, name)) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(r, name)}")
    if not 0.0 <= r.flip_prob <= 1.0:
        raise TrainError(f"--flip-prob must be in [0, 1], got {r.flip_prob}")
    if not 0.0 <= r.overlap < 1.0:
        raise TrainError(f"--overlap must be in [0, 1), got {r.overlap}")
    if r.lr <= 0:
        raise TrainError(f"--lr must be positive, got {r.lr}")
    if r.spacing is not None and min(r.spacing) <= 0:
        raise TrainError(f"--spacing must be positive (mm), got {list(r.spacing)}")
    if r.intensity is not None and not r.intensity[0] < r.intensity[1]:
        raise TrainError(f"--intensity A B needs A < B, got {list(r.intensity)}")
    return r


def preprocessing(r: Recipe, class_names: Sequence[str]):
    """The :class:`uxnet.preprocessing.Preprocessing` that ``uxnet segment`` applies for this recipe."""
    from uxnet.preprocessing import Preprocessing

    return Preprocessing(
        spacing=r.spacing, orientation=r.orientation,
        intensity_range=r.intensity, output_range=None if r.intensity is None else (0.0, 1.0), clip=True,
        percentile_norm=(0.5, 99.5) if r.intensity is None else None,
        roi_size=tuple(int(v) for v in r.roi), class_names=tuple(class_names))


def _spatial_and_intensity(r: Recipe):
    from monai import transforms as T

    out = [T.LoadImaged(keys=list(KEYS)), T.EnsureChannelFirstd(keys=list(KEYS))]
    if r.orientation:
        out.append(T.Orientationd(keys=list(KEYS), axcodes=r.orientation, labels=AXIS_LETTERS))
    if r.spacing:
        out.append(T.Spacingd(keys=list(KEYS), pixdim=r.spacing, mode=("bilinear", "nearest")))
    if r.intensity is not None:
        out.append(T.ScaleIntensityRanged(keys="image", a_min=r.intensity[0], a_max=r.intensity[1], b_min=0.0,
                                          b_max=1.0, clip=True))
    else:
        out.append(T.ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                     clip=False, channel_wise=True))
    return out


def load_transforms(r: Recipe):
    """Deterministic per-volume part (cached): load, RAS, spacing, intensity, crop to the foreground, pad to the ROI,
    label as uint8, and the crop-centre candidates (``FgBgToIndicesd``, int32) for RandCropByPosNegLabeld."""
    from monai import transforms as T

    return T.Compose([
        *_spatial_and_intensity(r),
        T.CropForegroundd(keys=list(KEYS), source_key="image", allow_smaller=True),
        T.SpatialPadd(keys=list(KEYS), spatial_size=r.roi),
        T.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
        T.CastToTyped(keys=[FG_KEY, BG_KEY], dtype=np.int32),
        T.EnsureTyped(keys="image", track_meta=False),
        T.EnsureTyped(keys="label", track_meta=False, dtype=np.uint8),
    ])


def val_transforms(r: Recipe):
    """Validation volumes: the deterministic preprocessing only (as ``uxnet segment`` applies it)."""
    from monai import transforms as T

    return T.Compose([*_spatial_and_intensity(r), T.EnsureTyped(keys=list(KEYS), track_meta=False)])


def augment_transforms(r: Recipe, device=None):
    """Random per-sample part: ``crops_per_volume`` pos/neg crops of the ROI from the cached indices, intensity shift,
    then the affine on each crop (on ``device`` when given, e.g. the GPU). Input: one :func:`load_transforms` output;
    output: a list of ``{"image": (C, *roi) float32, "label": (1, *roi)}``."""
    from monai import transforms as T

    flips = [T.RandFlipd(keys=list(KEYS), prob=r.flip_prob, spatial_axis=axis) for axis in range(3)
             if r.flip_prob > 0]
    return T.Compose([
        T.RandCropByPosNegLabeld(keys=list(KEYS), label_key="label", spatial_size=r.roi, pos=r.pos, neg=r.neg,
                                 num_samples=r.crops_per_volume, fg_indices_key=FG_KEY, bg_indices_key=BG_KEY,
                                 allow_smaller=False),
        *flips,
        T.RandShiftIntensityd(keys="image", offsets=r.shift_offset, prob=r.shift_prob),
        T.RandAffined(keys=list(KEYS), mode=("bilinear", "nearest"), prob=r.affine_prob, spatial_size=r.roi,
                      rotate_range=(0, 0, r.rotate_z), scale_range=(r.scale,) * 3, cache_grid=True,
                      device=device),
    ], lazy=False)


def official_transforms(r: Recipe):
    """The official single chain (deterministic + random, crop centres found by scanning the label each time), as
    ``main_train.py`` composes it; for the data-pipeline benchmark."""
    from monai import transforms as T

    return T.Compose([
        *_spatial_and_intensity(r),
        T.CropForegroundd(keys=list(KEYS), source_key="image"),
        T.RandCropByPosNegLabeld(keys=list(KEYS), label_key="label", spatial_size=r.roi, pos=r.pos, neg=r.neg,
                                 num_samples=r.crops_per_volume, image_key="image", image_threshold=0),
        T.RandShiftIntensityd(keys="image", offsets=r.shift_offset, prob=r.shift_prob),
        T.RandAffined(keys=list(KEYS), mode=("bilinear", "nearest"), prob=r.affine_prob, spatial_size=r.roi,
                      rotate_range=(0, 0, r.rotate_z), scale_range=(r.scale,) * 3),
        T.ToTensord(keys=list(KEYS)),
    ])


__all__ = ["Recipe", "RECIPES", "check_recipe", "preprocessing", "load_transforms", "val_transforms",
           "augment_transforms", "official_transforms"]
