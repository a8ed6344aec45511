"""Measured memory and time of one UXNet training step: what :mod:`uxnet.memory.planner` predicts.

The step is :func:`uxnet.memory.step.training_step` on real tensors. The first step of a process (which also
creates the gradients, the optimizer state and the process's one-time allocations: oneDNN primitives, thread
pools, the CUDA context's workspaces) is measured separately from the second, the steady state of a training loop:

* CPU (Linux): run it in a fresh process (:func:`measure_in_subprocess`) with ``MALLOC_MMAP_THRESHOLD_=65536``,
  so glibc serves every block of 64 KiB or more with ``mmap`` and unmaps it on free: the resident set then follows
  the live tensors and the peak is reproducible. The peak of a step is the growth of the resident-set high-water
  mark over it (``VmHWM`` reset to the current RSS through ``/proc/self/clear_refs``:
  :class:`uxnet.memory.tracker.PeakMemoryTracker`). ``ru_maxrss`` reads the same high-water mark but cannot be
  reset, so it only sees the first step.
* CUDA: ``torch.cuda.max_memory_allocated`` over the step after ``reset_peak_memory_stats``: absolute (parameters,
  gradients, optimizer state and batch included, as the prediction's peak) and above the allocation at step start.

Time: the median of ``repeats`` further steps (synchronised on CUDA).

    python -m uxnet.memory.measure '{"kind": "uxnet", "roi": [64, 64, 64], "batch": 1, ...}'   # prints JSON
"""

import json
import os
import statistics
import subprocess
import sys
from typing import Dict, Optional

import torch

import uxnet_kernels as uk

from ..timing import interleaved, synchronize
from .step import StepSpec, make_batch, make_optimizer, model_for, training_step
from .tracker import PeakMemoryTracker

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _measured_step(spec: StepSpec, model, optimizer, x, labels, device: torch.device) -> Dict:
    """Peak of one step: {"step_bytes": above the start, "peak_bytes": absolute (CUDA) or None, "method"}."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        training_step(spec, model, optimizer, x, labels)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"start_bytes": start, "peak_bytes": peak, "step_bytes": peak - start, "method": "cuda_max_allocated"}
    with PeakMemoryTracker(device) as tracker:
        training_step(spec, model, optimizer, x, labels)
    return {"start_bytes": None, "peak_bytes": None, "step_bytes": tracker.result.bytes,
            "method": tracker.result.method}


def measure_step(spec: StepSpec, repeats: int = 0, seed: int = 0) -> Dict:
    """Measure the first and the second training step of ``spec`` in this process, then time ``repeats`` more.

    Returns a dict: ``first`` and ``steady`` (each ``start_bytes``, ``peak_bytes``, ``step_bytes``, ``method``),
    ``step_s`` (list of times), ``step_s_median`` (None without repeats), ``backends`` (op -> backend used).
    Run it in a fresh process for the CPU numbers to mean anything (:func:`measure_in_subprocess`)."""
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("measure_step: spec.device is cuda but torch sees no CUDA device")
    torch.manual_seed(seed)
    model = model_for(spec).to(device)
    optimizer = make_optimizer(spec, model, device.type)
    x, labels = make_batch(spec, device)
    first = _measured_step(spec, model, optimizer, x, labels, device)
    steady = _measured_step(spec, model, optimizer, x, labels, device)
    steps = {"step": lambda: training_step(spec, model, optimizer, x, labels)}
    times = list(interleaved(steps, rounds=repeats, warmup=0, device=device)["step"].times_s)
    used = uk.backend_report(device)["last_used"]
    return {"spec": spec.as_dict(), "first": first, "steady": steady, "step_s": times,
            "step_s_median": statistics.median(times) if times else None,
            "backends": {op.split("@")[0]: name for op, name in used.items() if op.endswith("@" + device.type)},
            "torch_threads": torch.get_num_threads()}


def measure_in_subprocess(spec: StepSpec, repeats: int = 0, timeout: Optional[float] = None,
                          env: Optional[Dict[str, str]] = None) -> Dict:
    """:func:`measure_step` in a fresh Python process with ``MALLOC_MMAP_THRESHOLD_=65536`` (see module docstring).

    Raises:
        RuntimeError: the child failed (its stderr's tail is in the message)."""
    child_env = dict(os.environ, **MALLOC_ENV, **(env or {}))
    cmd = [sys.executable, "-m", "uxnet.memory.measure", json.dumps(spec.as_dict()), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"step measurement failed ({' '.join(cmd[:3])} ...): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="measure one UXNet training step (JSON StepSpec in, JSON out)")
    parser.add_argument("spec", help="StepSpec.as_dict() as JSON")
    parser.add_argument("--repeats", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure_step(StepSpec.from_dict(json.loads(args.spec)), repeats=args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
