#!/usr/bin/env bash
# The CPU op tests on the AVX-512 code paths (16-lane vectors, register blocks, masks and tails), on any CPU:
#   bash scripts/test_cpu_emulated.sh [pytest args...]
# UXNET_CPU_ISA=avx512-emulated for the whole run, so every CPU kernel call (the per-ISA tests included) uses the
# emulated variant, whose results are bitwise identical to the avx512 build's (tests/test_cpu_isa.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# The op tests are tests/ops/ (one file per op family) less the Triton ones (marked triton: no CPU kernel runs there).
UXNET_CPU_ISA=avx512-emulated .venv/bin/python -m pytest -q -p no:cacheprovider -m "not triton" \
  tests/ops tests/test_cpu_isa.py tests/test_cpu_fuzz.py "$@"
