"""Finding, checking and splitting a training dataset.

Two layouts are read:

* Medical Segmentation Decathlon: ``dataset.json`` with ``labels`` ({"0": "background", ...}), ``modality``
  ({"0": "CT", ...}) and ``training`` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]),
  optionally ``validation`` (same form);
* the official 3D UX-Net layout: ``imagesTr``, ``labelsTr``, ``imagesVal``, ``labelsVal`` folders, images and labels
  paired by file name (an nnU-Net channel suffix ``_0000`` on the image is ignored); class names from a
  ``dataset.json`` next to them when there is one, otherwise ``0 .. max label``.

A case is ``{"image": path, "label": path}``. Without a validation split, :func:`split_cases` holds out a seeded
fraction or one of k folds.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import TrainError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL_MM = 1e-3


@dataclass
class Dataset:
    """What :func:`discover` found: cases (``{"image", "label"}`` absolute paths), the split given by the dataset
    (``val`` empty when there is none), class names (index = label value) and the input channels."""

    root: Path
    layout: str  # "msd" or "official"
    train: List[Dict[str, str]]
    val: List[Dict[str, str]]
    class_names: Optional[Tuple[str, ...]]  # None: read from the labels by check_cases
    modalities: Tuple[str, ...] = ("image",)
    notes: List[str] = field(default_factory=list)

    @property
    def in_chans(self) -> int:
        return len(self.modalities)


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), name)


def _nifti_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
                  and not p.name.startswith("._"))


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise TrainError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def class_names_from_json(data: dict, where: Path) -> Tuple[str, ...]:
    """``labels`` {"0": "background", "1": "liver", ...} -> names indexed by label value (values 0..K-1, no gaps)."""
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise TrainError(f"{where}: 'labels' must be a non-empty object such as {{\"0\": \"background\", "
                         f"\"1\": \"organ\"}}, got {labels!r}")
    try:
        by_value = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        # MSD v2 / nnU-Net v2 style {"background": 0, "organ": 1}
        try:
            by_value = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise TrainError(f"{where}: 'labels' keys must be label values (\"0\", \"1\", ...), got "
                             f"{sorted(labels)}") from None
    if sorted(by_value) != list(range(len(by_value))):
        raise TrainError(f"{where}: 'labels' must number the classes 0..K-1 without gaps, got {sorted(by_value)}")
    if len(by_value) < 2:
        raise TrainError(f"{where}: 'labels' needs background and at least one class, got {labels}")
    return tuple(by_value[i] for i in range(len(by_value)))


def _modalities(data: dict, where: Path) -> Tuple[str, ...]:
    modality = data.get("modality", data.get("channel_names"))
    if not isinstance(modality, dict) or not modality:
        raise TrainError(f"{where}: 'modality' must be a non-empty object such as {{\"0\": \"CT\"}}, got {modality!r}")
    try:
        return tuple(str(modality[k]) for k in sorted(modality, key=int))
    except ValueError:
        raise TrainError(f"{where}: 'modality' keys must be channel numbers, got {sorted(modality)}") from None


def _msd_cases(entries, key: str, root: Path, where: Path) -> List[Dict[str, str]]:
    if not isinstance(entries, list):
        raise TrainError(f"{where}: '{key}' must be a list of {{\"image\": ..., \"label\": ...}}, got "
                         f"{type(entries).__name__}")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise TrainError(f"{where}: '{key}'[{i}] must be an object with an 'image' path, got {entry!r}")
        if not isinstance(entry.get("label"), str):
            raise TrainError(f"{where}: '{key}'[{i}] ({entry['image']}) has no 'label' path: every training image "
                             f"needs its label")
        cases.append({k: str((root / entry[k]).resolve()) for k in ("image", "label")})
    return cases


def _paired(images_dir: Path, labels_dir: Path) -> List[Dict[str, str]]:
    if not labels_dir.is_dir():
        raise TrainError(f"{images_dir} has no label folder {labels_dir.name} next to it")
    labels = {_stem(p): p for p in _nifti_files(labels_dir)}
    cases, missing = [], []
    for image in _nifti_files(images_dir):
        stem = re.sub(r"_0000$", "", _stem(image))
        label = labels.get(stem) or labels.get(_stem(image))
        if label is None:
            missing.append(image.name)
        else:
            cases.append({"image": str(image.resolve()), "label": str(label.resolve())})
    if missing:
        raise TrainError(f"{len(missing)} image(s) in {images_dir} without a label of the same name in {labels_dir}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return cases


def discover(root) -> Dataset:
    """The dataset at ``root`` (an MSD folder with ``dataset.json``, or the official imagesTr/labelsTr layout).

    Raises:
        TrainError: no such folder, a missing or malformed ``dataset.json`` and no official layout, images without
            labels, or no training case."""
    root = Path(root)
    if not root.is_dir():
        raise TrainError(f"dataset folder {str(root)!r} does not exist")
    meta_path = root / "dataset.json"
    data = _read_json(meta_path) if meta_path.is_file() else None
    if data is not None and "training" in data:
        missing = [k for k in ("labels", "modality", "training") if k not in data]
        if missing and not (missing == ["modality"] and "channel_names" in data):
            raise TrainError(f"{meta_path}: missing {missing} (an MSD dataset.json has 'training', 'labels' and "
                             f"'modality')")
        train = _msd_cases(data["training"], "training", root, meta_path)
        val = _msd_cases(data.get("validation", []), "validation", root, meta_path)
        ds = Dataset(root, "msd", train, val, class_names_from_json(data, meta_path), _modalities(data, meta_path))
    elif (root / "imagesTr").is_dir():
        train = _paired(root / "imagesTr", root / "labelsTr")
        val = _paired(root / "imagesVal", root / "labelsVal") if (root / "imagesVal").is_dir() else []
        names = class_names_from_json(data, meta_path) if data is not None and "labels" in data else None
        mods = _modalities(data, meta_path) if data is not None and "modality" in data else ("image",)
        ds = Dataset(root, "official", train, val, names, mods)
    elif data is not None:
        raise TrainError(f"{meta_path}: no 'training' list (an MSD dataset.json has 'training', 'labels' and "
                         f"'modality'), and no imagesTr folder in {root}")
    else:
        raise TrainError(f"{root} is not a dataset: expected an MSD folder (dataset.json) or the official layout "
                         f"(imagesTr, labelsTr, optionally imagesVal, labelsVal)")
    if not ds.train:
        raise TrainError(f"{root}: the training split is empty")
    return ds


def split_cases(ds: Dataset, val_fraction: float = 0.2, fold: Optional[int] = None, folds: int = 5,
                seed: int = 0) -> Tuple[List[Dict[str, str]], List[Dict[str, str]], str]:
    """(train, val, description). The dataset's own validation split when it has one; otherwise fold ``fold`` of
    ``folds`` (cases in a seeded random order, split into contiguous folds) or a seeded ``val_fraction``.

    Raises:
        TrainError: an empty split, a bad fraction or fold, or ``fold`` with a dataset that has its own split."""
    if ds.val:
        if fold is not None:
            raise TrainError(f"{ds.root} has its own validation split ({len(ds.val)} cases); --fold applies only to "
                             f"datasets without one")
        return list(ds.train), list(ds.val), f"the dataset's validation split ({len(ds.val)} cases)"
    cases = sorted(ds.train, key=lambda c: c["image"])
    order = np.random.default_rng(seed).permutation(len(cases))
    if fold is not None:
        if folds < 2 or not 0 <= fold < folds:
            raise TrainError(f"--fold K --folds N needs N >= 2 and 0 <= K < N, got K={fold}, N={folds}")
        if folds > len(cases):
            raise TrainError(f"--folds {folds} is more than the {len(cases)} training cases: a fold would be empty")
        chunks = np.array_split(order, folds)
        val_idx = set(chunks[fold].tolist())
        how = f"fold {fold} of {folds} (seed {seed})"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise TrainError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        n_val = int(round(val_fraction * len(cases)))
        if n_val == 0 or n_val == len(cases):
            raise TrainError(f"--val-fraction {val_fraction} of {len(cases)} cases leaves an empty "
                             f"{'validation' if n_val == 0 else 'training'} split")
        val_idx = set(order[:n_val].tolist())
        how = f"{n_val} held-out cases ({val_fraction:g} of {len(cases)}, seed {seed})"
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    if not train or not val:
        raise TrainError(f"empty {'training' if not train else 'validation'} split ({how})")
    return train, val, how


@dataclass
class CaseReport:
    """What :func:`check_cases` read: per case the spatial shape, spacing and the largest label value."""

    shapes: List[Tuple[int, ...]]
    spacings: List[Tuple[float, ...]]
    max_label: int


def _load_header(path: str):
    import nibabel as nib

    if not os.path.isfile(path):
        raise TrainError(f"{path}: file does not exist")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for damaged or foreign files
        raise TrainError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


def check_cases(cases: Sequence[Dict[str, str]], num_classes: Optional[int], in_chans: int = 1,
                read_labels: bool = True) -> CaseReport:
    """Every image has a readable label of the same spatial shape and affine, with ``in_chans`` channels, and (with
    ``read_labels``) integer label values in ``0 .. num_classes - 1`` (``num_classes`` None: any).

    Raises:
        TrainError: listing up to 10 problems (file and what is wrong)."""
    problems, shapes, spacings, max_label = [], [], [], 0
    for case in cases:
        try:
            img, lbl = _load_header(case["image"]), _load_header(case["label"])
        except TrainError as exc:
            problems.append(str(exc))
            continue
        ishape, lshape = tuple(img.shape), tuple(lbl.shape)
        channels = ishape[3] if len(ishape) == 4 else 1
        name = os.path.basename(case["image"])
        if len(ishape) not in (3, 4) or channels != in_chans:
            problems.append(f"{name}: image shape {ishape}, expected 3-D with {in_chans} channel(s)")
        if lshape[:3] != ishape[:3] or len(lshape) not in (3, 4) or (len(lshape) == 4 and lshape[3] != 1):
            problems.append(f"{name}: image shape {ishape[:3]} but label {os.path.basename(case['label'])} "
                            f"shape {lshape}")
        elif not np.allclose(img.affine, lbl.affine, rtol=0, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(img.affine - lbl.affine).max())
            problems.append(f"{name}: image and label affines differ (by up to {diff:.3g} mm): they are not on "
                            f"the same grid")
        shapes.append(ishape[:3])
        spacings.append(tuple(float(s) for s in img.header.get_zooms()[:3]))
        if read_labels:
            try:
                values = np.unique(np.asarray(lbl.dataobj))
            except Exception as exc:
                problems.append(f"{case['label']}: cannot read the voxels ({type(exc).__name__}: {exc})")
                continue
            bad = values[(values < 0) | (values != np.round(values))]
            if num_classes is not None:
                bad = np.union1d(bad, values[values >= num_classes])
            if bad.size:
                problems.append(f"{os.path.basename(case['label'])}: label values {bad[:8].tolist()} outside the "
                                f"class list 0..{(num_classes or 1) - 1}")
            elif values.size:
                max_label = max(max_label, int(values.max()))
        if len(problems) >= 10:
            break
    if problems:
        raise TrainError("dataset check failed:\n  " + "\n  ".join(problems[:10]))
    return CaseReport(shapes, spacings, max_label)


__all__ = ["Dataset", "discover", "split_cases", "check_cases", "CaseReport", "class_names_from_json"]
