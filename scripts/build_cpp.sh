#!/usr/bin/env bash
# Builds the uxnet operator library (and the C++ example) against the libtorch of .venv's torch with CMake.
#   bash scripts/build_cpp.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build-cpp-full}
prefix=$(.venv/bin/python -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" -DUXNET_BUILD_EXAMPLES=ON
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
