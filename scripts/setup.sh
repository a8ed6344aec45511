#!/usr/bin/env bash
# Creates .venv (if missing) and installs uxnet into it, building the C++ extension in place.
#   bash scripts/setup.sh run    -> runtime + benchmark extras (for `uxnet bench`)
#   bash scripts/setup.sh test   -> test, MONAI and export extras (for the test suite)
# torch: an existing torch in .venv is kept (e.g. a CUDA build); otherwise torch==$UXNET_TORCH_VERSION (default: the
# "current" stack of uxnet_kernels/versions.py, a CPU wheel) is installed; triton likewise ($UXNET_TRITON_VERSION). The package itself is built with --no-build-isolation so pip never downloads a
# second, multi-GB torch into a build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in
  run) extras="bench" ;;
  test) extras="test,bench,monai,export" ;;
  *) echo "usage: bash scripts/setup.sh [run|test]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
missing() { ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
if missing torch; then
  "${pip[@]}" install -q "torch==${UXNET_TORCH_VERSION:-$("$python" uxnet_kernels/versions.py get current torch)}"
fi
torch_version=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch').split('+')[0])")
# Pin the installed torch so no extra's dependency can replace it.
echo "torch==${torch_version}" > .venv/uxnet-constraints.txt
triton_req=()
if missing triton; then
  triton_req=("triton==${UXNET_TRITON_VERSION:-$("$python" uxnet_kernels/versions.py get current triton)}")
fi
"${pip[@]}" install -q -c .venv/uxnet-constraints.txt setuptools wheel ninja numpy "${triton_req[@]}"
MAX_JOBS=${MAX_JOBS:-2} "${pip[@]}" install -q -c .venv/uxnet-constraints.txt --no-build-isolation -e ".[${extras}]"
.venv/bin/uxnet info
