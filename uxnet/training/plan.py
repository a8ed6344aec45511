"""Planning a run to fit a memory budget, from ``uxnet memory``'s prediction of one training step.

Search order, first fit wins: the recipe's ROI, then smaller ROIs (multiples of 16, down to 32); at each ROI
activation checkpointing off, then selective, then full (each slower than the last); the recipe's batch. Options
given explicitly (``--roi``, ``--batch``, ``--checkpointing``) are not searched: if they do not fit, the plan fails
with the predicted peak and the budget. The prediction is of the step's tensors only (not cuDNN workspaces, the
CUDA context, allocator fragmentation), so on CUDA the plan keeps ``CUDA_HEADROOM`` of the budget free.

The default budget: on CUDA the device's free memory (``torch.cuda.mem_get_info``); on the CPU the memory the
kernel reports available (``MemAvailable``) less what the cached dataset may take, which is what a CPU run can use
without swapping.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from uxnet.memory.planner import predict_step
from uxnet.memory.report import parse_size
from uxnet.memory.step import make_spec

from . import TrainError

CUDA_HEADROOM = 0.10
MIN_ROI = 32
CHECKPOINTING = (False, True, "full")
MODE_NAMES = {False: "off", True: "selective", "full": "full"}


@dataclass
class Plan:
    roi: Tuple[int, int, int]
    batch: int
    checkpointing: Union[bool, str]
    peak_bytes: Optional[int]
    budget_bytes: Optional[int]
    reasons: List[str] = field(default_factory=list)

    def describe(self) -> str:
        peak = "not predicted" if self.peak_bytes is None else f"predicted peak {_gib(self.peak_bytes)}"
        budget = "" if self.budget_bytes is None else f" of a {_gib(self.budget_bytes)} budget"
        return (f"plan: ROI {'x'.join(map(str, self.roi))}, batch {self.batch} volume(s) per process, activation "
                f"checkpointing {MODE_NAMES[self.checkpointing]}; {peak}{budget}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def parse_budget(text: Optional[str]) -> Optional[int]:
    """Bytes from "24GB" / "24GiB" / "80G"; None for None or "off" (no planning)."""
    if text is None or str(text).lower() == "off":
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise TrainError(f"--budget: {exc}") from None


def default_budget(device: torch.device) -> Tuple[int, str]:
    """(bytes, where it comes from): the device's free memory; MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host RAM (MemAvailable)"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free host RAM"


def predicted_peak(model_config: dict, roi, crops: int, checkpointing, amp: Optional[str], device: str) -> int:
    """Predicted peak bytes of one AdamW step on ``crops`` crops of ``roi`` (deep-supervision heads, 1x1x1 convs,
    are left out: the predictor's loss takes one output)."""
    config = {k: v for k, v in model_config.items()
              if k not in ("activation_checkpointing", "deep_supervision")}
    spec = make_spec(kind="uxnet", roi=list(roi), batch=crops, checkpointing=checkpointing, amp=amp,
                     device=device, optimizer="adamw", **config)
    return predict_step(spec).peak_bytes


def make_plan(model_config: dict, roi: Sequence[int], batch: int, crops_per_volume: int, budget: Optional[int],
              device: str = "cpu", amp: Optional[str] = None, checkpointing=None, fixed_roi: bool = False,
              fixed_batch: bool = False) -> Plan:
    """The first (ROI, checkpointing) in the search order whose predicted step fits ``budget`` (None: no check).
    ``checkpointing`` None means free to choose.

    Raises:
        TrainError: nothing fits (what was tried, with the smallest predicted peak)."""
    roi = tuple(int(v) for v in roi)
    modes = CHECKPOINTING if checkpointing is None else (checkpointing,)
    if budget is None:
        return Plan(roi, batch, modes[0], None, None, ["--budget off: no memory check"])
    usable = int(budget * (1 - CUDA_HEADROOM)) if device == "cuda" else budget
    rois = [roi]
    if not fixed_roi:
        smaller = roi
        while max(smaller) > MIN_ROI:
            smaller = tuple(max(MIN_ROI, v - 16) for v in smaller)
            rois.append(smaller)
    tried = []
    for r in rois:
        for mode in modes:
            peak = predicted_peak(model_config, r, batch * crops_per_volume, mode, amp, device)
            tried.append((r, mode, peak))
            if peak <= usable:
                why = [f"{'x'.join(map(str, r))} with checkpointing {MODE_NAMES[mode]} is predicted at "
                       f"{_gib(peak)} <= {_gib(usable)} usable"
                       + (f" ({int(CUDA_HEADROOM * 100)}% of the budget kept for workspaces)" if device == "cuda"
                          else "")]
                why += [f"{'x'.join(map(str, tr))} checkpointing {MODE_NAMES[tm]}: {_gib(tp)} does not fit"
                        for tr, tm, tp in tried[:-1]]
                return Plan(r, batch, mode, peak, budget, why)
    r, mode, peak = min(tried, key=lambda t: t[2])
    explicit = [name for name, flag in (("--roi", fixed_roi), ("--batch", fixed_batch),
                                        ("--checkpointing", checkpointing is not None)) if flag]
    raise TrainError(f"nothing fits the memory budget {_gib(budget)} ({_gib(usable)} usable): the smallest "
                     f"predicted step is {_gib(peak)} (ROI {'x'.join(map(str, r))}, batch {batch} x "
                     f"{crops_per_volume} crops, checkpointing {MODE_NAMES[mode]})"
                     + (f"; explicitly set: {', '.join(explicit)}" if explicit else "")
                     + "; lower --batch / --crops-per-volume / --roi, use --amp, or raise --budget")


__all__ = ["Plan", "make_plan", "parse_budget", "default_budget", "predicted_peak"]
