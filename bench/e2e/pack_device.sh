#!/usr/bin/env bash
# Packs what bench/e2e/run_device.sh needs on the GPU machine into
# .carry/e2e/bundle.txz (git-ignored; xz, about 56 MB of the device's 64 MiB):
#   bin/    kvrecalld, kvrecall (stripped)
#   lib/    libkvrecall_worker.so and the shared libraries the three load
#           (their ldd closure minus glibc, libstdc++ and libgcc; libxxhash
#           is among them: the device's Python has no xxhash module)
#   python/ the kvrecall package of the build tree (stubs, worker,
#           integrations)
#   model/  the checkpoint (config.json, safetensors shards, index)
#   corpus/ dev.txt
# Without kvrecalld (NO_KVRECALLD=1: about 20 MB less) only the GPU-resident
# rows and the transformers check run.
#
#   BUILD_DIR=build MODEL_DIR=../shared/models/kvr-tiny-llama \
#     CORPUS=../shared/data/corpus/dev.txt bash bench/e2e/pack_device.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${BUILD_DIR:-build}
MODEL_DIR=${MODEL_DIR:-../shared/models/kvr-tiny-llama}
CORPUS=${CORPUS:-../shared/data/corpus/dev.txt}
DEST=${DEST:-.carry/e2e}
for f in "$BUILD_DIR/lib/libkvrecall_worker.so" "$BUILD_DIR/bin/kvrecall" "$BUILD_DIR/python/kvrecall/worker.py" \
         "$MODEL_DIR/config.json" "$CORPUS"; do
  [[ -e "$f" ]] || { echo "pack_device.sh: $f is missing (build the kvrecall_worker, kvrecall, kvrecalld and python_client targets)" >&2; exit 1; }
done
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib" "$STAGE/model" "$STAGE/corpus" "$DEST"
bins=("$BUILD_DIR/bin/kvrecall")
[[ "${NO_KVRECALLD:-0}" == 1 ]] || bins+=("$BUILD_DIR/bin/kvrecalld")
for b in "${bins[@]}"; do strip -o "$STAGE/bin/$(basename "$b")" "$b"; done
strip -o "$STAGE/lib/libkvrecall_worker.so" "$BUILD_DIR/lib/libkvrecall_worker.so"
ldd "${bins[@]}" "$BUILD_DIR/lib/libkvrecall_worker.so" | awk '/=>/ {print $3}' | sort -u |
  grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux-x86-64|libpthread|libdl|librt)\.so' |
  while read -r lib; do cp -L "$lib" "$STAGE/lib/"; done
mkdir -p "$STAGE/python"
cp -r "$BUILD_DIR/python/kvrecall" "$STAGE/python/"
find "$STAGE/python" -name __pycache__ -prune -exec rm -rf {} +
cp "$MODEL_DIR"/config.json "$MODEL_DIR"/*.safetensors "$STAGE/model/"
cp "$MODEL_DIR"/*.index.json "$STAGE/model/" 2>/dev/null || true
cp "$CORPUS" "$STAGE/corpus/dev.txt"
tar cf - -C "$STAGE" bin lib python model corpus | xz -9 -T2 > "$DEST/bundle.txz"
size=$(stat -c %s "$DEST/bundle.txz")
echo "pack_device.sh: $DEST/bundle.txz $((size / 1048576)) MiB"
if (( size > 63 * 1048576 )); then
  echo "pack_device.sh: over the device's 64 MiB; NO_KVRECALLD=1 leaves out kvrecalld (GPU-resident rows only)" >&2
  exit 1
fi
