#!/usr/bin/env bash
# The run command: installs what is missing (deploy/install-deps.sh), builds
# kvrecalld and the kvrecall CLI, and starts kvrecalld in the foreground on
# its embedded default: gRPC on 127.0.0.1:7878, data under ./data, no other
# service needed. Ctrl-C (SIGINT) or SIGTERM stops it gracefully.
#
#   ./deploy/run.sh                          # defaults
#   ./deploy/run.sh --metrics_port=9464      # extra flags go to kvrecalld
#   ./deploy/run.sh --flagfile=deploy/kvrecalld.flags
#   BUILD_DIR=build-x ./deploy/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh
# Same configuration as deploy/test.sh, so the two share one build directory.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVRECALL_WERROR=ON
cmake --build "$BUILD_DIR" -j "$JOBS" --target kvrecalld kvrecall
echo "run.sh: starting $BUILD_DIR/bin/kvrecalld (data in ./data; try: $BUILD_DIR/bin/kvrecall stats)"
exec "$BUILD_DIR/bin/kvrecalld" "$@"
