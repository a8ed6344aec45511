#!/usr/bin/env bash
# One-command GPU validation of uxnet (issue 4), for a CUDA machine with torch, triton and ninja installed and no
# internet. At most ~10 minutes:
#   1. build + install the package      pip install --no-build-isolation --no-deps -e .
#      (setup.py takes cuBLAS/cuSPARSE headers the toolkit lacks from pip's nvidia/*/include, or says which are
#      missing; set CUDA_HOME when the nvcc on PATH is not inside the toolkit)
#   2. the test suite on the GPU        pytest tests -x -q  (the Triton tests run natively at GPU sizes)
#   3. op benchmarks                    benchmarks/gpu/bench_ops.py    -> $OUT/ops.json
#   4. one UXNet training step profiled benchmarks/gpu/profile_step.py -> $OUT/profile.json
#   5. decoder op benchmarks            benchmarks/gpu/bench_ops.py --ops instance_norm -> $OUT/ops_instance_norm.json
#   6. step memory, official vs uxnet   benchmarks/gpu/memory_step.py  -> $OUT/memory.json
#      (96^3 batch 2, float32 and bf16 autocast: max_memory_allocated and step time, next to `uxnet memory`)
#   7. compact tables                   benchmarks/gpu/summarize.py    -> stdout, $OUT/summary.json
#
#   bash benchmarks/gpu/validate.sh [OUTPUT_DIR (default ./gpu-results)]
#
# Each step has its own time limit and log in $OUT; a failing step is reported and the next one still runs.
# Exit status: 0 if every step passed, 1 otherwise.
set -u -o pipefail

OUT="${1:-./gpu-results}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
START=$(date +%s)
STATUS=0

step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s) =="
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
  if [ $rc -ne 0 ]; then STATUS=1; fi
  return 0
}

"$PY" - <<'EOF' || { echo "no usable torch/CUDA/triton"; exit 1; }
import torch, triton
assert torch.cuda.is_available(), "validate.sh needs a CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TRITON_CACHE_AUTOTUNING=1  # later steps reuse the autotuning results of earlier ones (same shapes)
step build 200 "$PY" -m pip install --no-build-isolation --no-deps -e .
# Tests run each kernel with one heuristic config (UXNET_TRITON_AUTOTUNE=0): autotuning every kernel-size and dtype
# variant of the suite would spend the whole budget compiling; the autotuned launches are exercised (and their
# outputs checked against PyTorch) by bench_ops and its torch.compile check.
step pytest 150 env UXNET_REQUIRE_EXTENSION=1 UXNET_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -x -q -p no:cacheprovider
# Benchmarks get what is left of ~8 minutes after reserving 80 s for the profile, 150 s for the step-memory cases,
# 150 s for the decoder-op benchmarks
# and 45 s for the last case.
ELAPSED=$(( $(date +%s) - START ))
BENCH_BUDGET=$(( 480 - ELAPSED - 80 - 150 - 150 - 45 ))
if [ $BENCH_BUDGET -lt 30 ]; then BENCH_BUDGET=30; fi
step bench_ops $(( BENCH_BUDGET + 45 )) "$PY" benchmarks/gpu/bench_ops.py --out "$OUT/ops.json" --budget-s "$BENCH_BUDGET" \
  --ops dwconv3d,voxel
step profile_step 80 "$PY" benchmarks/gpu/profile_step.py --out "$OUT/profile.json" --steps 2
# The instance-norm ops of the decoder, with their own budget (torch.compile of the reference is timed last).
step bench_instance_norm 150 "$PY" benchmarks/gpu/bench_ops.py --out "$OUT/ops_instance_norm.json" --budget-s 80 \
  --ops instance_norm
step memory_step 150 "$PY" benchmarks/gpu/memory_step.py --out "$OUT/memory.json" --size 96 --batch 2 --repeats 3
"$PY" benchmarks/gpu/summarize.py "$OUT" | tee "$OUT/summary.md"
echo "total $(( $(date +%s) - START ))s; results in $OUT; status $STATUS"
exit $STATUS
