"""Compact tables from the GPU validation's JSON files, with the issue-4 targets checked.

    python benchmarks/gpu/summarize.py gpu-results [--peak-tflops 66.9]

Reads ops.json, ops_instance_norm.json, profile.json and memory.json from the directory (each optional), prints
markdown tables and writes summary.json next to them.
"""

import argparse
import json
import os
import sys
from collections import defaultdict


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def dwconv_table(records):
    """Rows (shape, k, dtype, pass) with one column per implementation and triton's speedup vs best torch."""
    cells = defaultdict(dict)
    for r in records:
        if r.get("op") == "dwconv3d" and "ms" in r and r["pass"] in ("fwd", "fwd+bwd"):
            cells[(tuple(r["shape"]), r["k"], r["dtype"], r["pass"])][r["impl"]] = r
    impls = ["triton", "triton_ncdhw", "torch_cl", "torch_ncdhw"]
    lines = ["| C x S^3 | k | dtype | pass | " + " | ".join(f"{i} ms" for i in impls)
             + " | triton TFLOP/s | speedup vs best torch |", "|" + "---|" * (len(impls) + 6)]
    rows = []
    for (shape, k, dtype, which), by_impl in sorted(cells.items()):
        torch_ms = [by_impl[i]["ms"] for i in ("torch_cl", "torch_ncdhw") if i in by_impl]
        tri = by_impl.get("triton")
        speedup = min(torch_ms) / tri["ms"] if tri and torch_ms else None
        rows.append(dict(shape=shape, k=k, dtype=dtype, **{"pass": which}, speedup=speedup,
                         tflops=tri["tflops"] if tri else None))
        lines.append(f"| {shape[1]} x {shape[2]}^3 | {k} | {dtype} | {which} | "
                     + " | ".join(_fmt(by_impl[i]["ms"]) if i in by_impl else "-" for i in impls)
                     + f" | {_fmt(tri['tflops'] if tri else None)} | {_fmt(speedup)} |")
    return lines, rows


def voxel_table(records):
    cells = defaultdict(dict)
    for r in records:
        if r.get("op") in ("layer_norm_channels_first", "ux_mlp") and "ms" in r:
            cells[(r["op"], tuple(r["shape"]), r["dtype"], r["pass"])][r["impl"]] = r
    lines = ["| op | C x S^3 | dtype | pass | triton ms | reference ms | cuda ms | floor ms | triton x floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, dtype, which), by_impl in sorted(cells.items()):
        tri = by_impl.get("triton", {})
        lines.append(f"| {op} | {shape[1]} x {shape[2]}^3 | {dtype} | {which} | {_fmt(tri.get('ms'))} | "
                     f"{_fmt(by_impl.get('reference', {}).get('ms'))} | {_fmt(by_impl.get('cuda', {}).get('ms'))} | "
                     f"{_fmt(tri.get('floor_ms'))} | {_fmt(tri.get('x_floor'))} |")
    return lines


IN_IMPLS = ["triton", "triton_ncdhw", "reference", "reference_ncdhw", "torch_compile"]


def instance_norm_table(records):
    """Rows (variant, shape, dtype, pass), one column per implementation; triton's speedup vs the faster reference
    layout and vs torch.compile of the reference."""
    cells = defaultdict(dict)
    for r in records:
        if r.get("op", "").startswith("instance_norm") and "ms" in r:
            cells[(r["variant"], tuple(r["shape"]), r["dtype"], r["pass"])][r["impl"]] = r
    lines = ["| variant | N x C x S^3 | dtype | pass | " + " | ".join(f"{i} ms" for i in IN_IMPLS)
             + " | floor ms | triton x floor | speedup vs reference | speedup vs torch_compile |",
             "|" + "---|" * (len(IN_IMPLS) + 8)]
    rows = []
    for (variant, shape, dtype, which), by_impl in sorted(cells.items()):
        tri = by_impl.get("triton")
        refs = [by_impl[i]["ms"] for i in ("reference", "reference_ncdhw") if i in by_impl]
        vs_ref = min(refs) / tri["ms"] if tri and refs else None
        vs_compile = by_impl["torch_compile"]["ms"] / tri["ms"] if tri and "torch_compile" in by_impl else None
        rows.append(dict(variant=variant, shape=shape, dtype=dtype, **{"pass": which}, speedup_vs_reference=vs_ref,
                         speedup_vs_torch_compile=vs_compile, x_floor=tri.get("x_floor") if tri else None))
        lines.append(f"| {variant} | {shape[0]} x {shape[1]} x {shape[2]}^3 | {dtype} | {which} | "
                     + " | ".join(_fmt(by_impl[i]["ms"]) if i in by_impl else "-" for i in IN_IMPLS)
                     + f" | {_fmt(tri.get('floor_ms') if tri else None)} | {_fmt(tri.get('x_floor') if tri else None)}"
                     + f" | {_fmt(vs_ref)} | {_fmt(vs_compile)} |")
    return lines, rows


def targets(records, rows, peak_tflops):
    """The issue-4 targets at 48 x 48^3, batch 2, k = 7 (None where not measured)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        match = [r for r in rows if r["shape"][1:3] == (48, 48) and r["k"] == 7 and r["dtype"] == dtype
                 and r["pass"] == "fwd+bwd"]
        out[f"fwd+bwd speedup >= 3x ({dtype})"] = match[0]["speedup"] if match else None
    fwd = [r for r in rows if r["shape"][1:3] == (48, 48) and r["k"] == 7 and r["dtype"] == "float32"
           and r["pass"] == "fwd"]
    out["fwd fp32 fraction of FMA peak >= 0.5"] = fwd[0]["tflops"] / peak_tflops if fwd and fwd[0]["tflops"] else None
    single = {r["pass"]: r["ms"] for r in records if r.get("op") == "dwconv3d" and r.get("impl") == "triton"
              and r.get("layout") == "channels_last_3d" and r.get("dtype") == "float32" and "ms" in r
              and tuple(r["shape"][1:3]) == (48, 48) and r["k"] == 7}
    for name in ("grad_input", "grad_weight"):
        out[f"{name} / fwd <= 2"] = single[name] / single["fwd"] if name in single and "fwd" in single else None
    return out


def profile_table(profile):
    lines = []
    for res in profile.get("results", []):
        if "error" in res:
            lines.append(f"- backend {res['backend']}: FAILED {res['error']}")
            continue
        peak = res.get("peak_memory_bytes")
        lines.append(f"- backend {res['backend']}: step {_fmt(res['step_ms_median'])} ms median, peak memory "
                     f"{_fmt(peak / 2**30 if peak else None)} GiB, ops on {res.get('backends_used')}")
        lines.append("  | op | calls | self device ms | self CPU ms |")
        lines.append("  |---|---|---|---|")
        for op in res["top_ops"]:
            lines.append(f"  | {op['name'][:60]} | {op['calls']} | {op['self_device_ms']:.2f} | {op['self_cpu_ms']:.2f} |")
    return lines


def memory_table(memory):
    """Measured vs predicted memory of a training step, official vs uxnet, per precision (memory_step.py)."""
    gpu = memory.get("compared") == "peak_bytes"
    what = "peak (max_memory_allocated)" if gpu else "rise above step start (RSS high-water mark)"
    key = "peak_bytes" if gpu else "step_bytes"
    values = [r["measured"]["steady"][key] or 0 for r in memory.get("results", []) if "error" not in r["measured"]]
    scale, unit = (2**30, "GiB") if max(values, default=0) >= 2**30 else (2**20, "MiB")
    lines = [f"{memory.get('size')}^3, batch {memory.get('batch')}; {what}; {unit}",
             "| model | precision | measured | predicted | error | first step | median step ms | vs official |",
             "|---|---|---|---|---|---|---|---|"]
    official = {}
    for r in memory.get("results", []):
        measured, predicted = r.get("measured", {}), r.get("predicted", {})
        if "error" in measured:
            lines.append(f"| {r['kind']} | {r['precision']} | FAILED: {measured['error'][:80]} | | | | | |")
            continue
        value = measured["steady"][key]
        first = measured["first"][key]
        if r["kind"] == "official":
            official[r["precision"]] = value
        ref = official.get(r["precision"])
        median = measured.get("step_s_median")
        lines.append(
            f"| {r['kind']} | {r['precision']} | {_fmt(value / scale if value else None)} | "
            f"{_fmt(predicted[key] / scale) if key in predicted else 'FAILED'} | "
            f"{_fmt(100 * r['relative_error'], 2) + ' %' if r.get('relative_error') is not None else '-'} | "
            f"{_fmt(first / scale if first else None)} | {_fmt(median * 1e3 if median else None)} | "
            f"{_fmt(value / ref if ref and value else None)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--peak-tflops", type=float, default=66.9, help="fp32 FMA peak of the card (H100 SXM)")
    args = parser.parse_args(argv)
    ops = _load(os.path.join(args.directory, "ops.json")) or {}
    profile = _load(os.path.join(args.directory, "profile.json")) or {}
    memory = _load(os.path.join(args.directory, "memory.json")) or {}
    records = ops.get("records", [])
    print(f"# GPU validation: {ops.get('machine', {}).get('device', '?')}, {ops.get('machine', {}).get('date', '?')}"
          + (" (DRY RUN: not measurements)" if ops.get("dry_run") else ""))
    print(f"copy bandwidth {_fmt(ops.get('copy_bandwidth_gbs'))} GB/s; torch.compile check: "
          f"{ops.get('compile_check')}")
    dw_lines, rows = dwconv_table(records)
    print("\n## dwconv3d\n" + "\n".join(dw_lines))
    print("\n## layer_norm_channels_first and ux_mlp\n" + "\n".join(voxel_table(records)))
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        checks = [r["value"] for r in records if r.get("check") and r.get("op") == "dwconv3d" and r["dtype"] == dtype
                  and r["value"] is not None]
        if checks:
            print(f"dwconv3d triton vs torch (float32 math), {dtype}: max relative error {max(checks):.2e} "
                  f"({'ok' if max(checks) <= tol else 'FAIL'}, tolerance {tol:.0e})")
    errors = [r for r in records if "error" in r]
    if errors:
        print(f"\n{len(errors)} failed cases, first: {errors[0]}")
    if ops.get("skipped"):
        print(f"\n{len(ops['skipped'])} cases skipped (time budget), first: {ops['skipped'][0]}")
    goal = targets(records, rows, args.peak_tflops)
    print("\n## issue-4 targets (48 x 48^3, batch 2, k = 7)")
    for name, value in goal.items():
        print(f"- {name}: {_fmt(value)}")
    if profile:
        print("\n## UXNet training step (torch.profiler)\n" + "\n".join(profile_table(profile)))
    in_ops = _load(os.path.join(args.directory, "ops_instance_norm.json")) or {}
    in_records = records + in_ops.get("records", [])
    in_lines, in_rows = instance_norm_table(in_records)
    if in_rows:
        print("\n## instance_norm_lrelu and instance_norm_add_lrelu (decoder)"
              + (" (DRY RUN: not measurements)" if in_ops.get("dry_run") else "") + "\n" + "\n".join(in_lines))
        print(f"torch.compile check (Triton instance-norm ops): {in_ops.get('compile_check_instance_norm')}")
        for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
            checks = [r["value"] for r in in_records if r.get("check") and r.get("op", "").startswith("instance_norm")
                      and r["dtype"] == dtype and r["value"] is not None]
            if checks:
                print(f"instance-norm triton vs float32 reference, {dtype}: max relative error {max(checks):.2e} "
                      f"({'ok' if max(checks) <= tol else 'FAIL'}, tolerance {tol:.0e})")
        in_errors = [r for r in in_ops.get("records", []) if "error" in r]
        if in_errors:
            print(f"{len(in_errors)} failed instance-norm cases, first: {in_errors[0]}")
        if in_ops.get("skipped"):
            print(f"{len(in_ops['skipped'])} instance-norm cases skipped (time budget), first: {in_ops['skipped'][0]}")
    for case in memory.get("skipped", []):
        print(f"memory_step skipped {case['kind']} {case['precision']}: {case['reason']}")
    if memory:
        print("\n## training-step memory, official vs uxnet (memory_step.py)\n" + "\n".join(memory_table(memory)))
    with open(os.path.join(args.directory, "summary.json"), "w") as f:
        json.dump(dict(targets=goal, dwconv_rows=rows, instance_norm_rows=in_rows), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
