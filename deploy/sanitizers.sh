#!/usr/bin/env bash
# Sanitizer and static-analysis runs of kvrecall (docs/reliability.md).
#
#   ./deploy/sanitizers.sh tsa     # clang-16 -Wthread-safety -Werror over every
#                                  # kvrecall source (checks ABSL_GUARDED_BY and
#                                  # the lock annotations; syntax only, minutes)
#   ./deploy/sanitizers.sh asan    # ASan + UBSan build (build-asan/) and the unit
#                                  # and integration tests under it
#   ./deploy/sanitizers.sh tsan    # TSan build (build-tsan/) and the unit tests
#
# Environment: JOBS (default nproc), CTEST_ARGS (extra ctest arguments, e.g.
# "-L unit" or "-R rpc"), NICE (default 10: sanitizer builds are long and the
# machine is shared).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: deploy/sanitizers.sh tsa|asan|tsan}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-10}
LAUNCHER=()
if command -v ccache >/dev/null; then
  LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi

case "$MODE" in
  tsa)
    # The annotations are checked by clang only; GCC ignores them. Compile
    # each source of ours (not generated protobuf code) with the flags of the
    # GCC build's compile_commands.json, syntax only.
    command -v clang++-16 >/dev/null || { echo "sanitizers.sh: apt-get install clang-16" >&2; exit 1; }
    BUILD_DIR=${BUILD_DIR:-build}
    if [[ ! -f "$BUILD_DIR/compile_commands.json" ]]; then
      cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
      cmake --build "$BUILD_DIR" --target kvrecall_proto -j "$JOBS" >/dev/null
    fi
    /usr/bin/python3 - "$BUILD_DIR" "$JOBS" "$NICE" <<'PY'
import json, os, shlex, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
build, jobs, nice = sys.argv[1], int(sys.argv[2]), sys.argv[3]
root = os.getcwd()
cmds = json.load(open(os.path.join(build, "compile_commands.json")))
todo = []
for c in cmds:
    f = os.path.realpath(c["file"])
    if not f.startswith(root + "/") or f.startswith(os.path.realpath(build)) or not f.endswith(".cc"):
        continue
    rel = os.path.relpath(f, root)
    # The libraries that hold locks (tests, benchmarks, the CLI and CUDA
    # sources declare no guarded state).
    if not rel.startswith(("common/", "service/", "index/", "clients/cpp/", "gpu/worker/")):
        continue
    if rel.endswith("_test.cc") or "/testing/" in rel or rel.startswith("index/faiss/"):
        continue  # tests; the FAISS adapter needs OpenMP headers clang-16 lacks here
    args = shlex.split(c["command"])
    keep = [a for a in args[1:] if a.startswith(("-I", "-D", "-std=", "-isystem")) or a == "-pthread"]
    # -isystem takes its path as the next argument
    out, skip = [], False
    for i, a in enumerate(args[1:]):
        if skip:
            out.append(a); skip = False; continue
        if a == "-isystem":
            out.append(a); skip = True; continue
        if a in keep:
            out.append(a)
    todo.append((f, c["directory"], out))
def run(item):
    f, d, flags = item
    cmd = ["nice", "-n", nice, "clang++-16", "-fsyntax-only", "-Wthread-safety",
           "-Wthread-safety-beta", "-Werror=thread-safety", "-Wno-unknown-warning-option",
           *flags, f]
    p = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    return f, p.returncode, p.stderr
failed = 0
with ThreadPoolExecutor(jobs) as ex:
    for f, rc, err in ex.map(run, todo):
        if rc != 0:
            failed += 1
            print(f"== {os.path.relpath(f, root)}\n{err}")
print(f"thread-safety: {len(todo) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
    ;;
  asan|tsan)
    if [[ "$MODE" == asan ]]; then
      FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"
      DIR=${BUILD_DIR:-build-asan}
      export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
      export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
      # Leaks inside the Debian-built gRPC/protobuf/RocksDB singletons are theirs.
      export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/deploy/lsan.supp}
      LABELS=${CTEST_ARGS:--LE "gpu|e2e"}
    else
      FLAGS="-fsanitize=thread -O1 -g"
      DIR=${BUILD_DIR:-build-tsan}
      export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/deploy/tsan.supp}
      LABELS=${CTEST_ARGS:--L unit}
    fi
    nice -n "$NICE" cmake -S . -B "$DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DKVRECALL_WITH_CUDA=OFF -DKVRECALL_BUILD_BENCH=OFF "${LAUNCHER[@]}" \
      -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_C_FLAGS="$FLAGS" \
      -DCMAKE_EXE_LINKER_FLAGS="${FLAGS%% *}" -DCMAKE_SHARED_LINKER_FLAGS="${FLAGS%% *}" >/dev/null
    nice -n "$NICE" cmake --build "$DIR" -j "$JOBS"
    # shellcheck disable=SC2086
    nice -n "$NICE" ctest --test-dir "$DIR" --output-on-failure -j "$JOBS" --timeout 1800 $LABELS
    ;;
  *)
    echo "usage: deploy/sanitizers.sh tsa|asan|tsan" >&2
    exit 2
    ;;
esac
