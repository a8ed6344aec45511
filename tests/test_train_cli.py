"""``uxnet train`` end to end on tiny synthetic data (CPU): the whole CLI in a subprocess on an MSD folder, then
``uxnet segment`` and ``uxnet evaluate`` on the trained best.pt; the official layout with --dry-run; splits."""

import csv
import json

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from train_synth import FAST, run_cli, write_msd, write_official  # noqa: E402


def test_msd_train_then_segment_and_evaluate(tmp_path):
    data = write_msd(tmp_path / "Task01", n=5, size=32)
    run = tmp_path / "run"
    result = run_cli(["train", data, "--output", run, "--iterations", 4, "--val-every", 2, "--save-every", 2, *FAST])
    out = result.stdout
    assert "plan: ROI 32x32x16" in out and "4 training and 1 validation cases" in out, out
    assert "mean Dice" in out and "with background" in out and "without" in out, out
    assert {"best.pt", "last.pt", "train.csv", "val.csv", "config.json"} <= {p.name for p in run.iterdir()}
    with open(run / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == ["2", "4"]
    assert {"mean_dice_with_bg", "mean_dice_no_bg", "dice/background", "dice/fat_like"} <= set(rows[0])
    with open(run / "train.csv") as f:
        train_rows = list(csv.DictReader(f))
    assert len(train_rows) == 4 and float(train_rows[-1]["data_wait_s"]) >= 0
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["format"] == "uxnet-checkpoint" and best["version"] == 2
    prep = best["preprocessing"]
    assert prep["spacing"] == [1.5, 1.5, 1.5] and prep["orientation"] == "RAS"
    assert prep["intensity_range"] == [-125.0, 275.0] and prep["output_range"] == [0.0, 1.0]
    assert prep["class_names"] == ["background", "liver_like", "kidney_like", "fat_like"]
    assert prep["roi_size"] == [32, 32, 16]

    case = json.loads((run / "config.json").read_text())["fingerprint"]["val_cases"][0]  # as the README does
    image, label = data / "imagesTr" / case, data / "labelsTr" / case
    seg = tmp_path / "seg.nii.gz"
    run_cli(["segment", run / "best.pt", image, "-o", seg, "--quiet"])
    import nibabel as nib

    assert nib.load(str(seg)).shape == nib.load(str(image)).shape
    result = run_cli(["evaluate", seg, label, "--classes", 1, 2, 3, "--quiet"])
    assert "mean_dice" in result.stdout


def test_official_layout_dry_run(tmp_path, capsys):
    from uxnet import cli

    data = write_official(tmp_path / "flare", n_train=3, n_val=2, size=32)
    assert cli.main(["train", str(data), "--dry-run", *FAST]) == 0
    out = capsys.readouterr().out
    assert "official layout" in out and "3 training and 2 validation cases" in out, out
    assert "the dataset's validation split" in out
    assert "classes ['0', '1', '2', '3']" in out  # no dataset.json: 0..max label
    assert "plan: ROI 32x32x16" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_plans_with_a_budget(tmp_path, capsys):
    from uxnet import cli

    data = write_msd(tmp_path / "d", n=3, size=32)
    args = [a for a in FAST if a not in ("--budget", "off")]
    assert cli.main(["train", str(data), "--dry-run", *args, "--budget", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "of a 7.45 GiB budget" in out and "because" in out, out


def test_splits_are_seeded_and_folds_partition(tmp_path):
    from uxnet.training.data import discover, split_cases

    ds = discover(write_msd(tmp_path / "d", n=10, size=32, noise=0.0))
    a = split_cases(ds, 0.3, seed=1)
    assert a[:2] == split_cases(ds, 0.3, seed=1)[:2] and len(a[1]) == 3
    assert a[1] != split_cases(ds, 0.3, seed=2)[1]
    vals = [c["image"] for k in range(5) for c in split_cases(ds, fold=k, folds=5)[1]]
    assert sorted(vals) == sorted(c["image"] for c in ds.train)  # every case validated exactly once
    with_val = discover(write_msd(tmp_path / "v", n=3, size=32, n_val=2, noise=0.0))
    train, val, how = split_cases(with_val)
    assert len(train) == 3 and len(val) == 2 and "validation split" in how
