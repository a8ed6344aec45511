"""``uxnet train --init``: finetuning from a uxnet checkpoint or an official (bare, DataParallel-prefixed)
state_dict on a dataset with another class count replaces the output head and the deep-supervision heads, keeps every
other tensor, takes the architecture from the checkpoint, and says which keys it kept."""

import json

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from train_synth import FAST, TINY_MODEL, write_msd  # noqa: E402

ARCH = dict(feat_size=[4, 8, 16, 32], hidden_size=32, depths=[1, 1, 1, 1])
NO_MODEL_FLAGS = FAST[:len(FAST) - len(TINY_MODEL)]  # FAST ends with the tiny model's flags
# one step of AdamW with a vanishing learning rate: the kept weights stay those of the checkpoint
ARGS = ["--iterations", 1, "--val-every", 1, "--lr", "1e-12", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    root = write_msd(tmp_path_factory.mktemp("ft") / "d", n=3, size=32)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["4"] = "extra"  # the labels hold 0..3: a 5-class task
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _args(*extra):
    out = [str(a) for a in (*NO_MODEL_FLAGS, *ARGS, *extra)]
    i = out.index("--lr")
    if out.count("--lr") > 1:  # FAST's --lr, then ours: keep ours
        del out[i:i + 2]
    return out


def test_head_swap_from_a_uxnet_checkpoint_with_deep_supervision(tmp_path, capsys, five_classes):
    from uxnet import UXNet, cli, save_checkpoint

    torch.manual_seed(1)
    source = UXNet(in_chans=1, out_chans=4, deep_supervision=True, **ARCH)
    ck = save_checkpoint(source, tmp_path / "four.pt")
    run = tmp_path / "run"
    assert cli.main(["train", str(five_classes), "--output", str(run), "--init", str(ck), "--deep-supervision",
                     *_args()]) == 0
    out = capsys.readouterr().out
    heads = ["out.conv.conv.weight", "out.conv.conv.bias"] + [f"deep_supervision_heads.{i}.{p}" for i in range(3)
                                                             for p in ("weight", "bias")]
    n_kept = len(source.state_dict()) - len(heads)
    assert f"kept {n_kept} of {len(source.state_dict())} tensors (uxnet_3d " in out, out
    assert "replaced for 5 classes" in out and all(h in out for h in heads), out
    assert "hidden_size=32" in out and "feat_size=[4, 8, 16, 32]" in out  # the architecture of the checkpoint
    keys = json.loads((run / "init_keys.json").read_text())
    assert sorted(keys["replaced"]) == sorted(heads) and len(keys["kept"]) == n_kept and keys["absent"] == []

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["config"]["out_chans"] == 5
    assert best["preprocessing"]["class_names"][-1] == "extra"
    for key in keys["kept"]:
        torch.testing.assert_close(best["state_dict"][key], source.state_dict()[key], rtol=0, atol=1e-9, msg=key)
    assert best["state_dict"]["out.conv.conv.weight"].shape[0] == 5


def test_official_state_dict_same_classes_keeps_everything(tmp_path, capsys, five_classes):
    from uxnet import UXNet, cli

    torch.manual_seed(2)
    source = UXNet(in_chans=1, out_chans=5, **ARCH)
    # as the official main_train.py saves it under DataParallel: a bare state_dict with the module. prefix
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "official.pth")
    run = tmp_path / "run"
    assert cli.main(["train", str(five_classes), "--output", str(run), "--init", str(tmp_path / "official.pth"),
                     *_args()]) == 0
    out = capsys.readouterr().out
    n = len(source.state_dict())
    assert f"kept {n} of {n} tensors" in out and "replaced" not in out.split("--init")[1].split("\n")[0], out
    best = torch.load(run / "best.pt", weights_only=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(best["state_dict"][key], value, rtol=0, atol=1e-9, msg=key)


def test_init_with_another_architecture_is_refused(tmp_path, capsys, five_classes):
    from uxnet import UXNet, cli, save_checkpoint

    ck = save_checkpoint(UXNet(in_chans=1, out_chans=4, **ARCH), tmp_path / "four.pt")
    code = cli.main(["train", str(five_classes), "--output", str(tmp_path / "run"), "--init", str(ck),
                     *_args("--hidden-size", "48")])
    err = capsys.readouterr().err
    assert code == 2 and "architecture differs" in err and "encoder5" in err, err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    code = cli.main(["train", str(five_classes), "--output", str(tmp_path / "run2"), "--init",
                     str(tmp_path / "junk.pt"), *_args()])
    assert code == 2 and "--init" in capsys.readouterr().err
