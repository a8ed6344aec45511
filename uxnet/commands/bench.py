"""``uxnet bench``: time the fast backends against the PyTorch reference, side by side in one run.

Prints a table (case, implementation, median time, speedup vs the reference of the same layout and vs the
fastest reference, GFLOP/s, GB/s over the bytes floor, peak memory), optionally writes JSON (with the FLOPs and
parameter count of the default model at 96^3) and a PNG chart of the speedups.
"""

import datetime
import json
import platform
import sys
import time

import torch


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [kind(t) for t in items]

    return parse


def add_arguments(parser) -> None:
    from uxnet.bench import cases as C

    parser.add_argument("--size", choices=sorted(list(C.SIZES) + ["tiny"]), default="quick",
                        help="case preset: quick (default, < 3 min on 2 cores), cpu (the pytest suite's), "
                             "paper (96^3 patches, batch 2: for a GPU), tiny (smoke test)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda if available, else cpu")
    parser.add_argument("--dtypes", type=_csv(str), default=None,
                        help=f"comma list of {', '.join(C.DTYPES)} (default: the preset's)")
    parser.add_argument("--backends", type=_csv(str), default=None,
                        help="comma list of fast backends to compare with the reference (default: the device's: "
                             "cpu on CPU; triton,cuda on CUDA)")
    parser.add_argument("--ops", type=_csv(str), default=list(C.OPS), help="comma list of ops (default: all)")
    parser.add_argument("--kernels", type=_csv(int), default=None, help="dwconv3d kernel sizes (default: preset's)")
    parser.add_argument("--layouts", type=_csv(str), default=list(C.LAYOUTS), help="ncdhw,cl (default: both)")
    parser.add_argument("--model-kinds", type=_csv(str), default=None,
                        help=f"comma list of {','.join(C.MODEL_KINDS)} (default: the preset's; quick: "
                             f"inference,train_step)")
    parser.add_argument("--no-model", action="store_true", help="op cases only")
    parser.add_argument("--reps", type=int, default=None, help="maximum timed repetitions per case")
    parser.add_argument("--min-reps", type=int, default=None, help="minimum timed repetitions per case")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case (then clamped)")
    parser.add_argument("--include-slow", action="store_true",
                        help="also run reference rows that take minutes per call at this size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-memory-prediction", action="store_true",
                        help="skip the predicted training-step memory of the default model (uxnet memory's table)")
    parser.add_argument("--paper-table", action="store_true",
                        help="also count the paper's Table 3 kernel ablation (FLOPs and parameters at 96^3)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of the speedups (needs matplotlib)")


class _Progress:
    """tqdm when installed, otherwise a one-line counter on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(text[:60])
            self._bar.update(1)
            return
        self.done += 1
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{self.done}/{self.total}] {elapsed:5.0f} s  {text[:70]:70s}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("uxnet bench: --device cuda but torch sees no CUDA device")
    return name


def _validate(args, C) -> None:
    bad = [d for d in (args.dtypes or []) if d not in C.DTYPES]
    bad += [o for o in args.ops if o not in C.OPS]
    bad += [layout for layout in args.layouts if layout not in C.LAYOUTS]
    bad += [k for k in (args.model_kinds or []) if k not in C.MODEL_KINDS]
    bad += [b for b in (args.backends or []) if b not in ("cpu", "cuda", "triton")]
    bad += [k for k in (args.kernels or []) if k < 1 or k % 2 == 0]
    if bad:
        raise SystemExit(f"uxnet bench: unknown or invalid values {bad}; see uxnet bench --help")


def plot_speedups(rows, path: str) -> str:
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


def predict_default_model_memory(device: str):
    """Print and return ``uxnet memory``'s prediction for the default model at the paper's patch, batch 2,
    uxnet next to the official model."""
    from uxnet.bench import flops
    from uxnet.bench.memory_predict import predict_step
    from uxnet.bench.memory_report import describe, format_table
    from uxnet.bench.models import MODEL_KINDS
    from uxnet.bench.train_step import make_spec

    specs = [make_spec(kind=kind, roi=flops.PAPER_PATCH, batch=2, device=device, **flops.DEFAULT_MODEL)
             for kind in MODEL_KINDS]
    predictions = [predict_step(spec) for spec in specs]
    print()
    print(f"predicted memory of one training step of {describe(specs[0])} (uxnet memory; nothing allocated)")
    print(format_table(predictions))
    return predictions


def run(args) -> int:
    from uxnet.bench import cases as C
    from uxnet.bench import flops
    from uxnet.bench.report import add_speedups, format_table
    from uxnet.bench.runner import all_cases, run_case
    from uxnet.commands.info import collect

    _validate(args, C)
    device = _device(args.device)
    size = C.tiny_size() if args.size == "tiny" else C.SIZES[args.size]
    kinds = [] if args.no_model else args.model_kinds
    cases = all_cases(size, device, args.dtypes, args.backends, args.ops, args.kernels, args.layouts, kinds)
    started = time.perf_counter()
    progress = _Progress(len(cases))
    rows = []
    for case in cases:
        rows.append(run_case(case, size, include_slow=args.include_slow, with_memory=not args.no_memory,
                             budget_s=args.budget, min_rounds=args.min_reps, max_rounds=args.reps))
        progress.step(f"{case.group} | {case.label}")
    progress.close()
    add_speedups(rows)
    print(f"uxnet bench --size {size.name} on {device} ({size.note or 'custom'}); medians, "
          f"speedups measured in this run")
    print(format_table(rows, with_memory=not args.no_memory))

    model_rows = flops.paper_table() if args.paper_table else [flops.default_model_row()]
    print()
    print(flops.format_table(model_rows))
    default = model_rows[0]
    print(f"FlopCounterMode counts 2 FLOPs per multiply-add: {default.flops / 1e9:.1f} GFLOPs = "
          f"{default.macs / 1e9:.1f} GMACs; the paper reports {flops.PAPER_TABLE1['flops_g']} G "
          f"(see docs/PERFORMANCE.md)")
    predictions = [] if args.no_memory_prediction else predict_default_model_memory(device)
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")

    if args.json:
        info = collect()
        payload = {
            "options": {k: v for k, v in vars(args).items() if k != "command"},
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "device": device, "cpu": info["cpu"],
                        "gpus": info["gpus"], "torch": info["torch"], "extension_loaded": info["extension_loaded"]},
            "size": size.name, "size_note": size.note,
            "default_model": default.as_dict(),
            "paper_table": [r.as_dict() for r in model_rows],
            "results": [r.as_dict() for r in rows],
            "memory_prediction": [p.as_dict() for p in predictions],
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        why = plot_speedups(rows, args.plot)
        print(f"plot: {why}" if why else f"wrote {args.plot}")
    return 0
