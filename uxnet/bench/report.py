"""Result rows, speedups against the reference rows of the same group (measured in the same run), the table
printed by ``uxnet bench`` and at the end of ``pytest benchmarks/``, and the chart of ``uxnet bench --plot``."""

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ..memory.tracker import format_bytes


@dataclass
class Row:
    group: str  # what is compared: op, mode, shape, kernel, dtype (or model workload)
    label: str  # implementation (and layout)
    is_reference: bool
    reference_key: str  # speedup is against the reference row of the group with the same key (layout)
    median_s: Optional[float] = None  # None: not run (see note)
    rounds: int = 0
    flops: int = 0  # FlopCounterMode count of the work (0: not a FLOP-bound op)
    min_bytes: int = 0  # activation bytes read + written at least once (0: not computed)
    peak_bytes: Optional[int] = None
    peak_method: str = ""
    note: str = ""
    speedup: Optional[float] = None  # reference median (same key) / median
    speedup_vs_best: Optional[float] = None  # fastest reference row of the group / median

    @property
    def gflops(self) -> Optional[float]:
        return self.flops / self.median_s / 1e9 if self.flops and self.median_s else None

    @property
    def gbytes_per_s(self) -> Optional[float]:
        return self.min_bytes / self.median_s / 1e9 if self.min_bytes and self.median_s else None

    def as_dict(self) -> Dict:
        d = asdict(self)
        d.update(gflops=self.gflops, gbytes_per_s=self.gbytes_per_s)
        return d


def add_speedups(rows: Sequence[Row]) -> None:
    """Fill ``speedup`` and ``speedup_vs_best`` from the reference rows measured in the same run."""
    refs: Dict[str, Dict[str, float]] = {}
    for r in rows:
        if r.is_reference and r.median_s:
            refs.setdefault(r.group, {})[r.reference_key] = r.median_s
    for r in rows:
        group_refs = refs.get(r.group, {})
        if not r.median_s or not group_refs:
            continue
        if r.reference_key in group_refs:
            r.speedup = group_refs[r.reference_key] / r.median_s
        r.speedup_vs_best = min(group_refs.values()) / r.median_s


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


COLUMNS = ("case", "impl", "median", "x ref", "x best ref", "GFLOP/s", "GB/s", "peak mem", "rounds")


def format_table(rows: Sequence[Row], with_memory: bool = True) -> str:
    """One line per row, groups in order of first appearance, references first within a group."""
    order: Dict[str, List[Row]] = {}
    for r in rows:
        order.setdefault(r.group, []).append(r)
    width = max([len(g) for g in order] + [4])
    label_width = max([len(r.label) for r in rows] + [4])
    cols = list(COLUMNS if with_memory else [c for c in COLUMNS if c != "peak mem"])
    head = (f"{cols[0]:{width}s}  {cols[1]:{label_width}s}  {'median':>9s}  {'x ref':>6s}  {'x best ref':>10s}  "
            f"{'GFLOP/s':>8s}  {'GB/s':>6s}" + (f"  {'peak mem':>10s}" if with_memory else "") + f"  {'rounds':>6s}")
    lines = [head, "-" * len(head)]
    for group, members in order.items():
        members = sorted(members, key=lambda r: (not r.is_reference, r.label))
        for i, r in enumerate(members):
            name = group if i == 0 else ""
            if r.median_s is None:
                lines.append(f"{name:{width}s}  {r.label:{label_width}s}  skipped: {r.note}")
                continue
            peak = format_bytes(r.peak_bytes) if r.peak_bytes is not None else "-"
            lines.append(
                f"{name:{width}s}  {r.label:{label_width}s}  {_fmt_time(r.median_s):>9s}  "
                f"{_fmt(r.speedup, '.2f', 'x'):>6s}  {_fmt(r.speedup_vs_best, '.2f', 'x'):>10s}  "
                f"{_fmt(r.gflops, '.1f'):>8s}  {_fmt(r.gbytes_per_s, '.1f'):>6s}"
                + (f"  {peak:>10s}" if with_memory else "") + f"  {r.rounds:>6d}")
    return "\n".join(lines)


def plot_speedups(rows: Sequence[Row], path: str) -> str:
    """A horizontal bar chart of each fast row's speedup over its reference; returns "" or why not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no chart written"
    fast = [r for r in rows if not r.is_reference and r.speedup is not None]
    if not fast:
        return "no fast-backend rows were measured; no chart written"
    labels = [f"{r.group} | {r.label}" for r in fast]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(fast) + 1.5))
    ax.barh(range(len(fast)), [r.speedup for r in fast], color=["tab:green" if r.speedup >= 1 else "tab:red"
                                                                  for r in fast])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(fast)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup vs PyTorch reference (same layout), median, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""
