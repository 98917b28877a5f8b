#!/usr/bin/env bash
# Python client tests (clients/python/tests) with Debian's pytest, against
# kvrecalld daemons the fixtures start on 127.0.0.1 port 0 from the build
# tree. Called by deploy/test.sh after ctest; runnable alone after a build:
#
#   BUILD_DIR=build ./deploy/test-python.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
case "$BUILD_DIR" in
  /*) ;;
  *) BUILD_DIR="$PWD/$BUILD_DIR" ;;
esac
if [[ ! -f "$BUILD_DIR/python/kvrecall/client.py" ]]; then
  echo "test-python.sh: $BUILD_DIR/python/kvrecall is missing; build first (cmake --build $BUILD_DIR)" >&2
  exit 1
fi
export KVRECALL_BUILD_DIR="$BUILD_DIR"
export PYTHONPATH="$BUILD_DIR/python:$PWD/clients/python/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Debian's interpreter: it has numpy, grpcio, protobuf, xxhash and pytest.
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider clients/python/tests "$@"
