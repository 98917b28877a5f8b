#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (CUDA kernels
# included when nvcc is present), and runs every test: the C++ unit,
# integration and e2e tests through ctest, then the Python client tests with
# pytest against a real daemon. GPU tests skip cleanly without a GPU.
#
#   ./deploy/test.sh            # everything
#   BUILD_DIR=build-x ./deploy/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVRECALL_WERROR=ON
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" --timeout 900
if [[ -x deploy/test-python.sh ]]; then
  BUILD_DIR="$BUILD_DIR" ./deploy/test-python.sh
fi
echo "test.sh: all tests passed"
