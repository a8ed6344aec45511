"""The device code of the CUDA backend (csrc/cuda/<op>/kernels.cuh), run on the CPU.

No GPU exists on the development machines or in CI, so the CUDA kernels run here under a small emulation of the
CUDA execution model (tests/cpp/cuda_emulation/cuda_emulation.h: one real thread per CUDA thread, real barriers, warp
shuffles, NaN-filled shared memory and outputs) and are checked in float32 and float64 against direct formulas and
finite differences (tests/cpp/cuda_emulation/emulate_kernels.cpp). The host wrappers (csrc/cuda/<op>/op.cu) are
exercised by tests/ops/ on a machine with a GPU.
"""

import os
import shutil
import subprocess

import pytest

def _repo_root() -> str:
    path = os.path.dirname(os.path.abspath(__file__))
    while not os.path.isfile(os.path.join(path, "setup.py")):
        path = os.path.dirname(path)
    return path


CSRC = os.path.join(_repo_root(), "csrc")
HARNESS = os.path.join(_repo_root(), "tests", "cpp", "cuda_emulation", "emulate_kernels.cpp")


def test_cuda_kernels_under_cpu_emulation(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA emulation harness")
    exe = tmp_path / "uxnet_emulate"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O2", "-pthread", "-I", CSRC, HARNESS, "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failures, "\n".join(failures) or run.stdout[-5000:] + run.stderr[-2000:]
    assert run.stdout.count("PASS") >= 150, run.stdout[-5000:]
