"""``uxnet train`` refuses bad input before training, with a message that says what and where: one row per case of
issue 22 (dataset.json missing or malformed, images without labels, unreadable files, shape or affine mismatch,
labels outside the class list, empty splits, ROI not a multiple of 16 or bigger than every volume, a budget nothing
fits, explicit flags that do not fit), then a checkpoint write that fails on a full disk mid-run."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from train_synth import FAST, write_msd, write_official  # noqa: E402

NO_BUDGET = [a for a in FAST if a not in ("--budget", "off")]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    return write_msd(root / "msd", n=3, size=32), write_official(root / "official", n_train=2, n_val=1, size=32)


def _json(root, edit):
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _relabel(root, case, array=None, affine_shift=0.0):
    path = root / "labelsTr" / f"{case}.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj) if array is None else array(np.asarray(img.dataobj))
    affine = img.affine.copy()
    affine[0, 3] += affine_shift
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _no_label_entry(meta):
    del meta["training"][1]["label"]


def _label_of_other_shape(root):
    _relabel(root, "case_001", array=lambda a: a[:, :, :30])


def _shifted_label(root):
    _relabel(root, "case_002", affine_shift=2.0)


def _label_out_of_classes(root):
    _relabel(root, "case_000", array=lambda a: np.where(a == 3, 7, a).astype(a.dtype))


def _missing_label_file(root):
    (root / "labelsTr" / "case_001.nii.gz").unlink()


def _damaged_image(root):
    (root / "imagesTr" / "case_002.nii.gz").write_bytes(b"not a nifti file")


def _official_unpaired(root):
    (root / "labelsTr" / "cTr01.nii.gz").unlink()


# (id, layout, change to the clean dataset, extra arguments, expected words in the error)
CASES = [
    ("no-dataset-json", "msd", lambda r: (r / "dataset.json").unlink() or shutil.rmtree(r / "imagesTr"), [],
     "is not a dataset: expected an MSD folder"),
    ("malformed-json", "msd", lambda r: (r / "dataset.json").write_text("{'training': ["), [], "not valid JSON"),
    ("json-without-labels", "msd", lambda r: _json(r, lambda m: m.pop("labels")), [], "missing ['labels']"),
    ("json-bad-labels", "msd", lambda r: _json(r, lambda m: m.update(labels={"0": "bg", "2": "x"})), [],
     "number the classes 0..K-1 without gaps"),
    ("json-training-not-a-list", "msd", lambda r: _json(r, lambda m: m.update(training="imagesTr")), [],
     "'training' must be a list"),
    ("image-without-label-entry", "msd", lambda r: _json(r, _no_label_entry), [],
     "has no 'label' path: every training image needs its label"),
    ("label-file-missing", "msd", _missing_label_file, [], "case_001.nii.gz: file does not exist"),
    ("official-image-without-label", "official", _official_unpaired, [],
     "without a label of the same name in"),
    ("unreadable-image", "msd", _damaged_image, [], "case_002.nii.gz: not a readable NIfTI file"),
    ("shape-mismatch", "msd", _label_of_other_shape, [], "case_001.nii.gz: image shape (32, 32, 32) but label"),
    ("affine-mismatch", "msd", _shifted_label, [], "case_002.nii.gz: image and label affines differ (by up to 2 mm)"),
    ("labels-outside-classes", "msd", _label_out_of_classes, [], "label values [7] outside the class list 0..3"),
    ("empty-training-list", "msd", lambda r: _json(r, lambda m: m.update(training=[])), [],
     "the training split is empty"),
    ("empty-validation-split", "msd", None, ["--val-fraction", "0.1"], "leaves an empty validation split"),
    ("empty-fold", "msd", None, ["--fold", "0", "--folds", "5"], "more than the 3 training cases"),
    ("fold-with-own-split", "official", None, ["--fold", "1"], "has its own validation split"),
    ("roi-not-multiple-of-16", "msd", None, ["--roi", "40", "32", "16"], "multiples of 16"),
    ("roi-bigger-than-every-volume", "msd", None, ["--roi", "80"], "is bigger than every volume"),
    ("budget-nothing-fits", "msd", None, ["--budget", "1MB"],
     "nothing fits the memory budget"),
    ("explicit-flags-do-not-fit", "msd", None, ["--budget", "20MB", "--roi", "32", "32", "32", "--batch", "4"],
     "explicitly set: --roi, --batch"),
    ("bad-budget", "msd", None, ["--budget", "lots"], "--budget"),
    ("flip-prob-out-of-range", "msd", None, ["--flip-prob", "1.5"], "--flip-prob must be in [0, 1]"),
    ("bad-model-options", "msd", None, ["--rep-branches", "5", "2"], "model options: UXNet: rep branch (5, 2)"),
]


@pytest.mark.parametrize("name,layout,change,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_training(tmp_path, capsys, clean, name, layout, change, extra, expected):
    from uxnet import cli

    data = tmp_path / "data"
    shutil.copytree(clean[0] if layout == "msd" else clean[1], data)
    if change is not None:
        change(data)
    run = tmp_path / "run"
    budget = NO_BUDGET if "--budget" in extra else FAST
    code = cli.main(["train", str(data), "--output", str(run), *budget, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("uxnet train: error: ") and expected in err, err
    assert not run.exists()  # refused before anything was written


def test_full_disk_mid_run_keeps_the_previous_checkpoint(tmp_path, capsys, clean, monkeypatch):
    from uxnet import cli
    from uxnet.training import checkpoint as ckpt

    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == ckpt.STATE_FORMAT:
            calls.append(obj["iteration"])
            if len(calls) == 2:  # the second last.pt: the disk is full half-way through the write
                with open(path, "wb") as f:
                    f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code = cli.main(["train", str(clean[0]), "--output", str(run), "--iterations", "3", "--val-every", "10",
                     "--save-every", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "previous file is intact" in err, err
    monkeypatch.undo()
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 1
    assert not list(run.glob(".*tmp*"))
