#!/usr/bin/python3
"""Chaos run of a kvrecalld cluster (docs/cluster.md), outside CI: one real
etcd and N nodes (R = 2) on loopback, put/get/attend load from several
threads through kvrecall.cluster.ClusterClient, and rounds of a random node
killed with SIGKILL and restarted. At the end, once replication settled,
every acknowledged durable span must read back with its exact bytes.

    PYTHONPATH=build/python /usr/bin/python3 tests/integration/cluster_chaos.py --rounds 10

Exit 0 when no acknowledged durable span was lost; prints one summary line
(JSON with --json)."""

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from kvrecall import Span, cluster, hashing

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("KVRECALL_BUILD_DIR", REPO / "build"))
KVRECALLD = BUILD / "bin" / "kvrecalld"
ETCD = os.environ.get("KVRECALL_ETCD_BINARY", "/usr/bin/etcd")
MODEL, TOKENS, LAYERS, KV_HEADS, HEAD_DIM = "chaos", 32, 2, 2, 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_etcd(root):
    port, peer = free_port(), free_port()
    log = open(root / "etcd.log", "wb")
    proc = subprocess.Popen(
        [ETCD, "--name", "c", "--data-dir", str(root / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{port}",
         "--advertise-client-urls", f"http://127.0.0.1:{port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"c=http://127.0.0.1:{peer}"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if b'"true"' in r.read():
                    return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("etcd did not start")


class Node:
    def __init__(self, root, i, etcd_port, lease_ttl_s, replication_factor=2):
        self.id, self.port = f"n{i}", free_port()
        self.dir = root / self.id
        self.dir.mkdir()
        self.args = [str(KVRECALLD), f"--listen=127.0.0.1:{self.port}",
                     f"--port_file={self.dir / 'port'}", f"--data_dir={self.dir / 'data'}",
                     f"--etcd_endpoints=127.0.0.1:{etcd_port}", f"--node_id={self.id}",
                     f"--replication_factor={replication_factor}",
                     f"--lease_ttl_s={lease_ttl_s}",
                     "--replication_interval_s=2", "--memory_capacity_bytes=128MiB"]
        self.proc = None
        self.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        (self.dir / "port").unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.args, stdout=open(self.dir / "log", "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (self.dir / "port").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.id} did not start: {(self.dir / 'log').read_text()[-2000:]}")
            time.sleep(0.02)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def make_chain(rng, n):
    spans, parent = [], hashing.span_root_hash(MODEL)
    for _ in range(n):
        tokens = [int(t) for t in rng.integers(0, 50000, TOKENS)]
        h = hashing.span_hash(parent, tokens)
        kv = rng.standard_normal((LAYERS, 2, KV_HEADS, TOKENS, HEAD_DIM)).astype(np.float16)
        spans.append(Span(hash=h, parent=parent, num_tokens=TOKENS, payload=kv,
                          token_ids=tokens, durable=True))
        parent = h
    return spans


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--lease_ttl_s", type=int, default=3)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rand = random.Random(a.seed)
    root = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-chaos-"))
    etcd, etcd_port = start_etcd(root)
    nodes = [Node(root, i + 1, etcd_port, a.lease_ttl_s) for i in range(a.nodes)]
    stats = dict(acked_spans=0, put_errors=0, gets=0, get_errors=0, get_misses=0, attends=0,
                 attend_errors=0, rounds=0, lost=0, wrong_bytes=0)
    lock = threading.Lock()
    errors_seen = {}  # kind -> {message prefix: count}

    def note(kind, e):
        msg = f"{type(e).__name__}: {str(e)[:90]}"
        with lock:
            errors_seen.setdefault(kind, {}).setdefault(msg, 0)
            errors_seen[kind][msg] += 1

    acked = []  # (hash, array) of acknowledged durable spans
    stop = threading.Event()
    try:
        c = cluster.ClusterClient([n.address for n in nodes], refresh_interval_s=0.5,
                                  deadline_s=20)
        while sum(n.live for n in c.membership().nodes) < a.nodes:
            time.sleep(0.1)
            c.refresh()
        c.register_model(MODEL, num_layers=LAYERS, num_q_heads=4, num_kv_heads=KV_HEADS,
                         head_dim=HEAD_DIM, dtype="f16", block_tokens=TOKENS)

        def writer(k):
            rng = np.random.default_rng(a.seed * 1000 + k)
            while not stop.is_set():
                chain = make_chain(rng, 4)
                try:
                    c.put_spans(MODEL, chain)
                except Exception as e:  # noqa: BLE001 - a failed put is not acknowledged
                    note("put", e)
                    with lock:
                        stats["put_errors"] += 1
                    continue
                with lock:
                    acked.extend((s.hash, s.payload) for s in chain)
                    stats["acked_spans"] += len(chain)

        def reader():
            rng = random.Random(a.seed + 7)
            while not stop.is_set():
                with lock:
                    sample = rng.sample(acked, min(8, len(acked))) if acked else []
                if not sample:
                    time.sleep(0.05)
                    continue
                try:
                    got = c.get_spans(MODEL, [h for h, _ in sample])
                except Exception as e:  # noqa: BLE001
                    note("get", e)
                    with lock:
                        stats["get_errors"] += 1
                    continue
                with lock:
                    stats["gets"] += len(sample)
                    stats["get_misses"] += sum(not f.found for f in got)
                    for f in got:
                        if not f.found:
                            errors_seen.setdefault("miss", {}).setdefault(f.miss_reason, 0)
                            errors_seen["miss"][f.miss_reason] += 1

        def attender():
            rng = np.random.default_rng(a.seed + 11)
            while not stop.is_set():
                with lock:
                    n = len(acked)
                if n < 8:
                    time.sleep(0.1)
                    continue
                with lock:
                    start = (int(rng.integers(0, n // 4)) * 4)
                    chain = [h for h, _ in acked[start:start + 4]]
                try:
                    q = rng.standard_normal((4, HEAD_DIM)).astype(np.float32)
                    # To the context's owner, the next node when it is down.
                    c._on_owner(chain[-1], lambda n: n.attend(
                        n.open_context(MODEL, chain).context, 0, q, kind="all"))
                    with lock:
                        stats["attends"] += 1
                except Exception as e:  # noqa: BLE001
                    note("attend", e)
                    with lock:
                        stats["attend_errors"] += 1
                    time.sleep(0.1)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(a.writers)]
        threads += [threading.Thread(target=reader), threading.Thread(target=attender)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        for r in range(a.rounds):
            time.sleep(rand.uniform(0.5, 1.5))
            victim = rand.choice(nodes)
            victim.kill()
            time.sleep(rand.uniform(0.5, a.lease_ttl_s + 1.0))
            victim.start()
            stats["rounds"] = r + 1
            print(f"round {r + 1}: killed and restarted {victim.id}; "
                  f"{stats['acked_spans']} spans acknowledged", file=sys.stderr)
        stop.set()
        for t in threads:
            t.join()
        stats["load_s"] = round(time.monotonic() - t0, 1)
        # Settle: every node live, no replication debt, nothing misplaced.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                c.refresh()
                sts = [c.node_status(n.address) for n in nodes]
                if (sum(n.live for n in c.membership().nodes) == a.nodes and
                        all(s.replication.debt_spans == 0 and s.replication.misplaced_spans == 0
                            and s.replication.sweeps > 0 for s in sts)):
                    stats["copies"] = sum(s.spans for s in sts)
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        stats["settle_s"] = round(time.monotonic() - t0 - stats["load_s"], 1)
        for b in range(0, len(acked), 64):
            batch = acked[b:b + 64]
            got = c.get_spans(MODEL, [h for h, _ in batch])
            for (h, kv), f in zip(batch, got):
                if not f.found:
                    stats["lost"] += 1
                elif not np.array_equal(f.array, kv):
                    stats["wrong_bytes"] += 1
    finally:
        stop.set()
        for n in nodes:
            if n.proc and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
                n.proc.wait()
        etcd.kill()
        etcd.wait()
        shutil.rmtree(root, ignore_errors=True)
    for kind, seen in errors_seen.items():
        for msg, n in sorted(seen.items(), key=lambda x: -x[1])[:4]:
            print(f"{kind} x{n}: {msg}", file=sys.stderr)
    if a.json:
        print(json.dumps(stats))
    else:
        print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0 if stats["lost"] == 0 and stats["wrong_bytes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
