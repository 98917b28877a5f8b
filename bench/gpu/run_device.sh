#!/usr/bin/env bash
# One device command (docs/gpu.md): from the repository root on the GPU
# machine, with the binaries carried in .carry/gpu (see docs/gpu.md for how
# they are built), runs the GPU tests (plus a compute-sanitizer pass over the
# small ones), then gpu_bench, then the PyTorch peers, and prints the joined
# table last. Full logs go to $OUT (default /tmp/kvrecall-gpu).
#
#   bash bench/gpu/run_device.sh [--quick] [--no-bench]
#
# --quick: the tests without compute-sanitizer, then only the shapes where a
# kernel was behind its peer, each on the launcher's default path and on the
# previous one ("path" column), next to the peer measured once per shape.
set -uo pipefail
CARRY=${CARRY:-.carry/gpu}
OUT=${OUT:-/tmp/kvrecall-gpu}
mkdir -p "$OUT"
QUICK=""
BENCH=1
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    --no-bench) BENCH=0 ;;
  esac
done

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  echo "\$ $CARRY/gpu_reference_test && $CARRY/gpu_kernels_test"
  "$CARRY/gpu_reference_test" --gtest_brief=1
  echo "gpu_reference_test exit $?"
  time timeout 300 "$CARRY/gpu_kernels_test"
  echo "gpu_kernels_test exit $?"
  if [[ -z $QUICK ]] && command -v compute-sanitizer >/dev/null; then
    echo "\$ compute-sanitizer --tool memcheck gpu_kernels_test (small tests)"
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$CARRY/gpu_kernels_test" \
      --gtest_filter='SparseDecodeAttentionTest.SkipsAndCounts*:ValidationTest.*:GraphCaptureTest.*:StepKernelsTest.*' \
      --gtest_brief=1
    echo "compute-sanitizer memcheck exit $?"
    echo "\$ compute-sanitizer --tool racecheck gpu_kernels_test (one test)"
    timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 "$CARRY/gpu_kernels_test" \
      --gtest_filter='SparseDecodeAttentionTest.SkipsAndCounts*' --gtest_brief=1
    echo "compute-sanitizer racecheck exit $?"
  fi
} > "$OUT/tests.log" 2>&1
grep -E 'PASSED|FAILED|SKIPPED|exit [0-9]+|^real|ERROR SUMMARY|Failure|Expected|Which is|Value of|seed|^  Actual|error' "$OUT/tests.log" | head -80

if [[ $BENCH == 1 ]]; then
  "$CARRY/gpu_bench" --out "$OUT" $QUICK 2> "$OUT/bench.log" || { echo "gpu_bench failed"; tail -20 "$OUT/bench.log"; }
  PYTHONUNBUFFERED=1 python3 bench/gpu/torch_peers.py --dir "$OUT" 2> "$OUT/peers.log" || { echo "torch_peers failed"; tail -30 "$OUT/peers.log"; }
fi
