"""Peak memory and time of one UXNet training step, official vs uxnet, with and without activation checkpointing,
measured and predicted (the numbers of docs/PERFORMANCE.md, "Training integration" and "Predicted vs measured").

Each case is measured in a fresh process (``uxnet.memory.measure``): on the CPU the growth of the resident-set
high-water mark over a step with ``MALLOC_MMAP_THRESHOLD_=65536``, for the process's first step and for the second
(steady state); on CUDA ``torch.cuda.max_memory_allocated``. Next to it, what ``uxnet memory`` predicts without
allocating anything (``uxnet.memory.planner``). Time: median of ``--repeats`` further steps.

    python examples/training_memory.py --size 64 --batch 1 --optimizer sgd
"""

import argparse
import json
import sys

from uxnet.memory.measure import measure_in_subprocess
from uxnet.memory.planner import predict_step
from uxnet.memory.step import make_spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[64], help="input edge(s), multiples of 16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--feat-size", type=int, nargs=4, default=(48, 96, 192, 384))
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--out-chans", type=int, default=14)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="sgd")
    p.add_argument("--amp", choices=("bfloat16", "float16"), default=None)
    p.add_argument("--kinds", nargs="+", choices=("official", "uxnet"), default=["official", "uxnet"])
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on", "full"), default=["off", "on"],
                   help="on: UXNet(activation_checkpointing=True), the selective mode; full: whole-block recompute")
    p.add_argument("--repeats", type=int, default=0, help="timed steps after the two measured ones")
    p.add_argument("--no-predict", action="store_true", help="measure only")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    return p.parse_args(argv)


def _mib(n):
    return "-" if n is None else f"{n / 2**20:8.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    print(f"{'size':>5s} {'model':9s} {'ckpt':4s} {'first step':>10s} {'steady':>8s} {'predicted':>9s} "
          f"{'error':>7s} {'median step':>11s}   (MiB above what the step starts with)")
    for size in args.size:
        for kind in args.kinds:
            for ckpt in args.checkpointing:
                checkpointing = {"off": False, "on": True}.get(ckpt, ckpt)
                spec = make_spec(kind=kind, roi=size, batch=args.batch, checkpointing=checkpointing, amp=args.amp,
                                 device=args.device, optimizer=args.optimizer, out_chans=args.out_chans,
                                 feat_size=list(args.feat_size), hidden_size=args.hidden_size)
                measured = measure_in_subprocess(spec, repeats=args.repeats)
                predicted = None if args.no_predict else predict_step(spec)
                steady = measured["steady"]["step_bytes"]
                error = None
                if predicted is not None and steady:
                    error = predicted.step_bytes / steady - 1
                row = dict(measured, predicted=predicted.as_dict() if predicted else None, relative_error=error)
                rows.append(row)
                median = measured["step_s_median"]
                print(f"{size:5d} {kind:9s} {ckpt:4s} {_mib(measured['first']['step_bytes']):>10s} "
                      f"{_mib(steady):>8s} {_mib(predicted.step_bytes if predicted else None):>9s} "
                      f"{'-' if error is None else f'{100 * error:+.1f}%':>7s} "
                      f"{'-' if median is None else f'{median:.2f} s':>11s}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
