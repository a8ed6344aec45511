"""Running one case end to end (used by ``uxnet bench``; the pytest suite uses the same pieces around
pytest-benchmark's timed loop): whether it can run, build it, time it, measure its peak memory, make its Row."""

from typing import Optional, Sequence, Union

import torch

from ..memory.tracker import PeakMemory, PeakMemoryTracker
from ..timing import measure, timed_call
from .model_cases import ModelCase, auto_verdict, build_model_case, model_case_flops, model_cases
from .op_cases import (LAYOUTS, OpCase, backend_verdict, build_op_case, is_slow_reference, op_cases, op_flops,
                       op_min_bytes)
from .presets import OPS, Size
from .report import Row

Case = Union[OpCase, ModelCase]


def skip_reason(case: Case, size: Size, include_slow: bool = False) -> str:
    """Why ``case`` does not run here ("" if it does): backend unavailable for it, or a slow reference row."""
    if isinstance(case, OpCase):
        if case.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if is_slow_reference(case, size) and not include_slow:
            return ("PyTorch reference takes minutes per call at this size here; include it with "
                    "--uxnet-include-slow / UXNET_BENCH_SLOW=1 (pytest) or --include-slow (uxnet bench)")
        ok, why = backend_verdict(case.impl, case.op, case.torch_dtype, case.layout, case.device)
        return "" if ok else f"backend {case.impl!r} cannot serve it: {why}"
    ok, why = auto_verdict(case)
    return "" if ok else why


def build(case: Case):
    return build_op_case(case) if isinstance(case, OpCase) else build_model_case(case)


def case_flops(case: Case) -> int:
    if isinstance(case, OpCase):
        return op_flops(case.op, case.mode, case.shape, case.kernel, case.dtype)
    return model_case_flops(case.spec, case.kind)


def make_row(case: Case, median_s: Optional[float] = None, rounds: int = 0, peak: Optional[PeakMemory] = None,
             note: str = "") -> Row:
    is_op = isinstance(case, OpCase)
    return Row(group=case.group, label=case.label, is_reference=case.is_reference,
               reference_key=case.reference_key, median_s=median_s, rounds=rounds,
               flops=case_flops(case) if median_s is not None else 0,
               min_bytes=op_min_bytes(case) if is_op and median_s is not None else 0,
               peak_bytes=peak.bytes if peak else None, peak_method=peak.method if peak else "", note=note)


def run_case(case: Case, size: Size, include_slow: bool = False, with_memory: bool = True,
             budget_s: Optional[float] = None, min_rounds: Optional[int] = None,
             max_rounds: Optional[int] = None) -> Row:
    why = skip_reason(case, size, include_slow)
    if why:
        return make_row(case, note=why)
    device = torch.device(case.device)
    fn, pool = build(case)
    call = timed_call(fn, device)
    tracker = PeakMemoryTracker(device) if with_memory else None
    timing = measure(call, pool,
                     budget_s=size.budget_s if budget_s is None else budget_s,
                     min_rounds=size.min_rounds if min_rounds is None else min_rounds,
                     max_rounds=size.max_rounds if max_rounds is None else max_rounds,
                     first_round_context=tracker)
    return make_row(case, timing.median_s, timing.rounds, tracker.result if tracker else None)


def all_cases(size: Size, device: str, dtypes: Optional[Sequence[str]] = None,
              backends: Optional[Sequence[str]] = None, ops: Sequence[str] = OPS,
              kernels: Optional[Sequence[int]] = None, layouts: Sequence[str] = LAYOUTS,
              model_kinds: Optional[Sequence[str]] = None):
    return (op_cases(size, device, dtypes, backends, layouts, ops, kernels)
            + model_cases(size, device, dtypes, model_kinds))
