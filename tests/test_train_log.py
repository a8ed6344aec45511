"""``uxnet train``'s run log: plain lines with an ETA when the console is not a terminal, a tqdm bar on a terminal,
train.csv with step, data-wait and CPU time, val.csv with per-class Dice and both means, nothing from ranks > 0."""

import csv
import io

import pytest

from uxnet.training.log import RunLog

NAMES = ["background", "organ"]
SUMMARY = {"dice/background": 0.99, "dice/organ": 0.5, "mean_dice_with_bg": 0.745, "mean_dice_no_bg": 0.5}


class Tty(io.StringIO):
    def isatty(self):
        return True


def _run(tmp_path, stream, enabled=True):
    log = RunLog(tmp_path, NAMES, total=4, enabled=enabled, tensorboard=False, every=2, stream=stream)
    for it in range(1, 5):
        log.step(it, 1.0 / it, 1e-4, 0.5, 0.1, 2, cpu_s=0.9)
    log.validation(4, SUMMARY, 1.5, {"metric": 0.745, "iteration": 4})
    log.close()


def test_plain_lines_with_eta_and_csv(tmp_path):
    out = io.StringIO()
    _run(tmp_path, out)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("iter ")] == ["2/4", "4/4"]
    assert all("ETA" in line and "data wait 100 ms (20%)" in line for line in lines if line.startswith("iter "))
    assert "mean Dice 0.7450 with background, 0.5000 without" in out.getvalue()
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == ["2", "4"] and rows[0]["cpu_s"] == "0.9"
    assert float(rows[0]["data_wait_fraction"]) == pytest.approx(0.2)
    with open(tmp_path / "val.csv") as f:
        val = list(csv.DictReader(f))
    assert val[0]["dice/organ"] == "0.5" and val[0]["mean_dice_no_bg"] == "0.5"


def test_progress_bar_on_a_terminal(tmp_path):
    pytest.importorskip("tqdm")
    out = Tty()
    _run(tmp_path, out)
    text = out.getvalue()
    assert "4/4" in text and ("it/s" in text or "s/it" in text), text  # tqdm's bar with its rate and ETA
    assert "\niter " not in text and "mean Dice 0.7450" in text


def test_other_ranks_write_nothing(tmp_path):
    out = io.StringIO()
    _run(tmp_path, out, enabled=False)
    assert out.getvalue() == "" and list(tmp_path.iterdir()) == []


def test_resumed_log_keeps_the_columns_of_its_file(tmp_path):
    (tmp_path / "train.csv").write_text("iteration,loss,step_s\n1,0.9,0.5\n")
    log = RunLog(tmp_path, NAMES, total=2, start=1, tensorboard=False, every=1, stream=io.StringIO())
    log.step(2, 0.8, 1e-4, 0.4, 0.1, 2, cpu_s=0.7)
    log.close()
    assert (tmp_path / "train.csv").read_text().splitlines() == ["iteration,loss,step_s", "1,0.9,0.5", "2,0.8,0.4"]
