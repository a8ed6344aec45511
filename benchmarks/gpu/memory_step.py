"""Peak memory and time of one training step, official vs uxnet, float32 and bf16 autocast, with the prediction of
``uxnet memory`` next to each measurement.

    python benchmarks/gpu/memory_step.py --out gpu-results/memory.json [--size 96] [--batch 2] [--dry-run]

Each case (``uxnet.memory.step``: AdamW, cross entropy, 14 classes, default UXNet; "official" is the plain
PyTorch model) is first predicted with fake tensors (nothing allocated), then measured
(``uxnet.memory.measure.measure_step``): the process's first step (compilation, autotuning, optimizer state),
``torch.cuda.max_memory_allocated`` over the second (absolute, i.e. with parameters, gradients, optimizer state and
batch, as the prediction's peak; and above the allocation at step start), and the median of ``--repeats`` timed
steps. ``torch.cuda.empty_cache()`` between cases. An out-of-memory case is recorded as such.
--dry-run (CPU): a tiny model at 32^3, each case measured in a fresh process (resident-set high-water mark over
the step, compared with the predicted rise above the step start), to test this script itself.
"""

import argparse
import gc
import sys
import time

import common

import torch  # noqa: E402

TINY = dict(feat_size=[4, 8, 16, 32], hidden_size=16, depths=[1, 1, 1, 1])
PRECISIONS = (None, "bfloat16")


def _spec(kind, amp, size, batch, dry_run, device):
    from uxnet.memory.step import make_spec

    config = dict(TINY) if dry_run else {}
    return make_spec(kind=kind, roi=size, batch=batch, amp=amp, device=device, out_chans=14, **config)


def _predict(spec):
    from uxnet.memory.planner import predict_step

    start = time.perf_counter()
    try:
        return predict_step(spec).as_dict(), time.perf_counter() - start
    except Exception as exc:  # report and keep measuring: the measurement is what this step is for
        return {"error": repr(exc)[:1000]}, time.perf_counter() - start


def _measure(spec, repeats, dry_run):
    from uxnet.memory.measure import measure_in_subprocess, measure_step

    try:
        if dry_run:
            return measure_in_subprocess(spec, repeats=repeats, timeout=600)
        return measure_step(spec, repeats=repeats)
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:
        return {"error": repr(exc)[:1000]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _relative_error(predicted, measured, on_gpu):
    """Predicted / measured - 1 for the quantity measured on this device (absolute peak on CUDA, rise above the
    step start on the CPU)."""
    if "error" in predicted or "error" in measured:
        return None
    key = "peak_bytes" if on_gpu else "step_bytes"
    value = measured["steady"][key]
    return predicted[key] / value - 1 if value else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results/memory.json")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=140.0,
                        help="cases not started within this many seconds are recorded as skipped")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    budget = common.Budget(args.budget_s)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    dry_run = not on_gpu
    size, batch = (32, 1) if dry_run else (args.size, args.batch)
    device = "cuda" if on_gpu else "cpu"
    results, skipped = [], []

    def write():  # after every case, so that a run stopped by its time limit keeps what it measured
        common.write_json(args.out, dict(machine=common.machine(), dry_run=dry_run, size=size, batch=batch,
                                         compared="peak_bytes" if on_gpu else "step_bytes", results=results,
                                         skipped=skipped))

    for kind in ("official", "uxnet"):
        for amp in PRECISIONS:
            if budget.exhausted():
                skipped.append(dict(kind=kind, precision=amp or "float32", reason=f"time budget {args.budget_s} s"))
                continue
            spec = _spec(kind, amp, size, batch, dry_run, device)
            predicted, predict_s = _predict(spec)
            measured = _measure(spec, 0 if dry_run else args.repeats, dry_run)
            results.append(dict(kind=kind, precision=amp or "float32", spec=spec.as_dict(), predicted=predicted,
                                predict_s=predict_s, measured=measured,
                                relative_error=_relative_error(predicted, measured, on_gpu)))
            print(f"memory_step: {kind} {amp or 'float32'}: "
                  + ("; ".join(f"{k}: {v['error'][:200]}" for k, v in (("predicted", predicted), ("measured", measured))
                               if "error" in v) or f"relative error {results[-1]['relative_error']}"), flush=True)
            write()
    write()
    print(f"memory_step: -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
