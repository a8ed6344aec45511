"""Training throughput inside ``uxnet train`` against the bare model step, on the CPU, side by side.

    PYTHONPATH=. python benchmarks/scripts/train_overhead.py --workers 2 --rounds 3 --steps 12

The bare step: forward, ``DiceCELoss``, backward and AdamW on one batch of random crops that is already in memory,
the model built exactly as ``uxnet train`` builds it. ``uxnet train``: the same model, loss and optimizer in
:func:`uxnet.training.loop.train` on a synthetic MSD folder (``tests/train_synth.py``), the data pipeline on
``--workers`` thread workers, validation and checkpoints out of the timed steps (``step_s`` of ``train.csv``, which
counts from asking the loader for the batch to the end of the optimizer step, data wait included). Rounds
alternate (bare, train, bare, train, ...) so both see the same machine load; the first ``--warmup`` steps of each
are dropped. Reported: the median step of each, their ratio, and the ratio per round (a round's two runs
follow each other, so they see the most similar load) with its median. Wall times suffer from other jobs on a shared machine; the CPU time per step (the
process's, every thread, ``cpu_s`` in ``train.csv``) less so, and it charges the data workers to the step.
"""

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "tests"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="volumes per step (one crop each)")
    p.add_argument("--size", type=int, default=48, help="edge of the synthetic volumes")
    p.add_argument("--volumes", type=int, default=6)
    p.add_argument("--feat-size", type=int, nargs=4, default=(8, 16, 32, 64))
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def model_config(args):
    return dict(in_chans=1, out_chans=4, feat_size=list(args.feat_size), hidden_size=args.hidden_size,
                depths=[1, 1, 1, 1], kernel_size=7)


def bare_steps(args, n):
    from monai.losses import DiceCELoss

    import uxnet_kernels  # noqa: F401
    from uxnet import DeepSupervisionLoss, UXNet

    torch.manual_seed(0)
    model = UXNet(**model_config(args))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    x = torch.rand(args.batch, 1, *(args.roi,) * 3)
    y = torch.randint(0, 4, (args.batch, 1, *(args.roi,) * 3))
    times, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def train_steps(args, data, n, run_dir):
    from uxnet.training.loop import TrainConfig, train
    from uxnet.training.recipe import Recipe

    cfg = model_config(args)
    recipe = Recipe(spacing=(1.0, 1.0, 1.0), roi=(args.roi,) * 3, batch=args.batch, crops_per_volume=1, lr=3e-3,
                    weight_decay=1e-5, iterations=n, val_every=10**6)
    config = TrainConfig(data=str(data), output=str(run_dir), recipe=recipe, budget="off", workers=args.workers,
                         model={k: cfg[k] for k in ("feat_size", "hidden_size", "depths", "kernel_size")},
                         save_every=10**6, tensorboard=False, log_every=1, threads=args.threads)
    train(config, out=lambda *a: None)
    with open(os.path.join(run_dir, "train.csv")) as f:
        rows = list(csv.DictReader(f))
    return [float(r["step_s"]) for r in rows], [float(r["cpu_s"]) for r in rows]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from train_synth import write_msd

    tmp = tempfile.mkdtemp()
    data = write_msd(os.path.join(tmp, "data"), n=args.volumes, size=args.size)
    bare, inside, waits, paired, bare_cpu, inside_cpu = [], [], [], [], [], []
    for r in range(args.rounds):
        b, bc = bare_steps(args, args.steps)
        b, bc = b[args.warmup:], bc[args.warmup:]
        run_dir = os.path.join(tmp, f"run{r}")
        t, tc = train_steps(args, data, args.steps, run_dir)
        bare_cpu += bc
        inside_cpu += tc[args.warmup:]
        with open(os.path.join(run_dir, "train.csv")) as f:
            waits += [float(row["data_wait_s"]) for row in list(csv.DictReader(f))[args.warmup:]]
        bare += b
        inside += t[args.warmup:]
        paired.append(statistics.median(t[args.warmup:]) / statistics.median(b))
        print(f"round {r}: bare {statistics.median(b) * 1000:.0f} ms, uxnet train "
              f"{statistics.median(t[args.warmup:]) * 1000:.0f} ms; CPU time per step: bare "
          f"{statistics.median(bc) * 1000:.0f} ms, uxnet train {statistics.median(tc[args.warmup:]) * 1000:.0f} ms",
          flush=True)
    mb, mt = statistics.median(bare), statistics.median(inside)
    print(f"median step over {len(bare)} steps each: bare {mb * 1000:.0f} ms, uxnet train {mt * 1000:.0f} ms "
          f"(data wait median {statistics.median(waits) * 1000:.1f} ms); uxnet train / bare = {mt / mb:.3f} "
          f"({args.workers} thread worker(s), torch threads {torch.get_num_threads()}, ROI {args.roi}^3, "
          f"batch {args.batch}); per round (train / bare of the same round): "
          f"{', '.join(f'{p:.2f}' for p in paired)}, median {statistics.median(paired):.3f}")
    mbc, mtc = statistics.median(bare_cpu), statistics.median(inside_cpu)
    print(f"median CPU time per step (every thread of the process, so the data workers count): bare "
          f"{mbc * 1000:.0f} ms, uxnet train {mtc * 1000:.0f} ms; uxnet train / bare = {mtc / mbc:.3f}")


if __name__ == "__main__":
    main()
