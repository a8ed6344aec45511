"""Resumable training: a run killed (SIGKILL) at a random moment and resumed with --resume ends with bitwise the
same weights, optimizer state and validation history as an uninterrupted run (float64, one thread, workers 0:
sample k of the stream depends only on (seed, k)); a resume with another configuration says what differs; a failed
checkpoint write (disk full) leaves the previous checkpoint intact."""

import errno
import random
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from train_synth import FAST, cli_env, run_cli, write_msd  # noqa: E402

ITERS = 8
ARGS = ["--iterations", ITERS, "--val-every", 5, "--save-every", 2, "--dtype", "float64", "--threads", 1, *FAST]


def _same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] == ITERS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in pa:
            assert torch.equal(torch.as_tensor(pa[name]), torch.as_tensor(pb[name])), name
    assert a["history"] == b["history"] and a["best"] == b["best"]


def test_killed_run_resumes_bitwise(tmp_path):
    data = write_msd(tmp_path / "d", n=4, size=32)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli(["train", data, "--output", full, *ARGS])

    cmd = [sys.executable, "-m", "uxnet.cli", "train", str(data), "--output", str(killed), *map(str, ARGS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 1.0))  # anywhere in the following steps, or inside a checkpoint write
    proc.kill()
    proc.wait()
    state = torch.load(killed / "last.pt", weights_only=False)  # never damaged
    assert 2 <= state["iteration"] < ITERS, ("the run finished before the kill; make it longer", state["iteration"])

    result = run_cli(["train", data, "--resume", killed, *ARGS])
    assert f"resumed {killed} at iteration {state['iteration']}" in result.stdout
    _same_state(torch.load(full / "last.pt", weights_only=False), torch.load(killed / "last.pt", weights_only=False))
    assert not list(killed.glob(".*tmp*"))



def test_resume_refuses_another_configuration_and_overwriting(tmp_path, capsys):
    from uxnet import cli

    data = write_msd(tmp_path / "d", n=3, size=32)
    run = tmp_path / "run"
    args = [str(a) for a in ARGS]
    args[args.index("--iterations") + 1] = "2"
    assert cli.main(["train", str(data), "--output", str(run), *args]) == 0
    capsys.readouterr()
    assert cli.main(["train", str(data), "--resume", str(run), *args, "--lr", "1e-3", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "recipe.lr: 0.003 then, 0.001 now" in err, err
    assert "seed: 0 then, 3 now" in err
    # longer training and other validation intervals are fine
    assert cli.main(["train", str(data), "--resume", str(run), *args, "--iterations", "3"]) == 0
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 3
    capsys.readouterr()
    # an existing run is not overwritten
    assert cli.main(["train", str(data), "--output", str(run), *args]) == 2
    assert "--resume" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    from uxnet.training import TrainError
    from uxnet.training import checkpoint as ckpt

    ckpt.save_last(tmp_path, {"format": ckpt.STATE_FORMAT, "iteration": 1})

    def disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainError, match="No space left on device.*previous file is intact"):
        ckpt.save_last(tmp_path, {"format": ckpt.STATE_FORMAT, "iteration": 2})
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=False)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
