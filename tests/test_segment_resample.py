"""``uxnet segment`` with the preprocessing recorded in the checkpoint (issue 13): the volume goes to the training
spacing and orientation, the prediction comes back onto the input's exact grid; several inputs, overrides, notes.

The model is a UXNet set by hand to threshold intensity at 0.5 (batch norm in eval mode with identity statistics,
one path from the input through ``encoder1``, ``decoder2``, ``decoder1`` to ``out``; every other weight zero), so
the expected segmentation of a synthetic sphere is known in the input's grid whatever the model grid is.
"""

import re

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from uxnet import UXNet, cli  # noqa: E402
from uxnet.inference.segment import segment_image  # noqa: E402
from uxnet.io.checkpoint import CheckpointError, load_preprocessing, read_checkpoint, save_checkpoint  # noqa: E402
from uxnet.preprocessing import Preprocessing  # noqa: E402

FEAT = (8, 16, 16, 32)
# voxel axis 0 -> +z (0.8 mm), axis 1 -> -x (0.8 mm), axis 2 -> +y (2.5 mm): orientation "SLA", anisotropic
AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.0, 0.0, 2.5, -30.0], [0.8, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (48, 40, 20)
SPHERE_HU, BACKGROUND_HU = 200.0, -100.0
TRAINED_WITH = Preprocessing(spacing=(1.6, 1.6, 1.6), orientation="RAS", intensity_range=(BACKGROUND_HU, SPHERE_HU),
                             output_range=(0.0, 1.0), roi_size=(32, 32, 32), class_names=("background", "sphere"))


def threshold_model(threshold: float = 0.5) -> UXNet:
    """A UXNet whose class-1 logit is ``c * (x - threshold)`` voxel by voxel (c > 0; class 0: logit 0).

    Two channels carry ``x - t`` and ``t - x`` through three leaky ReLUs each (encoder1, decoder2's block, decoder1's
    identity shortcut); their difference ``l(l(l(z))) - l(l(l(-z)))`` is linear in ``z``, so the logits are linear
    in the intensity and resampling them keeps the threshold where resampling the intensity would put it."""
    model = UXNet(in_chans=1, out_chans=2, depths=(1, 1, 1, 1), feat_size=FEAT, hidden_size=32, norm_name="batch")
    f0 = FEAT[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        enc = model.encoder1.layer  # lrelu(norm2(conv2(.)) + norm3(conv3(x))) with conv1/conv2 zero
        up = model.decoder2.conv_block  # its input is cat(transp_conv(dec1) = 0, enc1): enc1 channel c is f0 + c
        for c, sign in ((0, 1.0), (1, -1.0)):
            enc.conv3.conv.weight[c, 0] = sign
            enc.norm3.weight[c], enc.norm3.bias[c] = 1.0, -sign * threshold
            up.conv3.conv.weight[c, f0 + c] = 1.0
            up.norm3.weight[c] = 1.0
            model.out.conv.conv.weight[1, c] = sign  # decoder1 has an identity shortcut: lrelu(0 + x)
    return model.eval()


def _world(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def sphere(shape=SHAPE, affine=AFFINE, radius_mm=10.0):
    """(image in HU, mask) of a sphere off the volume's centre (so a flipped axis would move it)."""
    centre = np.array([22.0, 17.0, 11.0]) @ affine[:3, :3].T + affine[:3, 3]
    mask = np.linalg.norm(_world(shape, affine) - centre, axis=-1) <= radius_mm
    return np.where(mask, SPHERE_HU, BACKGROUND_HU).astype(np.float32), mask


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _nifti(path, data, affine=AFFINE):
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_checkpoint(threshold_model(), tmp_path_factory.mktemp("ckpt") / "sphere.pt", TRAINED_WITH))


def _model_grid_shape(err):
    return tuple(int(v) for v in re.search(r"resampled \(48, 40, 20\) -> \((\d+), (\d+), (\d+)\) voxels", err).groups())


def _segment(*argv):
    return cli.main(["segment", *map(str, argv)])


def test_hand_set_model_thresholds_voxelwise():
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        labels = threshold_model()(x).argmax(1)
    assert torch.equal(labels, (x[:, 0] > 0.5 * np.sqrt(1 + 1e-5)).long())


def test_round_trip_keeps_shape_affine_and_the_sphere_in_place(checkpoint, tmp_path, capsys):
    image, mask = sphere()
    src = _nifti(tmp_path / "ct.nii.gz", image)
    out = tmp_path / "seg.nii.gz"
    assert _segment(checkpoint, src, "-o", out, "--overlap", 0.25) == 0, capsys.readouterr().err
    labels = nib.load(str(out))
    assert labels.shape == SHAPE
    np.testing.assert_allclose(labels.affine, AFFINE, atol=1e-6)
    got = np.asarray(labels.dataobj)
    assert set(np.unique(got).tolist()) == {0, 1}
    d = dice(got == 1, mask)
    assert d >= 0.95, d
    err = capsys.readouterr().err
    # the model ran on the 1.6 mm RAS grid: x from axis 1 (40 x 0.8 mm), y from axis 2 (20 x 2.5), z from axis 0
    # (48 x 0.8); MONAI may add a voxel where the float32 NIfTI affine makes an extent a hair longer
    model_shape = _model_grid_shape(err)
    assert all(0 <= got - want <= 1 for got, want in zip(model_shape, (20, 31, 24))), err
    assert "windows of (32, 32, 32)" in err and "RAS, spacing 1.6 x 1.6 x 1.6 mm" in err
    assert "sphere: " in err and "peak memory cpu" in err


@pytest.mark.parametrize("invert,floor", [("scores", 0.95), ("labels", 0.9)])
def test_python_api_both_inverse_modes(invert, floor):
    image, mask = sphere()
    result = segment_image(threshold_model(), torch.from_numpy(image)[None], AFFINE, TRAINED_WITH, (16, 16, 16),
                           0.25, 4, invert=invert)
    assert result.labels.shape == SHAPE and result.model_shape == (20, 31, 24)
    d = dice(result.labels.numpy() == 1, mask)
    assert d >= floor, (invert, d)


def test_no_resample_and_spacing_override(checkpoint, tmp_path, capsys):
    image, mask = sphere()
    src = _nifti(tmp_path / "ct.nii.gz", image)
    assert _segment(checkpoint, src, "-o", tmp_path / "a.nii.gz", "--no-resample") == 0
    assert "(48, 40, 20) voxels" in capsys.readouterr().err
    assert dice(np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj) == 1, mask) > 0.99  # no interpolation
    assert _segment(checkpoint, src, "-o", tmp_path / "b.nii.gz", "--spacing", 2.5, 2.5, 2.5,
                    "--orientation", "LPS") == 0
    err = capsys.readouterr().err
    assert "LPS, spacing 2.5 x 2.5 x 2.5 mm" in err, err
    assert all(0 <= got - want <= 1 for got, want in zip(_model_grid_shape(err), (13, 20, 15))), err
    b = nib.load(str(tmp_path / "b.nii.gz"))
    assert b.shape == SHAPE and dice(np.asarray(b.dataobj) == 1, mask) > 0.9


def test_folder_and_several_files_with_progress(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, shape in (("a.nii.gz", SHAPE), ("b.nii", (32, 24, 16))):
        _nifti(folder / name, sphere(shape)[0])
    (folder / "notes.txt").write_text("not an image")
    assert _segment(checkpoint, folder, "-o", tmp_path / "out") == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "[1/2] a.nii.gz" in err and "[2/2] b.nii" in err and err.count("peak memory") == 2
    assert nib.load(str(tmp_path / "out" / "a.nii.gz")).shape == SHAPE
    assert nib.load(str(tmp_path / "out" / "b.nii")).shape == (32, 24, 16)
    assert _segment(checkpoint, folder / "a.nii.gz", folder / "b.nii", "-o", tmp_path / "out2", "--quiet") == 0
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a.nii.gz", "b.nii"]


def _expect_error(capsys, argv, message):
    assert _segment(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("uxnet segment: error: ") == 1 and message in err[err.find("uxnet segment: error: "):], err
    assert "Traceback" not in err


def test_bad_options_and_inputs(checkpoint, tmp_path, capsys):
    src = _nifti(tmp_path / "ct.nii.gz", sphere()[0])
    _expect_error(capsys, [checkpoint, src, "-o", tmp_path / "o.nii.gz", "--no-resample", "--spacing", 1, 1, 1],
                  "--no-resample cannot be combined")
    _expect_error(capsys, [checkpoint, src, "-o", tmp_path / "o.nii.gz", "--orientation", "RAX"],
                  "orientation must be 3 letters")
    _expect_error(capsys, [checkpoint, src, "-o", tmp_path / "o.nii.gz", "--spacing", 1, 0, 1],
                  "spacing must be positive")
    _expect_error(capsys, [checkpoint, src, src, "-o", tmp_path / "o.nii.gz"], "is a file name, but there are 2")
    _expect_error(capsys, [checkpoint, src, src, "-o", tmp_path / "dir"], "share the file name")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(capsys, [checkpoint, empty, "-o", tmp_path / "dir"], "holds no .nii or .nii.gz files")


def test_checkpoint_without_preprocessing_gets_a_note(tmp_path, capsys):
    ckpt = save_checkpoint(threshold_model(), tmp_path / "plain.pt")
    image, mask = sphere()
    src = _nifti(tmp_path / "ct.nii.gz", (image - BACKGROUND_HU) / (SPHERE_HU - BACKGROUND_HU))
    assert _segment(ckpt, src, "-o", tmp_path / "o.nii.gz", "--roi", 32, "--quiet") == 0
    err = capsys.readouterr().err
    assert "note: the checkpoint records no preprocessing" in err and "segmented on its own grid" in err
    assert dice(np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj) == 1, mask) > 0.99


# ---- the checkpoint's preprocessing record ------------------------------------------------------------------

def test_preprocessing_round_trips_through_the_checkpoint(checkpoint):
    ckpt = read_checkpoint(checkpoint)
    assert ckpt["version"] == 2 and ckpt["preprocessing"]["class_names"] == ["background", "sphere"]
    assert load_preprocessing(checkpoint) == TRAINED_WITH
    assert Preprocessing.from_dict(TRAINED_WITH.to_dict()) == TRAINED_WITH


def test_version_1_checkpoint_still_loads(tmp_path):
    ckpt = read_checkpoint(save_checkpoint(threshold_model(), tmp_path / "v2.pt"))
    v1 = {k: v for k, v in ckpt.items() if k != "preprocessing"}
    v1["version"] = 1
    torch.save(v1, tmp_path / "v1.pt")
    assert load_preprocessing(tmp_path / "v1.pt") is None
    assert read_checkpoint(tmp_path / "v1.pt")["preprocessing"] is None


def test_invalid_preprocessing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="3 class_names for a model with out_chans=2"):
        save_checkpoint(threshold_model(), tmp_path / "x.pt", Preprocessing(class_names=("a", "b", "c")))
    ckpt = read_checkpoint(save_checkpoint(threshold_model(), tmp_path / "x.pt"))
    ckpt["preprocessing"] = {"spacing": [1, 1], "bogus": 1}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"invalid preprocessing: .*unknown keys \['bogus'\]"):
        read_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="output_range needs an intensity_range"):
        Preprocessing(output_range=(0, 1))
