"""Run logging: ``train.csv`` (loss, learning rate, step time and data-wait time per logged iteration),
``val.csv`` (per-class Dice and both means per validation), TensorBoard scalars when ``tensorboard`` is installed,
and the console: a tqdm bar with ETA on a TTY, plain lines otherwise. Only rank 0 logs (``enabled=False``
elsewhere)."""

import csv
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


class CsvLog:
    """Appends rows of a fixed header to ``path`` (header written once; resumed runs append)."""

    def __init__(self, path, header: List[str]):
        self.path = Path(path)
        self.header = list(header)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:  # a resumed run keeps the columns its file has (a run begun by another uxnet version)
            with open(self.path, newline="") as f:
                self.header = next(csv.reader(f), None) or self.header
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(self.header)
            self._file.flush()

    def write(self, row: Dict[str, object]) -> None:
        self._writer.writerow([_fmt(row.get(k, "")) for k in self.header])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def tensorboard_writer(log_dir):
    """A ``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


class RunLog:
    """Everything a run reports. ``enabled=False`` (ranks > 0) makes every method a no-op."""

    TRAIN_HEADER = ["iteration", "loss", "lr", "step_s", "data_wait_s", "data_wait_fraction", "crops_per_s",
                    "cpu_s", "elapsed_s"]

    def __init__(self, run_dir, class_names, total: int, start: int = 0, enabled: bool = True,
                 tensorboard: bool = True, every: int = 10, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.total, self.every = total, max(1, every)
        self.class_names = list(class_names)
        self.start_time = time.perf_counter()
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.train_csv = CsvLog(run_dir / "train.csv", self.TRAIN_HEADER)
        self.val_csv = CsvLog(run_dir / "val.csv", ["iteration", "mean_dice_with_bg", "mean_dice_no_bg"]
                              + [f"dice/{n}" for n in self.class_names] + ["val_s"])
        self.tb = tensorboard_writer(run_dir / "tensorboard") if tensorboard else None
        if self.stream.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=self.stream)
            except ImportError:
                self._bar = None
        self._start_iter = start

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def step(self, it: int, loss: float, lr: float, step_s: float, data_s: float, crops: int,
             cpu_s: Optional[float] = None) -> None:
        """One finished iteration ``it`` (1-based); every ``every`` iterations a CSV row and a console line.
        ``cpu_s``: the process's CPU time over the step, every thread (data workers included)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        if it % self.every and it != self.total:
            return
        row = {"iteration": it, "loss": loss, "lr": lr, "step_s": step_s, "data_wait_s": data_s,
               "data_wait_fraction": data_s / max(step_s, 1e-12), "crops_per_s": crops / max(step_s, 1e-12),
               "cpu_s": "" if cpu_s is None else cpu_s,
               "elapsed_s": time.perf_counter() - self.start_time}
        self.train_csv.write(row)
        if self.tb is not None:
            for key in ("loss", "lr", "step_s", "data_wait_fraction", "crops_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], it)
        text = (f"loss {loss:.4f}  step {step_s * 1000:.0f} ms  data wait {data_s * 1000:.0f} ms "
                f"({100 * row['data_wait_fraction']:.0f}%)")
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            done = it - self._start_iter
            eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.total - it)
            print(f"iter {it}/{self.total}  {text}  lr {lr:.3g}  ETA {_duration(eta)}", file=self.stream,
                  flush=True)

    def validation(self, it: int, summary: Dict[str, float], seconds: float, best: Optional[dict]) -> None:
        if not self.enabled:
            return
        self.val_csv.write({"iteration": it, "val_s": seconds, **summary})
        if self.tb is not None:
            for key, value in summary.items():
                if math.isfinite(value):
                    self.tb.add_scalar(f"val/{key}", value, it)
        per_class = "  ".join(f"{n} {summary[f'dice/{n}']:.3f}" for n in self.class_names)
        best_text = "" if best is None else f"  (best {best['metric']:.4f} at {best['iteration']})"
        self.info(f"val @ {it}: mean Dice {summary['mean_dice_with_bg']:.4f} with background, "
                  f"{summary['mean_dice_no_bg']:.4f} without  |  {per_class}  [{seconds:.1f} s]{best_text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self.train_csv.close()
        self.val_csv.close()
        if self.tb is not None:
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["RunLog", "CsvLog", "tensorboard_writer"]
