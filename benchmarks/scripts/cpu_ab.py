"""Same-run A/B of the CPU op benchmarks for two builds of uxnet, e.g. before and after a change to csrc/cpu.

    git worktree add /tmp/uxnet-base <commit>       # then build its extension in place, e.g. with this .venv:
    (cd /tmp/uxnet-base && ../path/to/.venv/bin/python setup.py build_ext --inplace)
    python benchmarks/scripts/cpu_ab.py --base /tmp/uxnet-base [--new .] [--rounds 3] [--json ab.json]

Each round runs benchmarks/scripts/cpu_dwconv3d.py and cpu_ln_mlp.py (from this checkout, the same benchmark
code for both) once per build, alternating which build goes first, in fresh processes whose `import uxnet_kernels`
resolves to that build (PYTHONPATH, run outside the checkouts). Per case it prints the median over rounds of the
uxnet time and of its speedup against PyTorch (measured in the same process), and new / base. On a shared
machine read the speedup columns: they compare each build with PyTorch timed side by side.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_dwconv(tree, python, threads):
    out = subprocess.run([python, os.path.join(HERE, "cpu_dwconv3d.py"), "--threads", str(threads), "--rounds", "3"],
                         cwd=tempfile.gettempdir(), env=dict(os.environ, PYTHONPATH=tree), capture_output=True,
                         text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and re.match(r"^[\d.]+$", cells[3]):
            kind, shape, layout, ux, _, _, _, vs_best, _ = cells
            rows[f"dwconv3d {kind} {shape} {layout}"] = (float(ux), float(vs_best.rstrip("x")))
    return rows


def run_ln_mlp(tree, python):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ln_mlp.json")
        subprocess.run([python, os.path.join(HERE, "cpu_ln_mlp.py"), "--json", path], cwd=tmp,
                       env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True, check=True)
        with open(path) as f:
            data = json.load(f)
    rows = {}
    for r in data["timings"]:
        key = f"{r['op']} fwd+bwd {r['channels']}x{r['size']}^3 {r['layout']}"
        rows[key] = (r["compiled_s"] * 1e3, r["speedup"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="checkout with a built uxnet_kernels/_C (the 'before')")
    parser.add_argument("--new", default=os.path.dirname(os.path.dirname(HERE)), help="the 'after' (default: here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="dwconv3d benchmark threads")
    parser.add_argument("--json", help="write the per-round results here")
    args = parser.parse_args(argv)
    trees = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    results = {name: [] for name in trees}
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        for name in order:
            rows = run_dwconv(trees[name], sys.executable, args.threads)
            rows.update(run_ln_mlp(trees[name], sys.executable))
            results[name].append(rows)
            print(f"round {r + 1}/{args.rounds}: {name} done ({len(rows)} cases)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trees": trees, "results": results}, f, indent=1)
    print(f"\nmedians over {args.rounds} rounds; base = {trees['base']}, new = {trees['new']}")
    print("| case | base ms | new ms | new/base time | base vs PyTorch | new vs PyTorch | new/base speedup |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for key in results["base"][0]:
        if not all(key in rows for rows in results["base"] + results["new"]):
            continue
        t_b = statistics.median(rows[key][0] for rows in results["base"])
        t_n = statistics.median(rows[key][0] for rows in results["new"])
        s_b = statistics.median(rows[key][1] for rows in results["base"])
        s_n = statistics.median(rows[key][1] for rows in results["new"])
        ratios.append(s_n / s_b)
        print(f"| {key} | {t_b:.2f} | {t_n:.2f} | {t_n / t_b:.2f} | {s_b:.2f}x | {s_n:.2f}x | {s_n / s_b:.2f} |")
    print(f"\nnew/base speedup ratio: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
