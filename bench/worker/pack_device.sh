#!/usr/bin/env bash
# Packs what bench/worker/run_device.sh needs on the GPU machine into
# .carry/worker/bundle.tgz (git-ignored): the worker test and benchmark,
# kvrecalld, the kernels' GPU tests, libkvrecall_worker.so, and the shared
# libraries they load (their ldd closure minus glibc, libstdc++ and libgcc),
# stripped and compressed to stay within the device's 64 MiB transfer.
#
#   BUILD_DIR=build bash bench/worker/pack_device.sh   # then carry .carry/worker
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${BUILD_DIR:-build}
DEST=${DEST:-.carry/worker}
STAGE=$(mktemp -d)
mkdir -p "$STAGE/bin" "$STAGE/lib" "$DEST"
bins=("$BUILD_DIR/gpu/worker/worker_test" "$BUILD_DIR/bin/worker_bench" "$BUILD_DIR/bin/kvrecalld")
# The kernels' tests and benchmark too (bench/gpu/run_device.sh reads them
# from CARRY=<bundle>/bin).
for extra in gpu/gpu_kernels_test gpu/gpu_reference_test bin/gpu_bench; do
  [[ -x "$BUILD_DIR/$extra" ]] && bins+=("$BUILD_DIR/$extra")
done
for b in "${bins[@]}"; do strip -o "$STAGE/bin/$(basename "$b")" "$b"; done
strip -o "$STAGE/lib/libkvrecall_worker.so" "$BUILD_DIR/lib/libkvrecall_worker.so"
ldd "${bins[@]}" "$BUILD_DIR/lib/libkvrecall_worker.so" | awk '/=>/ {print $3}' | sort -u |
  grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux-x86-64|libpthread|libdl|librt)\.so' |
  while read -r lib; do cp -L "$lib" "$STAGE/lib/"; done
tar czf "$DEST/bundle.tgz" -C "$STAGE" bin lib
rm -rf "$STAGE"
ls -la "$DEST/bundle.tgz"
