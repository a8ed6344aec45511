#!/usr/bin/env bash
# The CPU op tests on the AVX-512 code paths (16-lane vectors, register blocks, masks and tails), on any CPU:
#   bash scripts/test_cpu_emulated.sh [pytest args...]
# UXNET_CPU_ISA=avx512-emulated for the whole run, so every CPU kernel call (the per-ISA tests included) uses the
# emulated variant, whose results are bitwise identical to the avx512 build's (tests/test_cpu_isa.py).
set -euo pipefail
cd "$(dirname "$0")/.."
UXNET_CPU_ISA=avx512-emulated .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_cpu_dwconv3d.py tests/test_cpu_ln_mlp.py tests/test_cpu_nonfinite.py tests/test_cpu_isa.py \
  tests/test_cpu_fuzz.py tests/test_decoder_ops.py "$@"
