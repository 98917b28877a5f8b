#!/usr/bin/env bash
# One command on the GPU machine (docs/e2e.md), at most about 8 minutes:
#   1. bench/e2e/check_transformers.py: transformers' LlamaForCausalLM.generate
#      with the kvrecall attention and cache equals the plain runner's
#      greedy tokens (full attention, TidalDecode, local exact; and an
#      offloaded roar selection when kvrecalld is there);
#   2. bench/e2e/prefix_reuse.py: cold vs warm time to first token (with kvrecalld);
#   3. bench/e2e/fidelity.py on the GPU (CUDA backend of the worker): the
#      fidelity table, windows screened on the GPU, GPU-resident rows and,
#      with kvrecalld, the offloaded rows through a kvrecalld on this
#      machine's CPUs; CSV, JSON, markdown (and a PNG where matplotlib
#      exists) in $OUT; the table is printed last.
#
# What it needs (Python 3 with torch 2.x and transformers 5.x, numpy, grpcio,
# protobuf; no xxhash module needed), from environment variables or, when
# they are unset, from .carry/e2e/bundle.txz (bench/e2e/pack_device.sh):
#   KVRECALL_BIN_DIR    kvrecalld and kvrecall (without kvrecalld: GPU-resident
#                       rows only; without kvrecall: no HyLRA row)
#   KVRECALL_LIB_DIR    libkvrecall_worker.so and the shared libraries the
#                       binaries load (libgrpc, libprotobuf, librocksdb,
#                       libxxhash, ...)
#   KVRECALL_MODEL_DIR  the kvr-tiny-llama checkpoint directory
#   KVRECALL_CORPUS     dev.txt
#   KVRECALL_PYTHON_DIR the kvrecall Python package's parent (build/python)
#   OUT                 output directory (default /tmp/kvrecall-e2e)
#
#   bash bench/e2e/run_device.sh [--quick] [fidelity.py flags...]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-/tmp/kvrecall-e2e}
mkdir -p "$OUT"
QUICK=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) EXTRA+=("$arg") ;;
  esac
done
BUNDLE=${BUNDLE:-$ROOT/.carry/e2e/bundle.txz}
if [[ -z "${KVRECALL_LIB_DIR:-}" && -f "$BUNDLE" ]]; then
  B=/tmp/kvrecall-e2e-bundle
  rm -rf "$B" && mkdir -p "$B" && xz -dc "$BUNDLE" | tar xf - -C "$B" || { echo "cannot unpack $BUNDLE"; exit 1; }
  KVRECALL_BIN_DIR=${KVRECALL_BIN_DIR:-$B/bin}
  KVRECALL_LIB_DIR=$B/lib
  KVRECALL_MODEL_DIR=${KVRECALL_MODEL_DIR:-$B/model}
  KVRECALL_CORPUS=${KVRECALL_CORPUS:-$B/corpus/dev.txt}
  KVRECALL_PYTHON_DIR=${KVRECALL_PYTHON_DIR:-$B/python}
fi
: "${KVRECALL_LIB_DIR:?set KVRECALL_LIB_DIR (or carry .carry/e2e/bundle.txz)}"
: "${KVRECALL_MODEL_DIR:?set KVRECALL_MODEL_DIR}"
: "${KVRECALL_CORPUS:?set KVRECALL_CORPUS}"
KVRECALL_BIN_DIR=${KVRECALL_BIN_DIR:-}
KVRECALL_PYTHON_DIR=${KVRECALL_PYTHON_DIR:-$ROOT/build/python}
export LD_LIBRARY_PATH="$KVRECALL_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KVRECALL_WORKER_LIB="$KVRECALL_LIB_DIR/libkvrecall_worker.so"
[[ -f "$KVRECALL_LIB_DIR/libxxhash.so.0" ]] && export KVRECALL_XXHASH_LIB="$KVRECALL_LIB_DIR/libxxhash.so.0"
export PYTHONPATH="$KVRECALL_PYTHON_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "device: ${DEVICE:-no GPU}; $($PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"

KVRECALLD=""
[[ -x "$KVRECALL_BIN_DIR/kvrecalld" ]] && KVRECALLD="$KVRECALL_BIN_DIR/kvrecalld"
KVRECALL=""
[[ -x "$KVRECALL_BIN_DIR/kvrecall" ]] && KVRECALL="$KVRECALL_BIN_DIR/kvrecall"

# A kvrecalld for the transformers check's offloaded case.
TARGET_ARGS=()
DPID=""
if [[ -n "$KVRECALLD" ]]; then
  D=$(mktemp -d)
  "$KVRECALLD" --listen=127.0.0.1:0 --port_file="$D/port" --data_dir="$D/data" \
    --memory_capacity_bytes=8GiB > "$OUT/kvrecalld-check.log" 2>&1 &
  DPID=$!
  for _ in $(seq 1 300); do [[ -s "$D/port" ]] && break; sleep 0.1; done
  [[ -s "$D/port" ]] && TARGET_ARGS=(--target="127.0.0.1:$(cat "$D/port")")
fi
echo "== transformers integration vs the plain runner"
timeout 110 $PY "$HERE/check_transformers.py" --model="$KVRECALL_MODEL_DIR" --corpus="$KVRECALL_CORPUS" \
  "${TARGET_ARGS[@]}" 2>&1 | tee "$OUT/check_transformers.txt" | grep -v -E '^\s*$' | tail -12
echo "check_transformers exit ${PIPESTATUS[0]}"
[[ -n "$DPID" ]] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null

if [[ -n "$KVRECALLD" ]]; then
  echo "== prefix reuse (cold vs warm time to first token)"
  timeout 60 $PY "$HERE/prefix_reuse.py" --kvrecalld="$KVRECALLD" --model="$KVRECALL_MODEL_DIR" \
    --corpus="$KVRECALL_CORPUS" --device=cuda > "$OUT/prefix_reuse.txt" 2> "$OUT/prefix_reuse.log"
  echo "prefix_reuse exit $?"; cat "$OUT/prefix_reuse.txt"
fi

echo "== fidelity"
FLAGS=(--model="$KVRECALL_MODEL_DIR" --corpus="$KVRECALL_CORPUS" --device=cuda --out="$OUT"
       --machine="${DEVICE:-GPU}, $(nproc) CPUs")
if [[ -n "$KVRECALLD" ]]; then FLAGS+=(--kvrecalld="$KVRECALLD"); else FLAGS+=(--no_offloaded); fi
[[ -n "$KVRECALL" ]] && FLAGS+=(--kvrecall="$KVRECALL")
if [[ $QUICK == 1 ]]; then
  FLAGS+=(--quick)
else
  FLAGS+=(--select=4 --batch=4 --decode=512 --deadline_s=230)
fi
timeout 290 $PY "$HERE/fidelity.py" "${FLAGS[@]}" "${EXTRA[@]}" > "$OUT/fidelity.txt" 2> "$OUT/fidelity.log"
rc=$?
[[ $rc != 0 ]] && { echo "fidelity exit $rc"; tail -30 "$OUT/fidelity.log"; }
if [[ -s "$OUT/fidelity.txt" ]]; then cat "$OUT/fidelity.txt"; else cat "$OUT/fidelity.md" 2>/dev/null; fi
