"""``uxnet memory``: predict the memory of one training step without allocating it.

    uxnet memory --roi 128 --batch 2 --budget 24GB            # does 128^3 batch 2 fit in 24 GB?
    uxnet memory --roi 96 --batch 2 --official --checkpointing --amp

Prints the bytes autograd saves for backward per model block and the peak of one training step (parameters,
gradients, optimizer state, batch, activations and backward temporaries), for UXNet and with ``--official`` next to
the official model's (plain PyTorch, no activation checkpointing: the official code has none). See
``uxnet/memory/planner.py`` for the method and docs/PERFORMANCE.md for how close it comes to measurements.
"""

import json
import sys
import time

EXIT_ERROR = 2
NOT_PREDICTED = ("not predicted: cuDNN/cuBLAS workspaces and other memory kernels allocate internally (CPU "
                 "convolution buffers are modelled), allocator overheads, a process's one-time first-step "
                 "allocations (see docs/PERFORMANCE.md)")


def add_arguments(parser) -> None:
    parser.add_argument("--roi", type=int, nargs="+", default=[96], metavar="N",
                        help="input patch: 1 or 3 multiples of 16 (default 96)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--out-chans", type=int, default=14, help="classes (default 14)")
    parser.add_argument("--feat-size", type=int, nargs=4, default=None, metavar="C",
                        help="channels of the four encoder stages (default 48 96 192 384)")
    parser.add_argument("--hidden-size", type=int, default=None, help="bottleneck channels (default 768)")
    parser.add_argument("--depths", type=int, nargs=4, default=None, metavar="D",
                        help="UX blocks per encoder stage (default 2 2 2 2)")
    parser.add_argument("--kernel-size", type=int, default=None, help="depthwise kernel of the UX blocks (default 7)")
    parser.add_argument("--checkpointing", nargs="?", const="selective", default=None, choices=("selective", "full"),
                        help="UXNet(activation_checkpointing=...): selective (bare --checkpointing, = True) or full "
                             "(the official model stays without)")
    parser.add_argument("--amp", nargs="?", const="auto", default=None, choices=("auto", "bfloat16", "float16"),
                        help="train under torch.autocast: bfloat16 or float16 (bare --amp: bfloat16 on CPU, "
                             "float16 on CUDA)")
    parser.add_argument("--official", action="store_true",
                        help="also predict the official model (plain PyTorch ops) and print it alongside")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the step would run (default auto: cuda if this torch sees a GPU, else cpu); "
                             "cuda without a GPU here is emulated on the CPU (the output says what that ignores)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="adamw (default; two state tensors per parameter) or sgd (no momentum, no state)")
    parser.add_argument("--budget", default=None, metavar="SIZE",
                        help="memory to fit in, e.g. 24GB (10^9), 24GiB or 24G (2^30): prints whether each peak fits")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON instead of tables")


def _fail(message: str) -> int:
    print(f"uxnet memory: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _specs(args):
    import torch

    from uxnet.memory.step import make_spec

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = args.amp
    if amp == "auto":
        amp = "float16" if device == "cuda" else "bfloat16"
    config = dict(in_chans=args.in_chans, out_chans=args.out_chans)
    for key in ("feat_size", "hidden_size", "depths", "kernel_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    common = dict(roi=args.roi, batch=args.batch, amp=amp, device=device, optimizer=args.optimizer, **config)
    specs = [make_spec(kind="uxnet", checkpointing=args.checkpointing or False, **common)]
    if args.official:
        specs.append(make_spec(kind="official", checkpointing=False, **common))
    return specs


def run(args) -> int:
    from uxnet.memory.planner import predict_step
    from uxnet.memory.report import budget_verdicts, describe, format_budget, format_peaks, format_table, parse_size

    try:
        budget = None if args.budget is None else parse_size(args.budget)
        specs = _specs(args)
        start = time.perf_counter()
        predictions = [predict_step(spec) for spec in specs]
        elapsed = time.perf_counter() - start
    except (ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    notes = list(dict.fromkeys(n for p in predictions for n in p.notes))
    if args.json:
        payload = {"predictions": [p.as_dict() for p in predictions], "elapsed_s": elapsed, "notes": notes}
        if budget is not None:
            payload["budget_bytes"] = budget
            payload["budget"] = budget_verdicts(predictions, budget)
        print(json.dumps(payload, indent=2))
        return 0
    print(f"uxnet memory: one training step of {describe(specs[0])}")
    print(f"predicted with fake tensors in {elapsed:.1f} s (nothing allocated)"
          + ("; the official model has no activation checkpointing" if args.official and args.checkpointing else ""))
    print()
    print(format_table(predictions))
    print()
    print(format_peaks(predictions))
    if budget is not None:
        print(format_budget(predictions, args.budget, budget))
    for note in notes:
        print(f"note: {note}")
    print(NOT_PREDICTED)
    return 0
