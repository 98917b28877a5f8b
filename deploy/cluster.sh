#!/usr/bin/env bash
# The cluster command: installs what is missing (deploy/install-deps.sh),
# builds kvrecalld and the kvrecall CLI, then starts one etcd and N kvrecalld
# nodes of one cluster on this machine (docs/cluster.md), in the foreground.
# Ctrl-C (SIGINT) or SIGTERM stops the nodes gracefully, then etcd.
#
#   ./deploy/cluster.sh                      # 3 nodes, R = 2, ports 7878..7880
#   NODES=4 ./deploy/cluster.sh              # 4 nodes
#   ./deploy/cluster.sh --lease_ttl_s=5      # extra flags go to every node
#
# Environment: NODES (3), BASE_PORT (7878: node i listens on BASE_PORT + i - 1),
# ETCD_PORT (2379; its peer port is ETCD_PORT + 1), DATA (./cluster-data: etcd
# in $DATA/etcd, node i in $DATA/n<i>), REPLICATION_FACTOR (2), BUILD_DIR
# (build), SKIP_BUILD=1 (use the binaries already built).
# Then:  build/bin/kvrecall --target=127.0.0.1:7878 cluster status
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-7878}
ETCD_PORT=${ETCD_PORT:-2379}
DATA=${DATA:-./cluster-data}
REPLICATION_FACTOR=${REPLICATION_FACTOR:-2}
ETCD=${KVRECALL_ETCD_BINARY:-/usr/bin/etcd}

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  ./deploy/install-deps.sh
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVRECALL_WERROR=ON
  cmake --build "$BUILD_DIR" -j "$JOBS" --target kvrecalld kvrecall
fi
[[ -x "$ETCD" ]] || { echo "cluster.sh: $ETCD is missing (apt-get install etcd-server)" >&2; exit 1; }
mkdir -p "$DATA"

pids=()
stop() {
  trap - INT TERM EXIT
  echo "cluster.sh: stopping ${#pids[@]} processes"
  # Nodes first (they leave the membership), etcd last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do wait "${pids[$i]}" 2>/dev/null || true; done
  exit 0
}
trap stop INT TERM EXIT

"$ETCD" --name kvrecall-etcd --data-dir "$DATA/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "kvrecall-etcd=http://127.0.0.1:$((ETCD_PORT + 1))" \
  >"$DATA/etcd.log" 2>&1 &
etcd_pid=$!
pids=("$etcd_pid")
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' && break
  kill -0 "$etcd_pid" 2>/dev/null || { echo "cluster.sh: etcd exited:"; tail -20 "$DATA/etcd.log"; exit 1; }
  sleep 0.1
done
echo "cluster.sh: etcd on 127.0.0.1:$ETCD_PORT (log $DATA/etcd.log)"

for i in $(seq "$NODES"); do
  port=$((BASE_PORT + i - 1))
  # The node's command line, also kept in $DATA/n<i>.sh to restart a node
  # that was stopped or killed (the cluster keeps running without it).
  cmd=("$BUILD_DIR/bin/kvrecalld" --listen="127.0.0.1:$port" --data_dir="$DATA/n$i"
       --etcd_endpoints="127.0.0.1:$ETCD_PORT" --node_id="n$i"
       --replication_factor="$REPLICATION_FACTOR" "$@")
  printf '#!/bin/sh\nexec %s >>"%s" 2>&1\n' "${cmd[*]@Q}" "$DATA/n$i.log" >"$DATA/n$i.sh"
  chmod +x "$DATA/n$i.sh"
  "${cmd[@]}" >"$DATA/n$i.log" 2>&1 &
  pids+=("$!")
  echo "cluster.sh: node n$i on 127.0.0.1:$port (data $DATA/n$i, log $DATA/n$i.log, restart: $DATA/n$i.sh)"
done
echo "cluster.sh: try: $BUILD_DIR/bin/kvrecall --target=127.0.0.1:$BASE_PORT cluster status"
# Runs until Ctrl-C or etcd exits; a node that exits (or is killed) leaves
# the others running.
wait "$etcd_pid" || true
echo "cluster.sh: etcd exited; see $DATA/etcd.log"
