"""``uxnet train`` against ``examples/train_synthetic.py`` on the example's own synthetic data: held-out Dice and
wall time, both processes started together so they share the machine's load.

    PYTHONPATH=. python benchmarks/scripts/train_vs_example.py --threads 1 --workers 1
    PYTHONPATH=. python benchmarks/scripts/train_vs_example.py --sequential        # one after the other instead

The example's volumes (16 training, 4 held-out, 48^3, its seeds) are written as an MSD folder (``dataset.json`` with
a ``validation`` list, so both train and validate on the same cases). ``uxnet train`` runs the official recipe with
the example's settings where they are flags: 1 mm RAS, CT window -250..250, ROI 32, batch 2 (one crop each), AdamW
3e-3 (weight decay 1e-5), 240 steps, the example's model (feat 8/16/32/64, hidden 64, depths 1/1/1/1, k 7), sliding
window overlap 0.25 with 4 windows per forward, validation at the end. What differs is the recipe's own: pos/neg
crops and a random affine instead of uniform crops and flips, and a cosine schedule (``--lr-schedule cosine``)
instead of the example's one-cycle. Compared: the mean held-out Dice without background (the example's metric) and
each process's wall time (the example's includes writing its 20 volumes, about a second).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir))
EXAMPLE = os.path.join(REPO, "examples", "train_synthetic.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--workers", type=int, default=1, help="uxnet train's data workers")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip-prob", type=float, default=0.0, help="uxnet train --flip-prob (the example flips at 0.5)")
    p.add_argument("--sequential", action="store_true", help="run the example, then uxnet train")
    p.add_argument("--dir", help="working folder (default: a temporary one)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def write_msd(root, seed):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_synthetic", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    defaults = ex.parse_args([])
    os.makedirs(root, exist_ok=True)
    train = ex.write_dataset(root, defaults.n_train, defaults.size, defaults.noise, seed, "train")
    val = ex.write_dataset(root, defaults.n_val, defaults.size, defaults.noise, seed + 10_000, "val")
    rel = lambda items: [{k: "./" + os.path.basename(v) for k, v in it.items()} for it in items]  # noqa: E731
    meta = {"name": "train_synthetic", "modality": {"0": "CT"}, "labels": dict(enumerate(ex.CLASS_NAMES)),
            "training": rel(train), "validation": rel(val)}
    meta["labels"] = {str(k): v for k, v in meta["labels"].items()}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    work = args.dir or tempfile.mkdtemp()
    data, run = os.path.join(work, "msd"), os.path.join(work, "run")
    write_msd(data, args.seed)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ex_cmd = [sys.executable, EXAMPLE, "--threads", str(args.threads), "--steps", str(args.steps), "--seed",
              str(args.seed), "--json", os.path.join(work, "example.json")]
    ux_cmd = [sys.executable, "-m", "uxnet.cli", "train", data, "--output", run, "--spacing", "1", "1", "1",
              "--intensity", "-250", "250", "--roi", "32", "--batch", "2", "--crops-per-volume", "1", "--lr", "3e-3",
              "--weight-decay", "1e-5", "--lr-schedule", "cosine", "--iterations", str(args.steps), "--val-every",
              str(args.steps), "--overlap", "0.25", "--sw-batch", "4", "--feat-size", "8", "16", "32", "64",
              "--hidden-size", "64", "--depths", "1", "1", "1", "1", "--kernel-size", "7", "--budget", "off",
              "--workers", str(args.workers), "--threads", str(args.threads), "--seed", str(args.seed),
              "--no-tensorboard", "--log-every", "20", "--flip-prob", str(args.flip_prob)]
    print("example:", " ".join(ex_cmd[1:]), "\nuxnet:  ", " ".join(ux_cmd[2:]), flush=True)
    walls, procs = {}, {}
    logs = {n: open(os.path.join(work, f"{n}.log"), "w") for n in ("example", "uxnet")}
    for name, cmd in (("example", ex_cmd), ("uxnet", ux_cmd)):
        t0 = time.perf_counter()
        procs[name] = (subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=REPO), t0)
        if args.sequential:
            procs[name][0].wait()
            walls[name] = time.perf_counter() - t0
    while len(walls) < 2:
        for name, (proc, t0) in procs.items():
            if name not in walls and proc.poll() is not None:
                walls[name] = time.perf_counter() - t0
        time.sleep(0.5)
    for name, (proc, _) in procs.items():
        if proc.returncode:
            raise SystemExit(f"{name} exited {proc.returncode}; see {os.path.join(work, name + '.log')}")
    with open(os.path.join(work, "example.json")) as f:
        ex = json.load(f)
    with open(os.path.join(run, "val.csv")) as f:
        val = list(csv.DictReader(f))[-1]
    names = [n for n in val if n.startswith("dice/") and n != "dice/background"]
    result = {"example": {"mean_dice": ex["mean_dice"], "dice": ex["dice_per_class"], "wall_s": walls["example"],
                          "train_s": ex["train_seconds"]},
              "uxnet": {"mean_dice": float(val["mean_dice_no_bg"]), "dice": [float(val[n]) for n in names],
                        "wall_s": walls["uxnet"]},
              "args": vars(args), "work": work}
    for name in ("example", "uxnet"):
        r = result[name]
        print(f"{name:8s} held-out Dice {' / '.join(f'{d:.3f}' for d in r['dice'])} (mean {r['mean_dice']:.3f}), "
              f"wall {r['wall_s']:.0f} s")
    ok = result["uxnet"]["mean_dice"] >= result["example"]["mean_dice"] and walls["uxnet"] <= walls["example"]
    print(f"uxnet train reaches the example's Dice in no more wall time: {'yes' if ok else 'no'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
