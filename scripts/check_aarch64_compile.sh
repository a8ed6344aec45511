#!/usr/bin/env bash
# Compile-only check of the CPU kernels for arm64 (aarch64), so x86-only code cannot creep into csrc/cpu.
#   bash scripts/check_aarch64_compile.sh
# Compiles every translation unit of csrc/cpu, csrc/common and csrc/registration.cpp with aarch64-linux-gnu-g++ into
# objects (no link: there is no arm64 libtorch here). The kernel units (csrc/cpu/simd, */kernels.cpp, and the SIMD
# layer's self-test tests/cpp/simd_selftest.cpp) need no torch and are built with -O2 -Werror, so the generic (NEON)
# and avx512-emulated variants really vectorise for arm64; the torch-side units (op.cpp, forward.cpp, backward.cpp,
# registration.cpp, csrc/common/*.cpp) are compiled against the torch headers of .venv (they are target-independent)
# without the Python module. Then, where qemu-aarch64 is there, the
# self-test is linked and run on the emulated arm64 CPU (every vec.h operation, generic = NEON and avx512-emulated).
# Installs g++-aarch64-linux-gnu and qemu-user with apt-get when missing and apt-get is there (CI); without apt-get
# a missing cross compiler fails with the command to run, a missing qemu skips the run (said so).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
if ! command -v "$CXX" >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    packages=(g++-aarch64-linux-gnu qemu-user)
    apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
  elif ! command -v "$CXX" >/dev/null 2>&1; then
    echo "check_aarch64_compile: $CXX not found; install it (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)" >&2
    exit 1
  fi
fi
python=${PYTHON:-.venv/bin/python}
torch_include=$("$python" -c "import os, torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-ffp-contract=off -Wno-psabi -fPIC -Icsrc -Itests/cpp)
kernel_units=(csrc/cpu/simd/*.cpp csrc/cpu/*/kernels.cpp tests/cpp/simd_selftest.cpp)
torch_units=()
for f in csrc/registration.cpp csrc/common/*.cpp csrc/cpu/*/*.cpp; do
  case " ${kernel_units[*]} " in *" $f "*) ;; *) torch_units+=("$f") ;; esac
done
compile() {  # unit, flags...: a failure leaves $out/FAILED
  local unit=$1; shift
  "$CXX" "${flags[@]}" "$@" -c "$unit" -o "$out/$(echo "$unit" | tr / _).o" || { echo "FAILED: $unit" >&2; touch "$out/FAILED"; }
}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "${MAX_JOBS:-2}" ]; do sleep 0.2; done; }
for f in "${kernel_units[@]}"; do
  throttle
  compile "$f" -std=c++17 -O2 -Wall -Wextra -Werror &
done
for f in "${torch_units[@]}"; do
  throttle
  # shellcheck disable=SC2086
  compile "$f" -std=c++20 -O1 $torch_include &
done
wait
[ ! -e "$out/FAILED" ] || { echo "check_aarch64_compile: FAILED" >&2; exit 1; }
neon=$("${CXX%g++}objdump" -d "$out"/csrc_cpu_layer_norm_channels_first_kernels.cpp.o | grep -c -E '\sfmla\s' || true)
echo "check_aarch64_compile: ${#kernel_units[@]} kernel units (no torch) + ${#torch_units[@]} torch-side units compiled" \
     "for aarch64 with $("$CXX" -dumpversion); NEON fmla in the LayerNorm kernels: $neon"
[ "$neon" -gt 0 ] || { echo "check_aarch64_compile: no NEON fmla in the arm64 kernels" >&2; exit 1; }
if command -v qemu-aarch64 >/dev/null 2>&1; then
  "$CXX" "${flags[@]}" -std=c++17 -O2 tests/cpp/simd_selftest.cpp csrc/cpu/simd/isa.cpp -o "$out/simd_selftest"
  sysroot=$(dirname "$("$CXX" -print-file-name=libc.so.6)")/..
  qemu-aarch64 -L "$sysroot" "$out/simd_selftest" | sed 's/^/check_aarch64_compile: arm64 (qemu) self-test: /'
else
  echo "check_aarch64_compile: no qemu-aarch64, the arm64 self-test was not run"
fi
