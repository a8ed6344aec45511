"""Peak memory and time of one UXNet training step: reference vs fast backend, with and without activation
checkpointing (the numbers of docs/PERFORMANCE.md, section E).

CPU: each case runs in a fresh subprocess; the peak is the growth of the process's resident-set high-water mark
(``ru_maxrss``) over one forward + backward + SGD step, measured after the model, input and gradients of a
warm-up-free start exist. CUDA: ``torch.cuda.max_memory_allocated`` over the step, after one warm-up step.
Time: median of ``--repeats`` further steps.

    python examples/training_memory.py --size 64 --feat-size 48 96 192 384 --hidden-size 768
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="cubic input edge (multiple of 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--feat-size", type=int, nargs=4, default=(48, 96, 192, 384))
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--out-chans", type=int, default=14)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["reference", "auto"])
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "CHECKPOINTING"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args, backend: str, checkpointing: bool) -> dict:
    import uxnet_kernels as uk
    from uxnet import UXNet

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UXNet(in_chans=1, out_chans=args.out_chans, feat_size=args.feat_size, hidden_size=args.hidden_size,
                  activation_checkpointing=checkpointing).to(device)
    x = torch.randn(args.batch, 1, *(args.size,) * 3, device=device)
    y = torch.randint(0, args.out_chans, (args.batch, *(args.size,) * 3), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for p in model.parameters():  # gradients exist before the measured step, as in a training loop
        p.grad = torch.zeros_like(p)

    def step():
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    with uk.use_backend(backend):
        if device.type == "cuda":
            step()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_peak_bytes()
            step()
            peak = _rss_peak_bytes() - base
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        used = uk.backend_report(device)["last_used"]
    return {"backend": backend, "checkpointing": checkpointing, "peak_step_bytes": peak,
            "median_step_s": statistics.median(times), "ops": used}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args, args.child[0], args.child[1] == "1")))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for backend in args.backends:
        for ckpt in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", backend, ckpt],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{backend:9s} checkpointing={'on ' if r['checkpointing'] else 'off'}  peak step memory "
                  f"{r['peak_step_bytes'] / 2**20:8.0f} MiB  median step {r['median_step_s']:.2f} s  ops {r['ops']}",
                  flush=True)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
