#!/usr/bin/env bash
# CI slice of the differential fuzz of the CPU kernels (tests/cpu_fuzz.py): UXNET_FUZZ_CASES cases (default 300),
# each under every ISA variant this machine runs. The seed is UXNET_FUZZ_SEED, else derived from the commit (new
# cases on every commit, the same ones when a commit is re-run); it is printed, and so is every mismatch's
# reproduction command.
#   bash scripts/fuzz_cpu_slice.sh
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --short=8 HEAD 2>/dev/null || echo 0)
seed=${UXNET_FUZZ_SEED:-$((16#${commit:0:7}))}
.venv/bin/python tests/cpu_fuzz.py --seed "$seed" --cases "${UXNET_FUZZ_CASES:-300}" --isa all
