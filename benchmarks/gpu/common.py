"""Shared pieces of the GPU validation scripts: device, machine description, JSON output, time budget, and the
dry-run policy of the timing (``uxnet.timing.median_s``).

On CUDA, times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs).
In ``--dry-run`` mode (CPU, tiny sizes, Triton interpreter) they are medians of a few ``time.perf_counter`` runs:
those numbers only prove that the code paths run, they are not measurements.

``uxnet`` is imported inside the functions: it imports ``uxnet_kernels`` and with it triton, which must come after
:func:`prepare_dry_run`.
"""

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run from a checkout without installing: import uxnet / uxnet_kernels from the tree
    sys.path.insert(0, ROOT)


def prepare_dry_run() -> None:
    """CPU dry run: the Triton kernels need the interpreter, which must be chosen before triton is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    from uxnet.timing import synchronize

    synchronize(device())


def median_ms(fn, dry_run: bool, grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn(); gradients of `grad_to_none` are reset between runs (so backward is timed
    without accumulation). CUDA events unless ``dry_run``; a dry run times 3 calls."""
    from uxnet.timing import median_s

    return 1e3 * median_s(fn, device(), runs=3 if dry_run else 10, grad_to_none=grad_to_none,
                          cuda_events=not dry_run, warmup_ms=warmup_ms, rep_ms=rep_ms)


def copy_bandwidth_gbs(dry_run: bool) -> float:
    """Measured device copy bandwidth (read + write bytes per second of a large clone), in GB/s."""
    numel = (1 << 16) if dry_run else (1 << 28)
    src = torch.empty(numel, dtype=torch.float32, device=device())
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dry_run)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def machine() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


class Budget:
    """Wall-clock budget: cases past it are recorded as skipped (with the reason), never silently dropped."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0
