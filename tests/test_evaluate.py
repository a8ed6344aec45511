"""``uxnet evaluate`` (issue 13): per-class Dice against hand counts, HD95 against MONAI's HausdorffDistanceMetric
and a brute-force surface distance, spacing from the label's affine, table + CSV, folders, and clear errors."""

import csv
import math

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")
pytest.importorskip("scipy")

from uxnet import cli  # noqa: E402
from uxnet.inference.evaluation import evaluate_case  # noqa: E402

# permuted, flipped axes with spacing (0.8, 1.2, 2.5) mm along array axes 0, 1, 2
AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [0.0, 0.0, 2.5, -4.0], [0.8, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
SPACING = (0.8, 1.2, 2.5)
SHAPE = (30, 24, 16)


def _box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def cases():
    """pred / label with class 1 (shifted boxes), class 2 (a box against a partly overlapping box) and class 3
    (only in the label: a missed structure)."""
    label, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    label[_box((4, 4, 3), (14, 12, 9))] = 1
    pred[_box((6, 4, 4), (16, 12, 10))] = 1  # shifted by 2 voxels on axis 0 and 1 on axis 2
    label[_box((18, 14, 2), (26, 20, 6))] = 2
    pred[_box((18, 15, 2), (26, 22, 7))] = 2
    label[_box((2, 18, 10), (5, 22, 14))] = 3
    return pred, label


def _nifti(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _hand_dice(p, g):
    return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


def _edges(mask):
    padded = np.pad(mask, 1)
    core = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            core &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~core


def _brute_hd95(p, g, spacing):
    a, b = np.argwhere(_edges(p)) * spacing, np.argwhere(_edges(g)) * spacing
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def _evaluate(*argv):
    return cli.main(["evaluate", *map(str, argv)])


def test_dice_and_hd95_agree_with_hand_counts_monai_and_brute_force(tmp_path):
    from monai.metrics import HausdorffDistanceMetric

    pred, label = cases()
    result, classes = evaluate_case(_nifti(tmp_path / "p.nii.gz", pred), _nifti(tmp_path / "l.nii.gz", label))
    assert classes == [1, 2, 3]
    metric = HausdorffDistanceMetric(include_background=True, percentile=95)
    for c in (1, 2):
        p, g = pred == c, label == c
        assert abs(result.dice[c] - _hand_dice(p, g)) <= 1e-6, c
        want = float(metric(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None], spacing=SPACING)[0, 0])
        assert abs(result.hd95[c] - want) <= 1e-5, (c, result.hd95[c], want)
        assert abs(result.hd95[c] - _brute_hd95(p, g, np.array(SPACING))) <= 1e-4, c
    assert result.dice[1] == pytest.approx(2 * 8 * 8 * 5 / (2 * 10 * 8 * 6))  # by hand: 8 x 8 x 5 overlap
    assert result.dice[3] == 0.0 and math.isinf(result.hd95[3])  # missed completely


def test_hd95_uses_the_label_spacing(tmp_path):
    label = _box((8, 8, 4), (20, 16, 10)).astype(np.uint8)
    pred = _box((8, 8, 6), (20, 16, 12)).astype(np.uint8)  # shifted by 2 voxels along axis 2 (2.5 mm)
    for affine, step in ((AFFINE, 2.5), (np.diag([1.0, 1.0, 0.5, 1.0]), 0.5)):
        result, _ = evaluate_case(_nifti(tmp_path / "p.nii", pred, affine), _nifti(tmp_path / "l.nii", label, affine))
        assert result.hd95[1] == pytest.approx(2 * step, abs=1e-5), affine


def test_table_csv_mean_row_and_empty_classes(tmp_path, capsys):
    pred, label = cases()
    p1, l1 = _nifti(tmp_path / "p1.nii.gz", pred), _nifti(tmp_path / "l1.nii.gz", label)
    only_one = np.zeros(SHAPE, np.uint8)
    only_one[_box((4, 4, 3), (14, 12, 9))] = 1
    p2, l2 = _nifti(tmp_path / "p2.nii.gz", only_one), _nifti(tmp_path / "l2.nii.gz", only_one)
    out = tmp_path / "metrics.csv"
    assert _evaluate(p1, l1, p2, l2, "--csv", out, "--quiet") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["case", "dice_1", "dice_2", "dice_3", "hd95_1_mm", "hd95_2_mm", "hd95_3_mm",
                                  "mean_dice", "mean_hd95_mm"]
    assert printed[-1].startswith("mean") and len(printed) == 4
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["p1.nii.gz", "p2.nii.gz", "mean"]
    d1 = _hand_dice(pred == 1, label == 1)
    assert float(rows[0]["dice_1"]) == pytest.approx(d1, abs=1e-6)
    assert float(rows[1]["dice_1"]) == 1.0 and float(rows[1]["hd95_1_mm"]) == 0.0
    assert rows[1]["dice_2"] == "nan" and rows[1]["hd95_3_mm"] == "nan"  # absent from both: NaN, skipped in means
    assert float(rows[2]["dice_1"]) == pytest.approx((d1 + 1.0) / 2, abs=1e-6)
    assert float(rows[2]["dice_2"]) == pytest.approx(float(rows[0]["dice_2"]))
    assert rows[2]["hd95_3_mm"] == "inf"
    assert float(rows[0]["mean_dice"]) == pytest.approx((d1 + float(rows[0]["dice_2"]) + 0.0) / 3, abs=1e-6)


def test_class_selection_and_folders(tmp_path, capsys):
    pred, label = cases()
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        _nifti(tmp_path / "pred" / name, pred)
        _nifti(tmp_path / "ref" / name, label)
    assert _evaluate(tmp_path / "pred", tmp_path / "ref", "--classes", 1, 2, 3, 4, "--quiet") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["case", "a.nii.gz", "b.nii.gz", "mean"]
    assert "dice_4" in lines[0] and lines[1].split()[4] == "nan"  # a listed class absent from both files


def _expect_error(capsys, argv, message):
    assert _evaluate(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("uxnet evaluate: error: ") and message in err and "Traceback" not in err, err


def test_clear_errors(tmp_path, capsys):
    pred, label = cases()
    p, lab = _nifti(tmp_path / "p.nii.gz", pred), _nifti(tmp_path / "l.nii.gz", label)
    _expect_error(capsys, [p, lab, "--classes", 1, 2], "holds label values [3] outside --classes [1, 2]")
    _expect_error(capsys, [p, _nifti(tmp_path / "small.nii.gz", label[:-1])],
                  "shape mismatch: prediction")
    _expect_error(capsys, [p, _nifti(tmp_path / "moved.nii.gz", label, AFFINE + np.diag([0, 0, 0.5, 0]))],
                  "affine mismatch")
    _expect_error(capsys, [p], "expected PRED LABEL pairs, got 1 path(s)")
    _expect_error(capsys, [p, tmp_path / "missing.nii.gz"], "does not exist")
    _expect_error(capsys, [p, _nifti(tmp_path / "f.nii.gz", label.astype(np.float32) + 0.5)], "non-integer values")
    _expect_error(capsys, [p, lab, "--classes", 0, 1], "distinct positive labels")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    _nifti(tmp_path / "d1" / "x.nii.gz", pred)
    _nifti(tmp_path / "d2" / "y.nii.gz", label)
    _expect_error(capsys, [tmp_path / "d1", tmp_path / "d2"],
                  "no prediction for ['y.nii.gz']; no label for ['x.nii.gz']")
    _expect_error(capsys, [tmp_path / "d1", lab], "pair a file with a file or a folder with a folder")
    background = _nifti(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.uint8))
    _expect_error(capsys, [background, background, "--quiet"], "no class to score")
