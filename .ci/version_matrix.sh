#!/usr/bin/env bash
# CI: the torch/triton version matrix beyond the main stack (which .ci/run tests with the whole suite).
#   bash .ci/version_matrix.sh [STACK...]     (default: every stack of uxnet_kernels/versions.py except "current")
#   UXNET_MATRIX_TESTS=tests bash .ci/version_matrix.sh gpu-machine     (the whole suite instead of the subset)
# For each stack: a venv with exactly its Python, torch and triton from PyPI (CUDA builds of torch, tested on the
# CPU), cached in $UXNET_CI_CACHE (default ~/.cache/uxnet-ci) under a key of what is installed and reused when
# present; a mirror of the repository in the cache where uxnet_kernels._C is built in place (ninja: only changed
# sources recompile); then the focused test subset (versions.py MATRIX_TESTS) plus `uxnet info`. A stack with
# cuda_kernels=1 builds the extension with nvcc for sm_90 only: the CI check that csrc/cuda compiles against real
# CUDA torch headers. Every venv is created first (downloads overlap), then stacks are built and tested in turn.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache=${UXNET_CI_CACHE:-$HOME/.cache/uxnet-ci}
mkdir -p "$cache"
# Test dependencies of the subset; part of the venv key, so changing them makes a fresh venv.
test_deps="numpy pytest hypothesis ninja setuptools<82 wheel"

versions() { python3 uxnet_kernels/versions.py "$@"; }

find_python() {  # X.Y -> path of a pythonX.Y interpreter (PATH, then pyenv's versions)
  local want=$1 cand
  for cand in "$(command -v "python$want" || true)" "$HOME"/.pyenv/versions/"$want".*/bin/python"$want"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$want')" 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  echo "version_matrix: no Python $want found (PATH or ~/.pyenv/versions)" >&2
  return 1
}

venv_dir() {  # NAME PY TORCH TRITON
  local key
  key=$(printf '%s\n' "$2" "$3" "$4" "$test_deps" | sha1sum | cut -c1-12)
  echo "$cache/venv-$1-$key"
}

create_venv() {  # NAME PY TORCH TRITON -> venv ready (marker file .uxnet-complete)
  local venv python t0=$SECONDS
  venv=$(venv_dir "$@")
  if [ -f "$venv/.uxnet-complete" ]; then
    echo "[$1] cached venv $venv"
    return 0
  fi
  python=$(find_python "$2")
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$3" "triton==$4" $test_deps \
    >"$venv.log" 2>&1 || { tail -n 30 "$venv.log"; echo "[$1] pip install failed (log: $venv.log)"; return 1; }
  touch "$venv/.uxnet-complete"
  echo "[$1] created $venv in $((SECONDS - t0))s"
}

run_stack() {  # NAME PY TORCH TRITON CUDA_KERNELS
  local name=$1 venv tree t0=$SECONDS
  venv=$(venv_dir "$1" "$2" "$3" "$4")
  tree="$venv-tree"
  mkdir -p "$tree"
  "$venv/bin/python" .ci/sync_tree.py "$repo" "$tree"
  local -a build_env=(UXNET_CUDA=0)
  if [ "$5" = 1 ]; then
    # Compile check only: one architecture (sm_90, the GPU machines'), no PTX.
    build_env=(UXNET_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)
    if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
      build_env+=(CUDA_HOME=/usr/local/cuda)  # nvcc on PATH may be a wrapper outside the toolkit
    fi
  fi
  (cd "$tree" && env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" setup.py -q build_ext --inplace \
    >"$tree/build.log" 2>&1) || { tail -n 40 "$tree/build.log"; echo "[$name] build failed"; return 1; }
  echo "[$name] extension built in $((SECONDS - t0))s"
  # The tree's own package (with its freshly built _C) comes first on sys.path, in subprocesses too.
  (cd "$tree" && export PYTHONPATH="$tree" UXNET_REQUIRE_EXTENSION=1 &&
    "$venv/bin/python" -m uxnet.cli info | sed -n 1,6p &&  # sed reads it all: head would break the pipe
    # shellcheck disable=SC2046
    "$venv/bin/python" -m pytest -q -p no:cacheprovider ${UXNET_MATRIX_TESTS:-$(versions tests)})
  if [ "$5" = 1 ]; then
    (cd "$tree" && PYTHONPATH="$tree" "$venv/bin/python" -c \
      "from uxnet_kernels import _extension as e; assert e.has_kernel('dwconv3d', 'CUDA'), 'no CUDA kernels built'")
  fi
  echo "[$name] done in $((SECONDS - t0))s"
}

mapfile -t stacks < <(versions matrix | awk '$1 != "current"')
if [ $# -gt 0 ]; then
  mapfile -t stacks < <(for s in "${stacks[@]}"; do for want in "$@"; do [ "${s%% *}" = "$want" ] && echo "$s"; done; done)
fi
[ ${#stacks[@]} -gt 0 ] || { echo "version_matrix: no stack selected"; exit 2; }

pids=()
for s in "${stacks[@]}"; do
  # shellcheck disable=SC2086
  create_venv ${s% *} &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for s in "${stacks[@]}"; do
  # shellcheck disable=SC2086
  run_stack $s
done
