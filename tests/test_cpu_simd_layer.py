"""The SIMD layer's operations (csrc/cpu/simd/vec.h) in every ISA variant this machine runs, against scalar C++ on
special values: a small C++ program (tests/cpp/simd_selftest.cpp) built with the C++ compiler alone (the layer has no
torch dependency). Covers what the current kernels use and what is there for the next ones (compare, select, min,
max, widen / narrow, bf16 rounding of partial vectors)."""

import os
import shutil
import subprocess

import pytest
from conftest import REQUIRE_EXTENSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_simd_layer_operations_in_every_variant(tmp_path):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        if REQUIRE_EXTENSION:
            pytest.fail(f"UXNET_REQUIRE_EXTENSION=1 but there is no C++ compiler ({cxx})")
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / "simd_selftest"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-Wno-psabi",
         f"-I{ROOT}/csrc", f"-I{ROOT}/tests/cpp", f"{ROOT}/tests/cpp/simd_selftest.cpp",
         f"{ROOT}/csrc/cpu/simd/isa.cpp", "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line for line in result.stdout.splitlines() if "checks, 0 failures" in line]
    assert any(line.startswith("generic") for line in ran), result.stdout
