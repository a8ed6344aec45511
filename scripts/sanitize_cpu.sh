#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer:
#   bash scripts/sanitize_cpu.sh [BUILD_DIR] [pytest args...]        (default BUILD_DIR: build-sanitize)
# Copies the sources (tracked and untracked, not ignored) to BUILD_DIR/tree, builds the extension there with
# UXNET_SANITIZE=address,undefined (setup.py: -fsanitize=... -fno-sanitize-recover=all -O1 -g), and runs the CPU op
# tests from that tree with the sanitizer runtimes preloaded into Python (leak checking off: CPython and torch keep
# their allocations). Every report is written to BUILD_DIR/reports/ and fails the run; so does any test failure.
# Rebuilds incrementally (the copy keeps modification times). .venv must exist (scripts/setup.sh test).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-build-sanitize}")
shift || true
python=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out/tree"
rm -rf "$out/reports" && mkdir -p "$out/reports"
git ls-files -z -co --exclude-standard | tar --null -cf - -T - | tar -xf - -C "$out/tree"
start=$(date +%s)
(cd "$out/tree" && UXNET_SANITIZE=address,undefined UXNET_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
   "$python" setup.py -q build_ext --inplace >"$out/build.log" 2>&1) || { tail -30 "$out/build.log"; exit 1; }
built=$(date +%s)
runtimes="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
# The op tests (tests/ops/, one file per op family) less the Triton ones (-m "not triton" below), and the ISA tests.
tests=(tests/ops tests/test_cpu_isa.py tests/test_cpu_fuzz.py)
status=0
(cd "$out/tree" && LD_PRELOAD="$runtimes" \
   ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$out/reports/asan" \
   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$out/reports/ubsan" \
   UXNET_REQUIRE_EXTENSION=1 "$python" -m pytest -q -p no:cacheprovider -m "not triton" "${tests[@]}" "$@") || status=$?
reports=$(find "$out/reports" -type f | wc -l)
echo "sanitize_cpu: build $((built - start)) s, tests $(( $(date +%s) - built )) s, pytest exit $status," \
     "$reports sanitizer report(s) in $out/reports"
if [ "$reports" != 0 ]; then head -50 "$out"/reports/* >&2; exit 1; fi
exit "$status"
