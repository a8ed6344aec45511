"""``uxnet bench``: time the fast backends against the PyTorch reference, side by side in one run.

Prints a table (case, implementation, median time, speedup vs the reference of the same layout and vs the
fastest reference, GFLOP/s, GB/s over the bytes floor, peak memory), optionally writes JSON (with the FLOPs and
parameter count of the default model at 96^3) and a PNG chart of the speedups.

``uxnet bench --inference``: the CPU deployment routes instead (``uxnet.bench.deploy``): the official model in
eager, ``torch.compile``, ONNX Runtime and OpenVINO (fp32, bf16) next to uxnet fp32 and bf16 and its AOTInductor
package, one 96^3 window by default, with argmax agreement and max error against a float64 official run.
"""

import datetime
import json
import platform
import time

import torch


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [kind(t) for t in items]

    return parse


def add_arguments(parser) -> None:
    from uxnet.bench.op_cases import LAYOUTS
    from uxnet.bench.presets import DTYPES, MODEL_CASE_KINDS, OPS, SIZES

    parser.add_argument("--size", choices=sorted(list(SIZES) + ["tiny"]), default="quick",
                        help="case preset: quick (default, < 3 min on 2 cores), cpu (the pytest suite's), "
                             "paper (96^3 patches, batch 2: for a GPU), tiny (smoke test)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda if available, else cpu")
    parser.add_argument("--dtypes", type=_csv(str), default=None,
                        help=f"comma list of {', '.join(DTYPES)} (default: the preset's)")
    parser.add_argument("--backends", type=_csv(str), default=None,
                        help="comma list of fast backends to compare with the reference (default: the device's: "
                             "cpu on CPU; triton,cuda on CUDA)")
    parser.add_argument("--ops", type=_csv(str), default=list(OPS), help="comma list of ops (default: all)")
    parser.add_argument("--kernels", type=_csv(int), default=None, help="dwconv3d kernel sizes (default: preset's)")
    parser.add_argument("--layouts", type=_csv(str), default=list(LAYOUTS), help="ncdhw,cl (default: both)")
    parser.add_argument("--model-kinds", type=_csv(str), default=None,
                        help=f"comma list of {','.join(MODEL_CASE_KINDS)} (default: the preset's; quick: "
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
    inference = parser.add_argument_group("--inference: the CPU deployment routes (uxnet.bench.deploy)")
    inference.add_argument("--inference", action="store_true",
                           help="run the deployment benchmark instead of the op and model cases")
    from uxnet.bench import deploy

    deploy.add_arguments(inference, prefix="inference-")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of the speedups (needs matplotlib)")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("uxnet bench: --device cuda but torch sees no CUDA device")
    return name


def _validate(args) -> None:
    from uxnet.bench.op_cases import LAYOUTS
    from uxnet.bench.presets import DTYPES, MODEL_CASE_KINDS, OPS

    bad = [d for d in (args.dtypes or []) if d not in DTYPES]
    bad += [o for o in args.ops if o not in OPS]
    bad += [layout for layout in args.layouts if layout not in LAYOUTS]
    bad += [k for k in (args.model_kinds or []) if k not in MODEL_CASE_KINDS]
    bad += [b for b in (args.backends or []) if b not in ("cpu", "cuda", "triton")]
    bad += [k for k in (args.kernels or []) if k < 1 or k % 2 == 0]
    if bad:
        raise SystemExit(f"uxnet bench: unknown or invalid values {bad}; see uxnet bench --help")


def predict_default_model_memory(device: str):
    """Print and return ``uxnet memory``'s prediction for the default model at the paper's patch, batch 2,
    uxnet next to the official model."""
    from uxnet.bench import flops
    from uxnet.memory.planner import predict_step
    from uxnet.memory.report import describe, format_table
    from uxnet.memory.step import MODEL_KINDS, make_spec

    specs = [make_spec(kind=kind, roi=flops.PAPER_PATCH, batch=2, device=device, **flops.DEFAULT_MODEL)
             for kind in MODEL_KINDS]
    predictions = [predict_step(spec) for spec in specs]
    print()
    print(f"predicted memory of one training step of {describe(specs[0])} (uxnet memory; nothing allocated)")
    print(format_table(predictions))
    return predictions


def run(args) -> int:
    from uxnet.bench import flops
    from uxnet.bench.presets import SIZES, tiny_size
    from uxnet.bench.report import add_speedups, format_table, plot_speedups
    from uxnet.bench.runner import all_cases, run_case
    from uxnet.commands.info import collect
    from uxnet.progress import Progress

    if args.inference:
        from uxnet.bench import deploy

        if _device(args.device) != "cpu":
            raise SystemExit("uxnet bench --inference measures CPU deployment routes; use --device cpu")
        return deploy.run(args, size=args.inference_size)
    _validate(args)
    device = _device(args.device)
    size = tiny_size() if args.size == "tiny" else SIZES[args.size]
    kinds = [] if args.no_model else args.model_kinds
    cases = all_cases(size, device, args.dtypes, args.backends, args.ops, args.kernels, args.layouts, kinds)
    started = time.perf_counter()
    progress = Progress(len(cases), "bench", "cases")
    rows = []
    for case in cases:
        rows.append(run_case(case, size, include_slow=args.include_slow, with_memory=not args.no_memory,
                             budget_s=args.budget, min_rounds=args.min_reps, max_rounds=args.reps))
        progress.update(1, f"{case.group} | {case.label}")
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
