#!/usr/bin/python3
"""Aggregate put/get throughput of a kvrecalld cluster of 1, 2 and 4 nodes
(one etcd, R = 1 by default so that each node's work is its share, as many client
processes as nodes), in one run (docs/cluster.md). Each client process
routes with kvrecall.cluster.ClusterClient and puts, then gets, chains of
spans of --span_kib KiB for --seconds each.

    PYTHONPATH=build/python /usr/bin/python3 tests/integration/cluster_scaling.py --nodes 1,2,4

Prints one line per cluster size (JSON with --json). On a machine with
fewer cores than nodes + clients the nodes and clients share the cores and
the numbers say so, not how the cluster scales: run it on a machine with at
least 4 cores per node (16 CPUs for 4 nodes)."""

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_chaos as cc  # noqa: E402 (etcd and node helpers)

import numpy as np  # noqa: E402


def client_proc(seeds, seconds, span_kib, idx, out):
    from kvrecall import Span, cluster, hashing
    c = cluster.ClusterClient(seeds, deadline_s=60)
    head_dim = 64
    tokens = span_kib * 1024 // (cc.LAYERS * 2 * cc.KV_HEADS * head_dim * 2)
    rng = np.random.default_rng(idx)
    kv = rng.standard_normal((cc.LAYERS, 2, cc.KV_HEADS, tokens, head_dim)).astype(np.float16)
    model = f"scale{span_kib}"
    c.register_model(model, num_layers=cc.LAYERS, num_q_heads=4, num_kv_heads=cc.KV_HEADS,
                     head_dim=head_dim, dtype="f16", block_tokens=tokens)
    hashes, put_bytes = [], 0
    parent = hashing.span_root_hash(model)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        chain = []
        for _ in range(8):
            t = [int(x) for x in rng.integers(0, 50000, tokens)]
            h = hashing.span_hash(parent, t)
            chain.append(Span(hash=h, parent=parent, num_tokens=tokens, payload=kv, token_ids=t))
            parent = h
        c.put_spans(model, chain)
        hashes += [s.hash for s in chain]
        put_bytes += 8 * kv.nbytes
    put_s = seconds
    got_bytes, i = 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        batch = hashes[i % len(hashes):i % len(hashes) + 8]
        i += 8
        for f in c.get_spans(model, batch):
            got_bytes += f.array.nbytes if f.found else 0
    out.put((put_bytes / put_s, got_bytes / seconds))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--span_kib", type=int, default=256)
    ap.add_argument("--replication_factor", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import pathlib
    import shutil
    import tempfile
    rows = []
    for n in [int(x) for x in a.nodes.split(",")]:
        root = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-scale-"))
        etcd, port = cc.start_etcd(root)
        nodes = []
        try:
            for i in range(n):
                nodes.append(cc.Node(root, i + 1, port, 10, replication_factor=a.replication_factor))
            time.sleep(0.5)
            q = mp.Queue()
            procs = [mp.Process(target=client_proc,
                                args=([x.address for x in nodes], a.seconds, a.span_kib, k, q))
                     for k in range(n)]
            for p in procs:
                p.start()
            res = [q.get(timeout=a.seconds * 4 + 120) for _ in procs]
            for p in procs:
                p.join()
            row = dict(nodes=n, clients=n, replication_factor=a.replication_factor, span_kib=a.span_kib, cpus=os.cpu_count(),
                       put_mib_s=round(sum(r[0] for r in res) / 2**20, 1),
                       get_mib_s=round(sum(r[1] for r in res) / 2**20, 1))
            rows.append(row)
            print(json.dumps(row) if a.json else
                  f"{n} nodes, {n} clients, {a.span_kib} KiB spans on {row['cpus']} CPUs: "
                  f"put {row['put_mib_s']} MiB/s, get {row['get_mib_s']} MiB/s", flush=True)
        finally:
            for node in nodes:
                node.proc.terminate()
                node.proc.wait()
            etcd.kill()
            etcd.wait()
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
