"""Honest timing: device synchronisation, warm-up, rotating inputs, medians.

Shared by the pytest-benchmark suite (``benchmarks/``, where pytest-benchmark runs the timed loop over
:func:`timed_call` with inputs from :class:`InputPool`) and ``uxnet bench`` (which runs :func:`measure`).
"""

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch

# Pools hold at least this many bytes of distinct inputs, so that cycling through them defeats the last-level cache
# (32 MiB on the dev machine) instead of timing a kernel that re-reads its input from cache.
POOL_TARGET_BYTES = 96 * 2**20
MAX_POOL_SIZE = 8


def synchronize(device: torch.device) -> None:
    """Wait until all queued work on ``device`` has finished (a no-op on the CPU, which runs eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pool_size(bytes_per_entry: int) -> int:
    """How many distinct input sets to cycle: enough to exceed POOL_TARGET_BYTES, 2 to MAX_POOL_SIZE."""
    return max(2, min(MAX_POOL_SIZE, math.ceil(POOL_TARGET_BYTES / max(1, bytes_per_entry))))


class InputPool:
    """A few independently generated argument tuples, handed out round-robin by :meth:`next`."""

    def __init__(self, make_args: Callable[[], Tuple], size: int):
        self.entries: List[Tuple] = [make_args() for _ in range(size)]
        self._i = 0

    def next(self) -> Tuple:
        args = self.entries[self._i % len(self.entries)]
        self._i += 1
        return args

    def next_for_pedantic(self):
        """pytest-benchmark ``pedantic(setup=...)`` form: ``(args, kwargs)``."""
        return self.next(), {}


def timed_call(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device synchronisation, so that a timer around it sees the finished work."""

    def call(*args):
        fn(*args)
        synchronize(device)

    return call


def warm_up(call: Callable, pool: InputPool, calls: int = 1) -> float:
    """Run ``call`` ``calls`` times on pool inputs (first-call costs: allocation, lazy init, autotuning);
    returns the duration of the last call, which :func:`plan_rounds` uses."""
    last = 0.0
    for _ in range(max(1, calls)):
        args = pool.next()
        start = time.perf_counter()
        call(*args)
        last = time.perf_counter() - start
    return last


def plan_rounds(call_seconds: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """Timed rounds for a case whose warmed-up call took ``call_seconds``: about ``budget_s`` of timing, at least
    ``min_rounds`` (so the median means something) and at most ``max_rounds``."""
    wanted = int(budget_s / max(call_seconds, 1e-9))
    return max(min_rounds, min(max_rounds, wanted))


@dataclass
class Timing:
    times_s: Sequence[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def rounds(self) -> int:
        return len(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median: a quick noise indicator for a shared machine."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.times_s else float("nan")


def measure(call: Callable, pool: InputPool, budget_s: float = 1.0, min_rounds: int = 3, max_rounds: int = 50,
            warmup: int = 1, first_round_context: Optional[ContextManager] = None) -> Timing:
    """Warm up, then time single calls (each on the next pooled input, device synchronised) and keep them all.
    ``first_round_context`` (e.g. a memory.PeakMemoryTracker) wraps the first timed call, outside its timer."""
    first = warm_up(call, pool, warmup)
    rounds = plan_rounds(first, budget_s, min_rounds, max_rounds)
    times = []
    for i in range(rounds):
        args = pool.next()
        with first_round_context if (i == 0 and first_round_context is not None) else contextlib.nullcontext():
            start = time.perf_counter()
            call(*args)
            times.append(time.perf_counter() - start)
    return Timing(times)
