"""The preprocessing a model was trained with, stored in its checkpoint (docs/EXPORT.md, format version 2) and
applied by ``uxnet segment``: voxel spacing, orientation, intensity window and scaling, ROI size and class names.

The fields mirror the MONAI transforms of the official training pipelines, applied in this order:

1. ``orientation`` (MONAI ``Orientation(axcodes=...)``), e.g. ``"RAS"``: axes flipped/permuted, no interpolation;
2. ``spacing`` (MONAI ``Spacing(pixdim=...)``), in mm per axis of the reoriented volume, bilinear;
3. ``intensity_range`` (a_min, a_max) with ``output_range`` (b_min, b_max) and ``clip`` (MONAI
   ``ScaleIntensityRange``): intensities mapped linearly from [a_min, a_max] to [b_min, b_max] and, with ``clip``,
   clipped to it; without ``output_range``, only clipped to [a_min, a_max];
4. ``percentile_norm`` (lo, hi): ``(X - X_lo) / (X_hi - X_lo)`` with ``X_p`` the p-th percentile of the volume
   (the paper's normalisation).

``roi_size`` is the training patch (the sliding-window size), ``class_names`` one name per output channel.
Everything is plain data (``to_dict`` / ``from_dict``), so checkpoints stay loadable with ``weights_only=True``.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel affines map to RAS+ world coordinates


def _floats(value, n: int, what: str) -> Optional[Tuple[float, ...]]:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"preprocessing: {what} must be {n} numbers, got {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"preprocessing: {what} must be {n} finite numbers, got {value!r}")
    return out


def check_orientation(code: Optional[str]) -> Optional[str]:
    """An orientation code such as "RAS" or "LPS" (upper-cased): one letter of L/R, P/A and I/S each, in any order."""
    if code is None:
        return None
    text = str(code).upper()
    letters = sorted(next((i for i, pair in enumerate(AXIS_LETTERS) if c in pair), -1) for c in text)
    if len(text) != 3 or letters != [0, 1, 2]:
        raise ValueError(f"preprocessing: orientation must be 3 letters, one of L/R, one of P/A and one of I/S "
                         f"(e.g. RAS, LPS), got {code!r}")
    return text


@dataclass(frozen=True)
class Preprocessing:
    """See the module docstring. Every field is optional; ``Preprocessing()`` does nothing."""

    spacing: Optional[Tuple[float, float, float]] = None
    orientation: Optional[str] = None
    intensity_range: Optional[Tuple[float, float]] = None
    output_range: Optional[Tuple[float, float]] = None
    clip: bool = True
    percentile_norm: Optional[Tuple[float, float]] = None
    roi_size: Optional[Tuple[int, int, int]] = None
    class_names: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("spacing", _floats(self.spacing, 3, "spacing"))
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ValueError(f"preprocessing: spacing must be positive (mm), got {list(self.spacing)}")
        set_("orientation", check_orientation(self.orientation))
        set_("intensity_range", _floats(self.intensity_range, 2, "intensity_range (a_min, a_max)"))
        set_("output_range", _floats(self.output_range, 2, "output_range (b_min, b_max)"))
        set_("clip", bool(self.clip))
        if self.intensity_range is not None and not self.intensity_range[0] < self.intensity_range[1]:
            raise ValueError(f"preprocessing: intensity_range (a_min, a_max) needs a_min < a_max, got "
                             f"{list(self.intensity_range)}")
        if self.output_range is not None and self.intensity_range is None:
            raise ValueError("preprocessing: output_range needs an intensity_range to map from")
        set_("percentile_norm", _floats(self.percentile_norm, 2, "percentile_norm (lo, hi)"))
        if self.percentile_norm is not None and not 0 <= self.percentile_norm[0] < self.percentile_norm[1] <= 100:
            raise ValueError(f"preprocessing: percentile_norm (lo, hi) needs 0 <= lo < hi <= 100, got "
                             f"{list(self.percentile_norm)}")
        if self.roi_size is not None:
            roi = tuple(self.roi_size)
            if len(roi) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in roi):
                raise ValueError(f"preprocessing: roi_size must be 3 positive ints, got {self.roi_size!r}")
            set_("roi_size", roi)
        if self.class_names is not None:
            names = tuple(self.class_names)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"preprocessing: class_names must be non-empty strings, got {self.class_names!r}")
            set_("class_names", names)

    @property
    def resamples(self) -> bool:
        """Whether a volume is reoriented or resampled before the model sees it."""
        return self.spacing is not None or self.orientation is not None

    @property
    def has_intensity(self) -> bool:
        return self.intensity_range is not None or self.percentile_norm is not None

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain Python (lists, floats, strings, bools, None), as stored in a checkpoint."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        """The inverse of :meth:`to_dict`; ValueError naming unknown keys or bad values."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"preprocessing: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def apply_intensity(self, volume: torch.Tensor) -> torch.Tensor:
        """Steps 3 and 4 of the module docstring. volume: (C, X, Y, Z) float32 -> float32 (percentiles per channel)."""
        if self.intensity_range is not None:
            a_min, a_max = self.intensity_range
            if self.output_range is not None:
                b_min, b_max = self.output_range
                volume = (volume - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
                if self.clip:
                    volume = volume.clamp(min(b_min, b_max), max(b_min, b_max))
            elif self.clip:
                volume = volume.clamp(a_min, a_max)
        if self.percentile_norm is not None:
            q = torch.tensor([p / 100.0 for p in self.percentile_norm], dtype=torch.float64)
            out = torch.empty_like(volume)
            for c in range(volume.shape[0]):
                x_lo, x_hi = _percentiles(volume[c], q)
                out[c] = (volume[c] - x_lo) / max(x_hi - x_lo, 1e-8)
            volume = out
        return volume

    def describe(self) -> str:
        """One line for the user, e.g. ``RAS, spacing 1.5 x 1.5 x 2 mm, [-175, 250] -> [0, 1] clipped, ROI 96^3``."""
        parts = []
        if self.orientation:
            parts.append(self.orientation)
        if self.spacing:
            parts.append("spacing " + " x ".join(f"{s:g}" for s in self.spacing) + " mm")
        if self.intensity_range:
            text = "[{:g}, {:g}]".format(*self.intensity_range)
            if self.output_range:
                text += " -> [{:g}, {:g}]".format(*self.output_range)
            parts.append(text + (" clipped" if self.clip else ""))
        if self.percentile_norm:
            parts.append("percentiles {:g}-{:g} -> [0, 1]".format(*self.percentile_norm))
        if self.roi_size:
            parts.append("ROI " + "x".join(map(str, self.roi_size)))
        return ", ".join(parts) if parts else "none"


def _percentiles(channel: torch.Tensor, q: torch.Tensor) -> Tuple[float, float]:
    # torch.quantile is limited to 2^24 elements; a strided subsample of a large CT is within a voxel's precision
    flat = channel.reshape(-1)
    step = max(1, math.ceil(flat.numel() / (1 << 24)))
    lo, hi = torch.quantile(flat[::step].double(), q).tolist()
    return lo, hi


def as_preprocessing(value) -> Optional[Preprocessing]:
    """``None``, a :class:`Preprocessing`, or its dict form -> ``Optional[Preprocessing]``."""
    if value is None or isinstance(value, Preprocessing):
        return value
    return Preprocessing.from_dict(value)


def check_class_names(prep: Optional[Preprocessing], out_chans: int) -> None:
    if prep is not None and prep.class_names is not None and len(prep.class_names) != out_chans:
        raise ValueError(f"preprocessing: {len(prep.class_names)} class_names for a model with out_chans={out_chans}")


def labels_of(names: Optional[Sequence[str]], n: int) -> Sequence[str]:
    """Class names, or ``"0" .. str(n - 1)`` when none are recorded."""
    return list(names) if names else [str(i) for i in range(n)]


__all__ = ["Preprocessing", "as_preprocessing", "check_orientation", "check_class_names", "labels_of"]
