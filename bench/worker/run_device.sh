#!/usr/bin/env bash
# One device command for the decode worker (docs/worker.md): from the
# repository root on the GPU machine, with the bundle made by
# bench/worker/pack_device.sh carried in .carry/worker:
#   1. the worker's CUDA tests (CUDA backend against the CPU backend, CUDA
#      graph capture of a whole step) and the kernels' GPU tests;
#   2. worker_bench GPU-resident rows and the PyTorch SDPA peer, same shapes;
#   3. worker_bench offloaded rows (a kvrecalld on this machine's CPUs);
# then prints the joined table last. Logs and CSVs go to $OUT.
#
#   bash bench/worker/run_device.sh [--quick] [--no-offloaded] [--no-tests] [worker_bench flags...]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CARRY=${CARRY:-.carry/worker}
OUT=${OUT:-/tmp/kvrecall-worker}
mkdir -p "$OUT"
QUICK=0 OFFLOADED=1 TESTS=1
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --no-offloaded) OFFLOADED=0 ;;
    --no-tests) TESTS=0 ;;
    *) EXTRA+=("$arg") ;;
  esac
done
B=/tmp/kvrecall-bundle
mkdir -p "$B" && tar xzf "$CARRY/bundle.tgz" -C "$B" || { echo "no bundle in $CARRY"; exit 1; }
export LD_LIBRARY_PATH="$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/device.txt"

if [[ $TESTS == 1 ]]; then
  {
    time "$B/bin/worker_test" --gtest_brief=1
    echo "worker_test exit $?"
    if [[ -x "$B/bin/gpu_kernels_test" ]]; then
      time timeout 300 "$B/bin/gpu_kernels_test" --gtest_brief=1
      echo "gpu_kernels_test exit $?"
    fi
  } > "$OUT/tests.log" 2>&1
  grep -E 'PASSED|FAILED|SKIPPED|exit [0-9]+|Failure|Expected|Which is|error' "$OUT/tests.log" | head -40
fi

CONTEXTS=32768,131072 BATCHES=1,8 REPLAYS=30
if [[ $QUICK == 1 ]]; then CONTEXTS=32768; BATCHES=1; REPLAYS=10; fi
"$B/bin/worker_bench" --contexts=$CONTEXTS --batches=$BATCHES --replays=$REPLAYS --offloaded=false \
  --out="$OUT" "${EXTRA[@]}" > "$OUT/resident.txt" 2> "$OUT/resident.log" \
  || { echo "worker_bench (resident) failed"; tail -20 "$OUT/resident.log"; }
PYTHONUNBUFFERED=1 python3 "$HERE/torch_sdpa_peer.py" --contexts $CONTEXTS --batches $BATCHES \
  --replays $REPLAYS --out "$OUT" > "$OUT/peer.log" 2>&1 || { echo "torch peer failed"; tail -20 "$OUT/peer.log"; }
cp "$OUT/worker_bench.csv" "$OUT/resident.csv" 2>/dev/null
if [[ $OFFLOADED == 1 ]]; then
  "$B/bin/worker_bench" --resident=false --offloaded --kvrecalld="$B/bin/kvrecalld" --out="$OUT" \
    "${EXTRA[@]}" > "$OUT/offloaded.txt" 2> "$OUT/offloaded.log" \
    || { echo "worker_bench (offloaded) failed"; tail -30 "$OUT/offloaded.log"; }
  cp "$OUT/worker_bench.csv" "$OUT/offloaded.csv" 2>/dev/null
  { cat "$OUT/resident.csv"; tail -n +2 "$OUT/offloaded.csv"; } > "$OUT/worker_bench.csv"
else
  cp "$OUT/resident.csv" "$OUT/worker_bench.csv"
fi
python3 "$HERE/join_tables.py" "$OUT" "$DEVICE, $(nproc) CPUs" | tee "$OUT/table.md"
