"""Measured peak memory of one call.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before:
  the bytes the call needed on top of its (already allocated) inputs and parameters.
* CPU (Linux): the process's resident-set high-water mark. tracemalloc cannot see torch's allocations and torch
  keeps no CPU allocator statistics, so we let the kernel count: free heap pages are handed back
  (``malloc_trim``), the high-water mark ``VmHWM`` is reset to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs``, the call runs, and the peak is ``VmHWM - VmRSS(before)``. It counts every page the
  call touched for the first time (torch tensors, oneDNN scratch, thread stacks), at 4 KiB page granularity; it
  assumes no other thread of the process allocates meanwhile (true in the benchmarks).
"""

import ctypes
import ctypes.util
import gc
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..timing import synchronize

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class PeakMemory:
    bytes: Optional[int]
    method: str  # "cuda_max_allocated", "rss_hwm", or why nothing was measured

    def __str__(self) -> str:
        return "-" if self.bytes is None else format_bytes(self.bytes)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def rss_peak_supported() -> tuple:
    """(ok, reason): whether the CPU RSS high-water measurement works in this process."""
    try:
        _status_kib("VmHWM")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as exc:
        return False, f"cannot reset the RSS high-water mark ({exc})"
    return True, ""


class PeakMemoryTracker:
    """``with PeakMemoryTracker(device) as tracker: ...`` then ``tracker.result``: the peak extra memory of the
    block (see module docstring). Set-up and read-out happen outside the block, so a timer inside it is unaffected."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = PeakMemory(None, "not measured")
        self._before = 0

    def __enter__(self) -> "PeakMemoryTracker":
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            ok, why = rss_peak_supported()
            if not ok:
                self.result = PeakMemory(None, why)
                return self
            _malloc_trim()
            self._before = _status_kib("VmRSS")
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        else:
            self.result = PeakMemory(None, f"no peak-memory measurement for device {self.device.type}")
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._before
            self.result = PeakMemory(peak, "cuda_max_allocated")
        elif self.device.type == "cpu" and self.result.method == "not measured":
            self.result = PeakMemory(max(0, _status_kib("VmHWM") - self._before) * 1024, "rss_hwm")


def peak_memory(call: Callable, args: tuple, device: torch.device) -> PeakMemory:
    """Peak extra memory of ``call(*args)`` on ``device`` (see module docstring); call it after a warm-up."""
    with PeakMemoryTracker(device) as tracker:
        call(*args)
    return tracker.result
