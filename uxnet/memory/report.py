"""The table ``uxnet memory`` and ``uxnet bench`` print for step-memory predictions, and memory-size parsing."""

import re
from typing import Dict, List, Optional, Sequence

from .planner import StepPrediction

_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "24GB" (10^9), "24GiB" / "24G" (2^30), "800 MB", "1.5TiB"; a bare number is GiB.

    Raises:
        ValueError: not a positive size with a known unit."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (examples: 24GB, 24GiB, 80G, 11000MiB; a bare number is GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _unit(max_bytes: int):
    return (2**30, "GiB") if max_bytes >= 2**30 else (2**20, "MiB")


def _fmt(n: Optional[int], scale: int, unit: str) -> str:
    return "-" if n is None else f"{n / scale:.2f} {unit}"


def column_name(p: StepPrediction) -> str:
    return p.spec.kind + {False: "", True: " (ckpt)", "full": " (ckpt full)"}[p.spec.checkpointing]


def describe(spec) -> str:
    """One line: model, input, precision, optimizer, device."""
    config = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in spec.config)
    roi = "x".join(map(str, spec.roi))
    precision = f"autocast {spec.amp}" if spec.amp else "float32"
    optimizer = {"adamw": "AdamW", "sgd": "SGD"}[spec.optimizer]
    return f"UXNet({config}), input {roi}, batch {spec.batch}, {precision}, {optimizer}, {spec.device}"


def format_table(predictions: Sequence[StepPrediction]) -> str:
    """Saved bytes by block and the step's memory, one column per prediction (plus a ratio to the official model
    when there is one)."""
    cols = list(predictions)
    official = next((p for p in cols if p.spec.kind == "official"), None)
    ratio_of = [p for p in cols if p is not official] if official is not None else []
    scale, unit = _unit(max(p.peak_bytes for p in cols))
    names = [column_name(p) for p in cols] + [f"{column_name(p)} / official" if len(ratio_of) > 1 else "/ official"
                                              for p in ratio_of]
    width = max([12] + [len(n) + 2 for n in names])
    label_width = 34

    def row(label: str, values: List[Optional[int]]) -> str:
        cells = [_fmt(v, scale, unit) for v in values]
        ratios = []
        if official is not None:
            ref = values[cols.index(official)]
            for p in ratio_of:
                v = values[cols.index(p)]
                ratios.append(f"{v / ref:.2f}x" if ref and v is not None else "-")
        return f"  {label:{label_width}s}" + "".join(f"{c:>{width}s}" for c in cells + ratios)

    head = f"  {'':{label_width}s}" + "".join(f"{n:>{width}s}" for n in names)
    lines = ["saved for backward by block (unique storages, parameters excluded)", head]
    for block in cols[0].saved_by_block:
        lines.append(row(block, [p.saved_by_block.get(block) for p in cols]))
    lines.append(row("total saved activations", [p.saved_bytes for p in cols]))
    lines += ["", "one training step (zero_grad, forward + loss, backward, optimizer step)", head]
    lines.append(row("parameters", [p.params_bytes for p in cols]))
    lines.append(row("gradients", [p.grads_bytes for p in cols]))
    lines.append(row("optimizer state", [p.optimizer_state_bytes for p in cols]))
    lines.append(row("batch (input + labels)", [p.batch_bytes for p in cols]))
    lines.append(row("held between steps", [p.start_bytes for p in cols]))
    lines.append(row("activations held after forward", [p.held_after_forward_bytes for p in cols]))
    lines.append(row("PEAK of the step", [p.peak_bytes for p in cols]))
    lines.append(row("  of which activations", [p.peak_breakdown.get("Activation") for p in cols]))
    lines.append(row("  of which backward temporaries", [p.peak_breakdown.get("Temp") for p in cols]))
    lines.append(row("  of which conv scratch (modelled)", [p.peak_breakdown.get("Workspace") for p in cols]))
    lines.append(row("peak above what is held", [p.step_bytes for p in cols]))
    for p in cols:
        ops = ", ".join(f"{op}->{name}" for op, name in p.backends.items()) or "-"
        lines.append(f"  {column_name(p)}: peak in {p.peak_where}; uxnet ops on {ops}")
    return "\n".join(lines)


def budget_verdicts(predictions: Sequence[StepPrediction], budget_bytes: int) -> Dict[str, Dict]:
    return {column_name(p): {"fits": p.peak_bytes <= budget_bytes, "peak_bytes": p.peak_bytes,
                             "fraction_of_budget": p.peak_bytes / budget_bytes} for p in predictions}


def format_budget(predictions: Sequence[StepPrediction], budget_text: str, budget_bytes: int) -> str:
    verdicts = budget_verdicts(predictions, budget_bytes)
    parts = [f"{name} {'FITS' if v['fits'] else 'DOES NOT FIT'} (peak {v['peak_bytes'] / 2**30:.2f} GiB, "
             f"{100 * v['fraction_of_budget']:.0f} % of it)" for name, v in verdicts.items()]
    return (f"budget {budget_text} = {budget_bytes / 2**30:.2f} GiB: " + "; ".join(parts)
            + "\n  (on a GPU also leave room for the CUDA context, ~0.3-0.6 GiB, and allocator fragmentation, "
              "which torch.cuda.max_memory_allocated does not count)")


def format_peaks(predictions: Sequence[StepPrediction]) -> str:
    scale, unit = _unit(max(p.peak_bytes for p in predictions))
    return "PEAK of one training step: " + ", ".join(
        f"{column_name(p)} {_fmt(p.peak_bytes, scale, unit)}" for p in predictions)
