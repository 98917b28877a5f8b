#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (CUDA kernels
# included when nvcc is present), and runs every test: the C++ unit,
# integration and e2e tests through ctest, then the Python client tests with
# pytest against a real daemon. GPU tests skip cleanly without a GPU.
#
#   ./deploy/test.sh            # everything
#   BUILD_DIR=build-x ./deploy/test.sh
#
# Tests on real attention read the shared test data (the attn-dev capture)
# from $KVRECALL_SHARED_DIR, by default the directory `shared` beside the
# repository. Here they must find it: KVRECALL_REQUIRE_SHARED_DATA=1 makes a
# test that cannot find it fail rather than skip. KVRECALL_REQUIRE_SHARED_DATA=0
# lets them skip (a checkout without the data).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
export KVRECALL_REQUIRE_SHARED_DATA=${KVRECALL_REQUIRE_SHARED_DATA:-1}
SHARED_DIR=${KVRECALL_SHARED_DIR:-$PWD/../shared}
if [[ "$KVRECALL_REQUIRE_SHARED_DATA" != 0 && ! -f "$SHARED_DIR/data/attn-dev/layer03_k.npy" ]]; then
  echo "test.sh: the shared test data is not at $SHARED_DIR (no data/attn-dev/layer03_k.npy);" \
       "set KVRECALL_SHARED_DIR to its directory, or KVRECALL_REQUIRE_SHARED_DATA=0 to skip" \
       "the tests that need it" >&2
  exit 1
fi
export KVRECALL_SHARED_DIR=$(cd "$SHARED_DIR" 2>/dev/null && pwd || echo "$SHARED_DIR")

./deploy/install-deps.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVRECALL_WERROR=ON
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" --timeout 900
if [[ -x deploy/test-python.sh ]]; then
  BUILD_DIR="$BUILD_DIR" ./deploy/test-python.sh
fi
# Fuzz smoke: every libFuzzer target a few seconds over its seeds (a clang
# build in build-fuzz/; docs/reliability.md). FUZZ_SECONDS=0 skips it.
if [[ "${FUZZ_SECONDS:-3}" != 0 ]]; then
  FUZZ_SECONDS=${FUZZ_SECONDS:-3} JOBS="$JOBS" ./deploy/fuzz.sh
fi
echo "test.sh: all tests passed"
