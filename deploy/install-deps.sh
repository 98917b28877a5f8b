#!/usr/bin/env bash
# Installs the Debian 12 (bookworm) packages kvrecall needs to build, test and
# benchmark. Idempotent: packages already present are skipped, and nothing is
# downloaded from outside the Debian archive.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config git
  # C++ libraries (STYLE.md pinned versions)
  libabsl-dev libprotobuf-dev protobuf-compiler
  libgrpc++-dev protobuf-compiler-grpc
  librocksdb-dev libfaiss-dev libopenblas-dev libopenblas0-pthread
  libgtest-dev libgmock-dev libbenchmark-dev
  libxxhash-dev libcpp-httplib-dev libcli11-dev nlohmann-json3-dev
  # TLS test certificates (tests/integration/security_test.cc)
  openssl
  # fuzzing and the thread-safety analysis (deploy/fuzz.sh, deploy/sanitizers.sh)
  clang-16 libfuzzer-16-dev libclang-rt-16-dev libomp-16-dev
  libzstd-dev liblz4-dev libsnappy-dev zlib1g-dev libbz2-dev
  # Python client, tests and plots (all for /usr/bin/python3)
  python3 python3-numpy python3-grpcio python3-protobuf python3-pytest
  python3-faiss python3-hnswlib python3-matplotlib python3-xxhash
  # the model runner (kvrecall.integrations, bench/e2e): Debian's torch 1.13, CPU
  python3-torch
  # cluster coordination (docs/cluster.md): etcd 3.4, etcdctl, and the .proto
  # files of its v3 API that proto/etcd compiles at build time
  etcd-server etcd-client golang-etcd-server-dev
  # peers for benchmarks
  redis-server redis-tools
  # C client of Redis for bench/store (store_bench)
  libhiredis-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "install-deps: installing ${#missing[@]} packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
