"""`uxnet segment`: sliding-window inference on NIfTI volumes, label maps with the input's geometry, clear errors."""

import re

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from uxnet import UXNet  # noqa: E402
from uxnet import cli  # noqa: E402
from uxnet.inference.segment import STAGES, segment_volume, window_count  # noqa: E402
from uxnet.io.checkpoint import save_checkpoint  # noqa: E402
from uxnet.preprocessing import Preprocessing  # noqa: E402

CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 1, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32)
AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.0, 0.0, 1.5, -30.0], [0.7, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 1.0]])


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Weights perturbed away from init (layer scale 1e-6 would make the encoder invisible)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomised(UXNet(**CONFIG))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return str(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def _write_nifti(path, data, affine=AFFINE, slope=None):
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"uxnet test volume"
    if slope is not None:
        image.header.set_slope_inter(*slope)
    nib.save(image, str(path))
    return str(path)


def _segment(*argv):
    return cli.main(["segment", *map(str, argv)])


def test_single_window_equals_the_model_argmax(model, checkpoint, tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    src = _write_nifti(tmp_path / "in.nii.gz", data)
    out = tmp_path / "labels.nii.gz"
    assert _segment(checkpoint, src, "-o", out, "--roi", 32, "--backend", "reference") == 0
    labels = nib.load(str(out))
    with torch.no_grad():
        want = model(torch.from_numpy(data)[None, None]).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(labels.dataobj), want)
    assert "1/1 windows" in capsys.readouterr().err


def test_multi_window_keeps_geometry_and_header(checkpoint, tmp_path, capsys):
    data = (np.random.default_rng(1).normal(size=(40, 36, 20)) * 300).astype(np.int16)
    src = _write_nifti(tmp_path / "ct.nii.gz", data, slope=(2.0, -1024.0))  # scaled int16, as CT often is
    out = tmp_path / "seg" / "labels.nii.gz"
    code = _segment(checkpoint, src, "-o", out, "--roi", 32, 32, 16, "--overlap", 0.25, "--sw-batch-size", 3,
                    "--stitch-device", "cpu", "--clip", -175, 250, "--percentile-norm")
    assert code == 0, capsys.readouterr().err
    image, labels = nib.load(src), nib.load(str(out))
    assert labels.shape == (40, 36, 20)
    assert np.allclose(labels.affine, AFFINE)
    assert labels.header.get_data_dtype() == np.uint8
    assert labels.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    assert labels.header.get_xyzt_units() == image.header.get_xyzt_units()
    assert np.allclose(labels.header.get_zooms(), image.header.get_zooms())
    assert int(labels.header["qform_code"]) == int(image.header["qform_code"])
    values = np.unique(np.asarray(labels.dataobj))
    assert set(values.tolist()) <= {0, 1, 2}
    err = capsys.readouterr().err
    assert window_count((40, 36, 20), (32, 32, 16), 0.25) == 8  # 2 x 2 x 2 windows
    assert "8/8 windows" in err and "stitching on cpu" in err
    stages = re.search(r"seconds per stage: (.*) \(total ([\d.]+) s\)", err)
    assert stages, err
    named = dict((name, float(t)) for name, t in (part.split() for part in stages.group(1).split(", ")))
    assert set(named) == set(STAGES) and all(t >= 0 for t in named.values())
    assert named["network"] > 0 and abs(sum(named.values()) - float(stages.group(2))) < 0.02


def test_window_count_matches_monai():
    from monai.inferers import sliding_window_inference

    for size, roi, overlap in [((40, 36, 20), (32, 32, 16), 0.25), ((96, 50, 17), (32, 32, 32), 0.5),
                               ((16, 16, 16), (32, 32, 32), 0.5)]:
        calls = []

        def predictor(x):
            calls.append(x.shape[0])
            return x

        sliding_window_inference(torch.zeros(1, 1, *size), roi, 1, predictor, overlap=overlap)
        assert window_count(size, roi, overlap) == sum(calls)


def test_preprocessing_clip_rescale_and_percentiles():
    x = torch.linspace(-1000, 1000, 2001).reshape(1, 1, 1, -1)
    clipped = Preprocessing(intensity_range=(-175, 250), output_range=(0, 1)).apply_intensity(x)
    assert clipped.min() == 0 and clipped.max() == 1
    assert torch.allclose(clipped.flatten()[1000], torch.tensor(175 / 425))  # -> linear in between
    only_clipped = Preprocessing(intensity_range=(-175, 250)).apply_intensity(x)
    assert only_clipped.min() == -175 and only_clipped.max() == 250
    unclipped = Preprocessing(intensity_range=(-175, 250), output_range=(0, 1), clip=False).apply_intensity(x)
    assert torch.allclose(unclipped.flatten()[[0, -1]], torch.tensor([-825 / 425, 1 + 750 / 425]))
    normed = Preprocessing(percentile_norm=(1, 99)).apply_intensity(x)
    assert torch.isclose(normed.flatten()[20], torch.tensor(0.0), atol=1e-6)  # X_1 = -980
    assert torch.isclose(normed.flatten()[1980], torch.tensor(1.0), atol=1e-6)  # X_99 = 980


def test_stitching_on_cpu_matches_stitching_on_device(model):
    volume = torch.randn(1, 48, 40, 36)
    a = segment_volume(model, volume, (32, 32, 32), 0.5, 2, "cpu", "cpu")
    b = segment_volume(model, volume, (32, 32, 32), 0.5, 1, "cpu", None)
    assert a.shape == (48, 40, 36) and torch.equal(a, b)


def test_rep_branch_checkpoint_is_reparameterised(tmp_path):
    torch.manual_seed(3)
    rep = _randomised(UXNet(**CONFIG, rep_branches=[(3, 1)]))
    ckpt = save_checkpoint(rep, tmp_path / "rep.pt")
    data = np.random.default_rng(2).normal(size=(32, 32, 32)).astype(np.float32)
    out = tmp_path / "labels.nii.gz"
    assert _segment(ckpt, _write_nifti(tmp_path / "in.nii.gz", data), "-o", out, "--roi", 32, "--quiet") == 0
    with torch.no_grad():
        want = rep(torch.from_numpy(data)[None, None]).argmax(1)[0].numpy()
    agree = (np.asarray(nib.load(str(out)).dataobj) == want).mean()
    assert agree > 0.999  # the plain model equals the branched one to float32 rounding (argmax ties aside)


def _expect_error(capsys, argv, message):
    assert _segment(*argv) == 2
    err = capsys.readouterr().err
    # progress/notes may come first; the error is the rest of the output
    error = err[err.find("uxnet segment: error: "):]
    assert err.count("uxnet segment: error: ") == 1 and message in error, err
    assert "Traceback" not in err


def test_clear_errors(checkpoint, tmp_path, capsys):
    vol = _write_nifti(tmp_path / "vol.nii.gz", np.zeros((32, 32, 32), np.float32))
    out = tmp_path / "o.nii.gz"
    _expect_error(capsys, [tmp_path / "missing.pt", vol, "-o", out], "does not exist")
    _expect_error(capsys, [checkpoint, tmp_path / "missing.nii.gz", "-o", out], "does not exist")
    flat = _write_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.float32))
    _expect_error(capsys, [checkpoint, flat, "-o", out], "expected a 3D volume")
    two_channels = _write_nifti(tmp_path / "two.nii.gz", np.zeros((32, 32, 32, 2), np.float32))
    _expect_error(capsys, [checkpoint, two_channels, "-o", out], "2 channel(s) but the checkpoint's model expects "
                                                                 "in_chans=1")
    _expect_error(capsys, [checkpoint, vol, "-o", out, "--roi", 40], "multiples of 16")
    not_nifti = tmp_path / "text.nii.gz"
    not_nifti.write_text("hello")
    _expect_error(capsys, [checkpoint, not_nifti, "-o", out], "cannot read")

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["feat_size"] = [8, 16, 16, 48]
    mismatched = tmp_path / "mismatch.pt"
    torch.save(state, mismatched)
    _expect_error(capsys, [mismatched, vol, "-o", out], "do not match")
    assert not out.exists()
