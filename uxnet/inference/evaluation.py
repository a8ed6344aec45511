"""Per-class Dice and 95 % Hausdorff distance of predicted label maps against reference label maps, with MONAI's
``DiceMetric`` and ``HausdorffDistanceMetric`` (``uxnet evaluate``; needs ``uxnet[monai]``, whose scipy the
Hausdorff distance uses).

Per class c of a case, with P = {pred == c} and G = {label == c}:

* Dice ``2 |P & G| / (|P| + |G|)``; NaN when both are empty (the class is absent and correctly not predicted:
  left out of means, as nnU-Net does), 0 when exactly one is empty.
* HD95: the larger of the two directed 95th-percentile surface distances between the edge voxels of P and G, in mm
  from the reference label's voxel spacing (``HausdorffDistanceMetric(percentile=95)``); NaN when both are empty,
  inf when exactly one is.

Means (per case over classes, and the mean row over cases) skip NaN; an inf stays inf.
"""

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .nifti import nifti_files
from .resampling import voxel_spacing

AFFINE_TOLERANCE_MM = 1e-3  # NIfTI stores affines in float32: same grid, rounding apart


class EvaluationError(ValueError):
    """A problem with the files or options of an evaluation, stated for the user."""


@dataclass
class CaseResult:
    name: str
    dice: Dict[int, float] = field(default_factory=dict)
    hd95: Dict[int, float] = field(default_factory=dict)


def load_label_map(path) -> Tuple[np.ndarray, np.ndarray]:
    """(labels (X, Y, Z) int64, affine (4, 4)) of the NIfTI label map at ``path``; EvaluationError if it is missing,
    unreadable, not 3D, or holds non-integer values."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{str(path)!r} does not exist or is not a file")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors ...
        raise EvaluationError(f"cannot read {str(path)!r} as a NIfTI image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(f"{str(path)!r} has shape {tuple(data.shape)}; expected a 3D label map")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.round(data)
        if not np.array_equal(rounded, data):
            raise EvaluationError(f"{str(path)!r} holds non-integer values; expected a label map")
        data = rounded
    return data.astype(np.int64), np.asarray(image.affine, dtype=np.float64)


def check_same_grid(pred_path, pred_affine, pred_shape, label_path, label_affine, label_shape) -> None:
    if tuple(pred_shape) != tuple(label_shape):
        raise EvaluationError(f"shape mismatch: prediction {str(pred_path)!r} is {tuple(pred_shape)}, label "
                              f"{str(label_path)!r} is {tuple(label_shape)}")
    if not np.allclose(pred_affine, label_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        fmt = lambda a: np.array2string(a, precision=4, suppress_small=True).replace("\n", "")  # noqa: E731
        raise EvaluationError(f"affine mismatch: prediction {str(pred_path)!r} has {fmt(pred_affine)}, label "
                              f"{str(label_path)!r} has {fmt(label_affine)} (not the same voxel grid)")


def check_classes(values: Sequence[int], classes: Sequence[int], path) -> None:
    outside = sorted(set(int(v) for v in values) - set(classes) - {0})
    if outside:
        raise EvaluationError(f"{str(path)!r} holds label values {outside} outside --classes "
                              f"{sorted(classes)} (0 is background)")


def case_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float], classes: Sequence[int]):
    """{class: dice}, {class: hd95 in mm} for one case (see the module docstring)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    dice, hd95 = {}, {}
    for c in classes:
        p = torch.from_numpy(pred == c)[None, None]
        g = torch.from_numpy(label == c)[None, None]
        if not p.any() and not g.any():
            dice[c], hd95[c] = math.nan, math.nan
            continue
        dice[c] = float(dice_metric(p.float(), g.float())[0, 0])
        if not p.any() or not g.any():
            hd95[c] = math.inf
        else:
            hd95[c] = float(hd_metric(p, g, spacing=list(spacing))[0, 0])
    return dice, hd95


def evaluate_case(pred_path, label_path, classes: Optional[Sequence[int]] = None) -> Tuple[CaseResult, List[int]]:
    """Metrics of one prediction against its label for ``classes`` (default: every nonzero value in either file),
    and the classes used."""
    pred, pred_affine = load_label_map(pred_path)
    label, label_affine = load_label_map(label_path)
    check_same_grid(pred_path, pred_affine, pred.shape, label_path, label_affine, label.shape)
    if classes is None:  # a class in neither file would score NaN anyway
        classes = sorted((set(np.unique(pred).tolist()) | set(np.unique(label).tolist())) - {0})
    else:
        check_classes(np.unique(pred), classes, pred_path)
        check_classes(np.unique(label), classes, label_path)
    dice, hd95 = case_metrics(pred, label, voxel_spacing(label_affine), classes)
    return CaseResult(Path(pred_path).name, dice, hd95), list(classes)


def pair_inputs(paths: Sequence[str]) -> List[Tuple[Path, Path]]:
    """(prediction, label) pairs from ``PRED LABEL [PRED LABEL ...]``; a pair of folders expands to the files with
    matching names (every label needs a prediction and vice versa)."""
    if len(paths) < 2 or len(paths) % 2:
        raise EvaluationError(f"expected PRED LABEL pairs, got {len(paths)} path(s)")
    pairs = []
    for pred, label in zip(map(Path, paths[0::2]), map(Path, paths[1::2])):
        if pred.is_dir() != label.is_dir():
            raise EvaluationError(f"{str(pred)!r} and {str(label)!r}: pair a file with a file or a folder with a "
                                  f"folder")
        if not pred.is_dir():
            pairs.append((pred, label))
            continue
        preds, labels = ({p.name: p for p in nifti_files(folder)} for folder in (pred, label))
        if not labels:
            raise EvaluationError(f"folder {str(label)!r} holds no .nii or .nii.gz files")
        missing = sorted(set(labels) - set(preds))
        extra = sorted(set(preds) - set(labels))
        if missing or extra:
            raise EvaluationError(f"folders {str(pred)!r} and {str(label)!r} do not match: " + "; ".join(
                text for text in (f"no prediction for {missing}" if missing else "",
                                  f"no label for {extra}" if extra else "") if text))
        pairs.extend((preds[name], labels[name]) for name in sorted(labels))
    return pairs


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def table_rows(cases: Sequence[CaseResult], classes: Sequence[int]) -> Tuple[List[str], List[list]]:
    """(header, rows): one row per case and a last ``mean`` row (NaN skipped)."""
    header = (["case"] + [f"dice_{c}" for c in classes] + [f"hd95_{c}_mm" for c in classes]
              + ["mean_dice", "mean_hd95_mm"])
    rows = []
    for case in cases:
        d = [case.dice.get(c, math.nan) for c in classes]
        h = [case.hd95.get(c, math.nan) for c in classes]
        rows.append([case.name] + d + h + [_nanmean(d), _nanmean(h)])
    rows.append(["mean"] + [_nanmean([row[i] for row in rows]) for i in range(1, len(header))])
    return header, rows


def format_table(header: List[str], rows: List[list]) -> str:
    def cell(name, value):
        if isinstance(value, str):
            return value
        return f"{value:.4f}" if name.startswith(("dice", "mean_dice")) else f"{value:.2f}"

    text = [[cell(h, v) for h, v in zip(header, row)] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in text]
    return "\n".join(lines)


def write_csv(path, header: List[str], rows: List[list]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[v if isinstance(v, str) else repr(float(v)) for v in row] for row in rows])
    return path


__all__ = ["EvaluationError", "CaseResult", "load_label_map", "case_metrics", "evaluate_case", "pair_inputs",
           "table_rows", "format_table", "write_csv"]
