"""Profile one UXNet training step (forward + backward + AdamW step) per backend with torch.profiler.

    python benchmarks/gpu/profile_step.py --out gpu-results/profile.json [--size 96] [--batch 2] [--dry-run]

For the "reference" backend (the official model's PyTorch ops) and "auto" (Triton kernels on CUDA): median step
time over a few steps, peak memory, and the top 15 ops by device time (CUDA time on a GPU, CPU time in a dry
run). --dry-run: CPU, a tiny model at 32^3, to test this script itself.
"""

import argparse
import sys

import common

common.prepare_dry_run()

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import uxnet_kernels as uk  # noqa: E402
from uxnet.timing import interleaved  # noqa: E402


def _model_and_batch(size, batch, dry_run, dev):
    from uxnet import UXNet

    if dry_run:
        model = UXNet(in_chans=1, out_chans=2, depths=(1, 1, 1, 1), feat_size=(2, 4, 8, 16), hidden_size=16)
        size, batch = 32, 1
    else:
        model = UXNet(in_chans=1, out_chans=14)
    model = model.to(dev).to(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, 1, size, size, size, device=dev).contiguous(memory_format=torch.channels_last_3d)
    target = torch.randint(0, model.out_chans, (batch, size, size, size), device=dev)
    return model, x, target


def _step(model, opt, x, target):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss


def _device_us(event) -> float:
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0))


def profile_backend(backend, size, batch, dry_run, steps):
    dev = common.device()
    torch.manual_seed(0)
    model, x, target = _model_and_batch(size, batch, dry_run, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with uk.use_backend(backend):
        if not dry_run:
            _step(model, opt, x, target)  # warm-up: Triton compilation and autotuning happen here
            common.sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timing = interleaved({"step": lambda: _step(model, opt, x, target)}, rounds=steps, warmup=0, device=dev)["step"]
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            _step(model, opt, x, target)
            common.sync()
        used = uk.backend_report(dev)["last_used"]
    on_gpu = torch.cuda.is_available()
    events = sorted(prof.key_averages(), key=lambda e: _device_us(e) if on_gpu else e.self_cpu_time_total,
                    reverse=True)
    top = [dict(name=e.key, calls=e.count, self_device_ms=_device_us(e) / 1e3, self_cpu_ms=e.self_cpu_time_total / 1e3)
           for e in events[:15]]
    return dict(backend=backend, step_ms_median=timing.median_s * 1e3 if timing.rounds else None,
                step_ms_all=sorted(t * 1e3 for t in timing.times_s), peak_memory_bytes=peak,
                backends_used=used, top_ops=top, sorted_by="self device time" if on_gpu else "self CPU time")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results/profile.json")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    dry_run = args.dry_run or not torch.cuda.is_available()
    results = []
    for backend in ("reference", "auto"):
        try:
            results.append(profile_backend(backend, args.size, args.batch, dry_run, 0 if dry_run else args.steps))
        except Exception as exc:
            results.append(dict(backend=backend, error=repr(exc)[:1000]))
    common.write_json(args.out, dict(machine=common.machine(), dry_run=dry_run, size=args.size, batch=args.batch,
                                     results=results))
    print(f"profile_step: -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
