#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang-16 (build-fuzz/) and runs
# each over its seed corpus (fuzz/corpus/<name>) — docs/reliability.md.
#
#   ./deploy/fuzz.sh                       # every target, FUZZ_SECONDS each (default 5: CI)
#   FUZZ_RUNS=10000000 ./deploy/fuzz.sh npy_fuzz   # a fixed number of executions
#
# A crash leaves crash-<sha1> in the working directory and fails the script.
# The corpus grown by a run goes to build-fuzz/corpus/<name> (the repository's
# seeds are not changed).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
  TARGETS=(npy_fuzz tenants_fuzz store_records_fuzz put_stream_fuzz request_fuzz index_load_fuzz)
fi
command -v clang++-16 >/dev/null || { echo "fuzz.sh: apt-get install clang-16 libfuzzer-16-dev" >&2; exit 1; }
# FAISS's headers include <omp.h>: clang-16 finds it only with libomp-16-dev
# (which conflicts with libomp-dev, the LLVM 14 one; kvrecall needs neither
# for its GCC build, which uses GCC's libgomp).
if ! echo '#include <omp.h>' | clang++-16 -fopenmp=libomp -x c++ -fsyntax-only - 2>/dev/null; then
  echo "fuzz.sh: clang-16 finds no omp.h: apt-get install libomp-16-dev" \
       "($(dpkg-query -W -f='${Status}' libomp-16-dev 2>&1 || true))" >&2
  exit 1
fi
LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
CC=clang-16 CXX=clang++-16 cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DKVRECALL_FUZZ=ON -DKVRECALL_WITH_CUDA=OFF -DKVRECALL_BUILD_TESTS=OFF \
  -DKVRECALL_BUILD_BENCH=OFF "${LAUNCHER[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target "${TARGETS[@]}"
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/fuzz/lsan.supp}
for t in "${TARGETS[@]}"; do
  name=${t%_fuzz}
  corpus="$BUILD_DIR/corpus/$name"
  mkdir -p "$corpus"
  if [[ -n "${FUZZ_RUNS:-}" ]]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="${FUZZ_SECONDS:-5}"); fi
  # One allocation above 64 MiB is a finding: a parser must not allocate what
  # a few input bytes merely claim (put_stream_fuzz found one). Not for
  # index_load_fuzz: FAISS's readers size vectors by the counts in the file,
  # which the index checksum guards in the daemon; the target caps `new`
  # itself while it loads (fuzz/throwing_new.cc, docs/reliability.md).
  # FAISS leaks what it built when a read throws half way (suppressed in
  # fuzz/lsan.supp, but the memory stays): index_load_fuzz runs in fork mode,
  # whose child processes restart, so the leak cannot add up to an OOM.
  if [[ "$t" != index_load_fuzz ]]; then
    limit+=(-malloc_limit_mb="${FUZZ_MALLOC_LIMIT_MB:-64}")
  else
    limit+=(-fork=1 -ignore_ooms=1)
  fi
  echo "fuzz.sh: $t ${limit[*]}"
  log="$BUILD_DIR/$t.log"
  rc=0
  "$BUILD_DIR/fuzz/$t" "$corpus" "fuzz/corpus/$name" "${limit[@]}" -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  grep -E "^(Done|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)" "$log" || true
  if ((rc != 0)); then
    tail -40 "$log" >&2
    echo "fuzz.sh: $t failed (exit $rc); the reproducer is crash-* in $PWD" >&2
    exit 1
  fi
done
echo "fuzz.sh: ${#TARGETS[@]} targets passed"
