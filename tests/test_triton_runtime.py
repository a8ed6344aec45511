"""The Triton layer as a whole (not one op): output poisoning, and every kernel compiling for an H100 (sm_90)
without a GPU. The per-op Triton tests are in tests/ops/ (marked ``triton``)."""

import os
import subprocess
import sys

import pytest
import torch

from ops.samples import triton_internals


@pytest.mark.triton
def test_poisoning_fills_new_buffers_with_nan(monkeypatch):
    launch = triton_internals("launch")
    monkeypatch.setenv("UXNET_POISON_OUTPUTS", "1")
    assert torch.isnan(launch.poisoned(torch.empty(7))).all()
    assert torch.isnan(launch.empty_like_layout(torch.zeros(1, 2, 3, 4, 5), True)).all()


@pytest.mark.triton
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code that triton.compile rejects: compile every kernel for an H100 (sm_90) too."""
    triton_internals()
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no NVIDIA backend (ptxas)")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu",
                          "compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, script, "--dtypes", "fp32", "--layouts", "cl,cf"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("\n") == 26, proc.stdout  # 13 kernel variants x 2 layouts
