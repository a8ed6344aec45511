"""Honest timing: device synchronisation, warm-up, rotating inputs, medians; the one timing harness of uxnet.

* ``uxnet bench`` runs :func:`measure`; the pytest-benchmark suite (``benchmarks/``) runs pytest-benchmark's timed
  loop over :func:`timed_call` with inputs from :class:`InputPool`.
* :func:`interleaved`: A/B(/C...) rounds in one process for a shared machine (``benchmarks/scripts``,
  ``examples/reparam_measure.py``, the timed steps of ``uxnet.memory.measure``).
* :func:`median_s`: one call's median, with CUDA events on a GPU (``benchmarks/gpu``).

It imports nothing but torch, so that the CPU benchmark scripts can load this file on its own, next to whichever
build of ``uxnet_kernels`` they measure.
"""

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch

# Pools hold at least this many bytes of distinct inputs, so that cycling through them defeats the last-level cache
# (32 MiB on the dev machine) instead of timing a kernel that re-reads its input from cache.
POOL_TARGET_BYTES = 96 * 2**20
MAX_POOL_SIZE = 8


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait until all queued work on ``device`` has finished (a no-op on the CPU, which runs eagerly)."""
    if torch.device(device).type == "cuda":
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
    ``first_round_context`` (e.g. a ``uxnet.memory.tracker.PeakMemoryTracker``) wraps the first timed call,
    outside its timer."""
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


def interleaved(calls: Dict[str, Callable[[], object]], rounds: int, round_s: float = 0.0, warmup: int = 1,
                device: Union[str, torch.device] = "cpu") -> Dict[str, Timing]:
    """A/B timing for a shared machine: each call is warmed up, then ``rounds`` rounds time every call in turn, so
    that load bursts hit all of them alike.

    In a round a call runs ``number`` times back to back, each call device synchronised, and its sample is the mean
    time per call; ``number`` is 1 with ``round_s=0``, otherwise chosen from the call's last warm-up so that its
    part of a round lasts about ``round_s`` seconds. Returns one :class:`Timing` per call, samples in round order
    (sample i of every call comes from round i, for paired ratios)."""
    if round_s > 0 and warmup < 1:
        raise ValueError("interleaved: round_s > 0 needs a warm-up call to size the rounds")
    device = torch.device(device)
    timed = {name: timed_call(fn, device) for name, fn in calls.items()}
    number = {}
    for name, call in timed.items():
        last = 0.0
        for _ in range(warmup):
            start = time.perf_counter()
            call()
            last = time.perf_counter() - start
        number[name] = max(1, int(round_s / max(last, 1e-9))) if round_s > 0 else 1
    samples: Dict[str, List[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, call in timed.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                call()
            samples[name].append((time.perf_counter() - start) / number[name])
    return {name: Timing(times) for name, times in samples.items()}


def median_s(fn: Callable[[], object], device: Union[str, torch.device], runs: int = 10,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None, cuda_events: bool = True,
             warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median seconds of ``fn()``, the gradients of ``grad_to_none`` reset before each run (so that a backward is
    timed without accumulation).

    On a CUDA device with ``cuda_events``: ``triton.testing.do_bench`` (CUDA events, ``warmup_ms`` of warm-up, the
    L2 cache flushed between runs, about ``rep_ms`` of runs). Otherwise ``runs`` calls timed with ``perf_counter``,
    each device synchronised, without warm-up."""
    device = torch.device(device)
    if cuda_events and device.type == "cuda":
        import triton.testing

        return 1e-3 * float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                    return_mode="median"))
    times = []
    for _ in range(runs):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
