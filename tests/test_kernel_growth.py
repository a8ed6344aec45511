"""Kernel growth (issue 13): ``uxnet.grow_kernel`` and ``uxnet convert``. Every tensor but the UX blocks' depthwise
kernels is copied bit for bit; each grown kernel keeps its per-channel sum, so on a constant input it gives the old
conv's output at every voxel whose new (larger) window stays inside the volume."""

import pytest
import torch
import torch.nn.functional as F

from uxnet import UXNet, cli, grow_kernel, reparameterize
from uxnet.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from uxnet.networks.kernel_growth import UX_BLOCK_DWCONV_WEIGHT, grow_depthwise_kernel
from uxnet.preprocessing import Preprocessing

CONFIG = dict(in_chans=1, out_chans=3, depths=(1, 2, 1, 1), feat_size=(8, 16, 16, 32), hidden_size=32)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _dwconv_keys(model):
    return [k for k in model.state_dict() if UX_BLOCK_DWCONV_WEIGHT.match(k)]


@pytest.mark.parametrize("new", [13, 21, (9, 13, 7)])
def test_other_tensors_bit_identical_and_kernel_sums_kept(new):
    model = _perturbed(UXNet(**CONFIG, deep_supervision=True)).double()
    grown = grow_kernel(model, new)
    new3 = (new,) * 3 if isinstance(new, int) else new
    assert grown.config == dict(model.config, kernel_size=new if isinstance(new, int) else list(new))
    old_state, new_state = model.state_dict(), grown.state_dict()
    assert set(old_state) == set(new_state)
    dw = _dwconv_keys(model)
    assert len(dw) == 5  # one per UX block
    for key, value in old_state.items():
        if key in dw:
            assert new_state[key].shape == (value.shape[0], 1, *new3)
            assert torch.allclose(new_state[key].sum(dim=(1, 2, 3, 4)), value.sum(dim=(1, 2, 3, 4)),
                                  rtol=0, atol=1e-12), key
        else:
            assert new_state[key].dtype == value.dtype and torch.equal(new_state[key], value), key
    assert new_state["uxnet_3d.downsample_layers.0.0.weight"].shape[2:] == (7, 7, 7)  # the stem is not depthwise


def test_float32_sums_to_rounding():
    w = torch.randn(16, 1, 7, 7, 7)
    grown = grow_depthwise_kernel(w, (13, 13, 13))
    assert grown.dtype == torch.float32
    assert torch.allclose(grown.double().sum(dim=(1, 2, 3, 4)), w.double().sum(dim=(1, 2, 3, 4)), atol=1e-5)


@pytest.mark.parametrize("new", [(13, 13, 13), (9, 15, 11)])
def test_grown_conv_matches_on_constant_input_away_from_the_border(new):
    channels, old = 6, (7, 7, 7)
    weight, bias = torch.randn(channels, 1, *old, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    grown = grow_depthwise_kernel(weight, new)
    size = (24, 26, 22)
    x = torch.randn(1, channels, 1, 1, 1, dtype=torch.float64).expand(1, channels, *size).contiguous()

    def conv(w):
        return F.conv3d(x, w, bias, padding=tuple(k // 2 for k in w.shape[2:]), groups=channels)

    want, got = conv(weight), conv(grown)
    interior = tuple(slice(k // 2, s - k // 2) for k, s in zip(new, size))
    assert torch.allclose(got[(..., *interior)], want[(..., *interior)], rtol=0, atol=1e-12)
    assert not torch.allclose(got, want, atol=1e-3)  # near the zero-padded border the larger window differs


def test_interpolation_is_trilinear_and_stretches_the_kernel():
    # a kernel linear in the tap position stays linear (trilinear interpolation reproduces it), stretched to the new
    # extent; the density scaling and the even remainder only add a constant and scale it
    ramp = torch.arange(7, dtype=torch.float64).reshape(1, 1, 7, 1, 1).expand(1, 1, 7, 7, 7) - 3.0
    grown = grow_depthwise_kernel(ramp + 1.0, (13, 7, 7))
    steps = grown[0, 0, :, 3, 3].diff()
    assert torch.allclose(steps[1:-1], steps[1:-1].mean(), atol=1e-12) and steps.mean() > 0
    constant = torch.full((2, 1, 7, 7, 7), 0.5, dtype=torch.float64)
    want = torch.full((2, 1, 21, 21, 21), 0.5 * 343 / 9261, dtype=torch.float64)
    assert torch.allclose(grow_depthwise_kernel(constant, (21, 21, 21)), want)


def test_branch_and_prior_models_are_merged_first():
    model = _perturbed(UXNet(**CONFIG, rep_branches=[(3, 1), (5, 1, True)], kernel_prior="distance")).train()
    grown = grow_kernel(model, 13)
    assert grown.training, "the result keeps the model's mode"
    assert "rep_branches" not in grown.config and "kernel_prior" not in grown.config
    merged = reparameterize(model, fold_norms=False).state_dict()
    for key, value in merged.items():
        if UX_BLOCK_DWCONV_WEIGHT.match(key):
            assert torch.allclose(grown.state_dict()[key].double().sum(dim=(1, 2, 3, 4)),
                                  value.double().sum(dim=(1, 2, 3, 4)), atol=1e-5)
        else:
            assert torch.equal(grown.state_dict()[key], value), key
    # every tensor outside the blocks' convs is the training model's own (the merge leaves them unchanged)
    own = model.state_dict()
    assert all(torch.equal(grown.state_dict()[k], own[k]) for k in merged if ".dwconv." not in k)


def test_bad_kernel_sizes():
    model = UXNet(**CONFIG)
    with pytest.raises(ValueError, match="smaller than the model's kernel"):
        grow_kernel(model, 5)
    with pytest.raises(ValueError, match="odd positive int"):
        grow_kernel(model, 12)
    with pytest.raises(TypeError, match="expected a uxnet.UXNet"):
        grow_kernel(torch.nn.Conv3d(1, 1, 3), 9)


def test_convert_command(tmp_path, capsys):
    model = _perturbed(UXNet(**CONFIG))
    prep = Preprocessing(spacing=(1.5, 1.5, 2.0), orientation="RAS", class_names=("bg", "a", "b"))
    src = save_checkpoint(model, tmp_path / "k7.pt", prep)
    out = tmp_path / "k13.pt"
    assert cli.main(["convert", str(src), "--kernel-size", "13", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grew 5 depthwise kernels (7, 7, 7) -> (13, 13, 13)" in printed
    grown = load_checkpoint(out)
    assert grown.config["kernel_size"] == 13 and read_checkpoint(out)["preprocessing"] == prep.to_dict()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(grown(x), grow_kernel(model.eval(), 13)(x))
    for argv, message in ([str(src), "--kernel-size", "5"], "smaller than the model's kernel"), \
                         ([str(src), "--kernel-size", "13", "13"], "takes 1 or 3 values"), \
                         ([str(tmp_path / "missing.pt"), "--kernel-size", "13"], "does not exist"):
        assert cli.main(["convert", *argv, "-o", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("uxnet convert: error: ") and message in err and "Traceback" not in err
