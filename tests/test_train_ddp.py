"""``uxnet train`` under torchrun: 2 CPU ranks (gloo) of batch 1 end with the same weights, optimizer state and
validation history as one process of batch 2 (float64, so only the order of the gradient sum differs); rank 0 alone
writes the run folder."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from train_synth import FAST, REPO, cli_env, run_cli, write_msd  # noqa: E402

ITERS = 3
ARGS = ["--iterations", ITERS, "--val-every", ITERS, "--save-every", ITERS, "--dtype", "float64", "--threads", 1,
        *FAST]


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    data = write_msd(tmp_path / "d", n=4, size=32)
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(["train", data, "--output", one, "--batch", 2, *ARGS])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "uxnet.cli",
           "train", str(data), "--output", str(two), "--batch", "1", *map(str, ARGS)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "processes: 2 on cpu; a step sees 2 volume(s)" in result.stdout, result.stdout
    assert result.stdout.count("dataset: ") == 1  # rank 0 alone reports

    a = torch.load(one / "last.pt", weights_only=False)
    b = torch.load(two / "last.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == ITERS
    for key, value in a["model"].items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(b["model"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            torch.testing.assert_close(torch.as_tensor(sb[name]), torch.as_tensor(sa[name]), rtol=1e-10, atol=1e-14)
    assert [h["iteration"] for h in a["history"]] == [h["iteration"] for h in b["history"]] == [ITERS]
    for key in a["history"][0]:
        assert b["history"][0][key] == pytest.approx(a["history"][0][key], abs=1e-6), key
    # the logged loss is the mean over the ranks: the one-process loss
    loss = lambda out: [line.split("loss ")[1].split()[0] for line in out.splitlines() if line.startswith("iter ")]  # noqa: E731
    assert loss(result.stdout) == loss(single.stdout)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
