"""kvrecall.cluster: the placement vectors shared with the C++ nodes, and a
cluster of 3 kvrecalld on a real etcd (Debian's etcd-server) on loopback:
puts with R = 2, kill -9 of a node, every acknowledged span still read."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest

from kvrecall import cluster, hashing

VECTORS = pathlib.Path(__file__).resolve().parents[3] / "tests" / "vectors" / "placement_vectors.tsv"
ETCD = os.environ.get("KVRECALL_ETCD_BINARY", "/usr/bin/etcd")


def load_cases():
    cases = []
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, nodes, order = line.split("\t")
            cases.append((bytes.fromhex(key), nodes.split(","), order.split(",")))
    return cases


CASES = load_cases()


def test_there_are_placement_vectors():
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].hex()[:8]}-{len(c[1])}")
def test_placement_vectors(case):
    key, nodes, order = case
    assert cluster.placement_order(key, nodes) == order
    assert cluster.owners(key, nodes, 2) == order[:2]
    # The order does not depend on the order nodes are listed in.
    assert cluster.placement_order(key, list(reversed(nodes))) == order


def test_placement_rejects_bad_keys():
    with pytest.raises(ValueError):
        cluster.placement_order(b"short", ["n1"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    def __init__(self, root):
        self.port, peer = free_port(), free_port()
        self.log = open(root / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "t", "--data-dir", str(root / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{self.port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        break
            except OSError:
                pass
            assert self.proc.poll() is None, (root / "etcd.log").read_text()
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.1)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def start_node(root, i, port, etcd_port):
    from conftest import KVRECALLD
    d = root / f"n{i}"
    d.mkdir(exist_ok=True)
    log = open(d / "log", "ab")
    proc = subprocess.Popen(
        [str(KVRECALLD), f"--listen=127.0.0.1:{port}", f"--port_file={d / 'port'}",
         f"--data_dir={d / 'data'}", f"--etcd_endpoints=127.0.0.1:{etcd_port}",
         f"--node_id=n{i}", "--replication_factor=2", "--lease_ttl_s=2",
         "--replication_interval_s=1", "--memory_capacity_bytes=64MiB"],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (d / "port").exists():
        assert proc.poll() is None, (d / "log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


@pytest.mark.skipif(not os.path.exists(ETCD) and not os.environ.get("KVRECALL_REQUIRE_ETCD"),
                    reason=f"{ETCD} is missing (apt-get install etcd-server)")
def test_cluster_routing_and_node_loss():
    from kvrecall import Span
    root = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-pycluster-"))
    etcd = Etcd(root)
    ports = [free_port() for _ in range(3)]
    procs = []
    try:
        procs = [start_node(root, i + 1, ports[i], etcd.port) for i in range(3)]
        c = cluster.ClusterClient([f"127.0.0.1:{ports[0]}"], refresh_interval_s=0.5)
        deadline = time.monotonic() + 10
        while sum(n.live for n in c.membership().nodes) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            c.refresh()
        assert c.membership().replication_factor == 2
        c.register_model("pm", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                         dtype="f16", block_tokens=32)
        rng = np.random.default_rng(7)
        spans, arrays = [], []
        parent = hashing.span_root_hash("pm")
        for _ in range(24):
            tokens = [int(t) for t in rng.integers(0, 50000, 32)]
            h = hashing.span_hash(parent, tokens)
            kv = rng.standard_normal((2, 2, 2, 32, 16)).astype(np.float16)
            spans.append(Span(hash=h, parent=parent, num_tokens=32, payload=kv,
                              token_ids=tokens, durable=True))
            arrays.append(kv)
            parent = h
        c.put_spans("pm", spans)
        hashes = [s.hash for s in spans]
        # The first owner of each span is where the client sends it; every
        # node is the first owner of some.
        firsts = {c.order(h)[0] for h in hashes}
        assert firsts == {"n1", "n2", "n3"}

        # kill -9 the node owning most spans: every span is still read, at once.
        victim = max(firsts, key=lambda n: sum(c.order(h)[0] == n for h in hashes))
        procs[int(victim[1:]) - 1].send_signal(signal.SIGKILL)
        procs[int(victim[1:]) - 1].wait()
        t0 = time.monotonic()
        got = c.get_spans("pm", hashes)
        assert time.monotonic() - t0 < 2.0
        for f, kv in zip(got, arrays):
            assert f.found, f.miss_reason
            np.testing.assert_array_equal(f.array, kv)
        # The membership drops it within the lease TTL.
        deadline = time.monotonic() + 6
        while victim in c.order(hashes[0]):
            assert time.monotonic() < deadline, "the dead node stayed in the membership"
            time.sleep(0.1)
        # Re-replicated: the two live nodes hold 2 copies of every span.
        live = [f"127.0.0.1:{ports[i]}" for i in range(3) if f"n{i + 1}" != victim]
        deadline = time.monotonic() + 20
        while sum(c.node_status(a).spans for a in live) != 48:
            assert time.monotonic() < deadline, [c.node_status(a) for a in live]
            time.sleep(0.2)
        st = c.node_status(live[0])
        assert st.live_nodes == 2 and st.replication.debt_spans == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
