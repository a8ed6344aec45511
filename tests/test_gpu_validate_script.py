"""The GPU validation script's Python parts, run in their --dry-run mode (CPU, Triton interpreter, tiny sizes):
they must run end to end and write complete, error-free JSON. This checks the script, not GPU performance."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(ROOT, "benchmarks", "gpu")


def _run(script, *args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1" if not torch.cuda.is_available() else os.environ.get(
        "TRITON_INTERPRET", "0"))
    proc = subprocess.run([sys.executable, os.path.join(GPU_DIR, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_validate_sh_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    subprocess.run([bash, "-n", os.path.join(GPU_DIR, "validate.sh")], check=True)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("triton") is None, reason="triton is not installed")
def test_dry_run_end_to_end(tmp_path):
    _run("bench_ops.py", "--dry-run", "--out", str(tmp_path / "ops.json"))
    ops = json.loads((tmp_path / "ops.json").read_text())
    assert ops["dry_run"] is True and not ops["skipped"]
    errors = [r for r in ops["records"] if "error" in r]
    assert not errors, errors
    timed = {(r["op"], r["impl"], r["pass"]) for r in ops["records"] if "ms" in r}
    for impl in ("triton", "triton_ncdhw", "torch_cl", "torch_ncdhw"):
        assert {("dwconv3d", impl, "fwd"), ("dwconv3d", impl, "fwd+bwd")} <= timed
    assert {("dwconv3d", "triton", "grad_input"), ("dwconv3d", "triton", "grad_weight")} <= timed
    for op in ("layer_norm_channels_first", "ux_mlp"):
        assert {(op, "triton", "fwd"), (op, "triton", "fwd+bwd"), (op, "reference", "fwd+bwd")} <= timed
    for op, variant in (("instance_norm_lrelu", "lrelu"), ("instance_norm_add_lrelu", "residual"),
                        ("instance_norm_add_lrelu", "shortcut")):
        timed_in = {(r["impl"], r["pass"]) for r in ops["records"] if r.get("variant") == variant and "ms" in r}
        for impl in ("triton", "triton_ncdhw", "reference", "reference_ncdhw", "torch_compile"):
            assert {(impl, "fwd"), (impl, "fwd+bwd")} <= timed_in, (op, variant, impl)
    assert ops["compile_check_instance_norm"]["status"] == "skipped"  # needs CUDA
    assert all(r["ms"] > 0 for r in ops["records"] if "ms" in r)
    checks = [r["value"] for r in ops["records"] if r.get("check")]
    assert len(checks) == 4 and all(v <= 1e-5 for v in checks), checks  # dwconv3d and the 3 instance-norm variants

    _run("profile_step.py", "--dry-run", "--out", str(tmp_path / "profile.json"))
    profile = json.loads((tmp_path / "profile.json").read_text())
    by_backend = {r["backend"]: r for r in profile["results"]}
    assert set(by_backend) == {"reference", "auto"}
    for res in by_backend.values():
        assert "error" not in res, res
        assert len(res["top_ops"]) == 15
    assert set(by_backend["reference"]["backends_used"].values()) == {"reference"}

    summary = _run("summarize.py", str(tmp_path))
    assert "DRY RUN" in summary and "| 4 x 6^3 | 3 | float32 | fwd+bwd |" in summary
    assert "| shortcut | 1 x 4 x 6^3 | float32 | fwd+bwd |" in summary
    assert (tmp_path / "summary.json").exists()


def test_memory_step_dry_run(tmp_path):
    """The step-memory part (official vs uxnet, float32 and bf16, predicted next to measured) in its CPU dry run."""
    _run("memory_step.py", "--dry-run", "--out", str(tmp_path / "memory.json"))
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert memory["dry_run"] is True and memory["compared"] == "step_bytes" and not memory["skipped"]
    cases = {(r["kind"], r["precision"]): r for r in memory["results"]}
    assert set(cases) == {(k, p) for k in ("official", "uxnet") for p in ("float32", "bfloat16")}
    for r in cases.values():
        assert "error" not in r["measured"] and "error" not in r["predicted"], r
        assert r["measured"]["steady"]["step_bytes"] > 0 and r["predicted"]["step_bytes"] > 0
        assert abs(r["relative_error"]) <= 0.1, r  # docs/PERFORMANCE.md: within a few % on the CPU
    assert set(cases["official", "float32"]["measured"]["backends"].values()) == {"reference"}
    summary = _run("summarize.py", str(tmp_path))
    assert "training-step memory, official vs uxnet" in summary and "| uxnet | bfloat16 |" in summary
