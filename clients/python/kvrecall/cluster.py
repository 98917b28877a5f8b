"""A kvrecalld cluster from Python (docs/cluster.md): the placement function
the nodes and the C++ client use, and a client that routes each call to the
node that owns the data.

    import kvrecall.cluster
    c = kvrecall.cluster.ClusterClient(["127.0.0.1:7878", "127.0.0.1:7879"])
    c.register_model("m", num_layers=8, num_q_heads=4, num_kv_heads=2, head_dim=128,
                     dtype="f16", block_tokens=256)
    c.put_spans("m", spans)                 # each run of spans to its owner
    got = c.get_spans("m", hashes)          # from the owners; the next replica if one is down

Placement (rendezvous hashing, "rendezvous-xxh3-64.v1"): the score of a node
for a key is XXH3-64 (seed 0) of the key's 16 bytes followed by the node id's
bytes; nodes in descending score order, ties by node id; the owners are the
first R. ``placement_order`` passes tests/vectors/placement_vectors.tsv like
the C++ implementation.
"""

import threading
import time
from typing import Dict, List, Optional, Sequence

from kvrecall._xxhash import xxhash

PLACEMENT_VERSION = "rendezvous-xxh3-64.v1"


def rendezvous_score(key: bytes, node_id: str) -> int:
    """The score of ``node_id`` for a 16-byte key."""
    return xxhash.xxh3_64_intdigest(bytes(key) + node_id.encode())


def placement_order(key: bytes, nodes: Sequence[str]) -> List[str]:
    """``nodes`` in placement order for ``key`` (highest score first)."""
    if len(key) != 16:
        raise ValueError("placement keys are 16-byte span hashes")
    return sorted(nodes, key=lambda n: (-rendezvous_score(key, n), n))


def owners(key: bytes, nodes: Sequence[str], replication_factor: int) -> List[str]:
    """The first min(R, len(nodes)) nodes of placement_order."""
    return placement_order(key, nodes)[:max(0, replication_factor)]


def _node_failure(error) -> bool:
    from kvrecall import errors
    return isinstance(error, (errors.UnavailableError, errors.DeadlineExceededError))


class ClusterClient:
    """Routes KvStore calls over a kvrecalld cluster. ``seeds`` are host:port
    of any nodes; the other keyword arguments go to every node's
    ``kvrecall.Client`` (token, TLS, deadline). A node that does not answer is
    skipped for the next one in placement order at once, and the membership
    is read again (clients stop routing to a dead node within its lease TTL).
    Thread-safe."""

    def __init__(self, seeds: Sequence[str], refresh_interval_s: float = 2.0, **client_args):
        if not seeds:
            raise ValueError("give at least one seed (host:port)")
        self._seeds = list(seeds)
        self._args = dict(client_args)
        self._args.setdefault("max_attempts", 1)
        # Reconnect within a second to a node that was down (gRPC's default
        # backoff grows to 2 minutes: a restarted owner would be skipped).
        self._args.setdefault("channel_options", (("grpc.initial_reconnect_backoff_ms", 100),
                                                  ("grpc.min_reconnect_backoff_ms", 100),
                                                  ("grpc.max_reconnect_backoff_ms", 1000)))
        self._refresh_interval_s = refresh_interval_s
        self._lock = threading.Lock()
        self._clients: Dict[str, object] = {}
        self._membership = None
        self._read_at = 0.0
        self.refresh()

    # --- membership ---

    def node(self, address: str):
        """The ``kvrecall.Client`` of the node at ``address``."""
        from kvrecall.client import Client
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = Client(address, **self._args)
                self._clients[address] = c
            return c

    def _cluster_stub(self, address: str):
        from kvrecall.v1 import cluster_pb2_grpc
        return cluster_pb2_grpc.ClusterStub(self.node(address)._channel)

    def refresh(self):
        """Reads the membership from any live node (else the seeds)."""
        from kvrecall import errors
        from kvrecall.v1 import cluster_pb2
        import grpc
        with self._lock:
            known = [n.address for n in self._membership.nodes if n.live] if self._membership else []
        last = None
        for address in known + [s for s in self._seeds if s not in known]:
            node = self.node(address)
            try:
                m = self._cluster_stub(address).GetMembership(
                    cluster_pb2.GetMembershipRequest(), timeout=min(5.0, node.deadline_s),
                    metadata=node._metadata)
            except grpc.RpcError as e:
                last = errors.from_rpc_error(e)
                if not _node_failure(last):
                    raise last from None
                continue
            if m.placement != PLACEMENT_VERSION:
                raise errors.FailedPreconditionError(
                    f"the cluster places data with '{m.placement}'; this client implements "
                    f"'{PLACEMENT_VERSION}'")
            with self._lock:
                if self._membership is None or m.revision >= self._membership.revision:
                    self._membership = m
                self._read_at = time.monotonic()
            return
        raise errors.UnavailableError(f"no node of the cluster answered (last: {last})")

    def membership(self):
        """The membership (kvrecall.v1.Membership) as last read."""
        with self._lock:
            return self._membership

    def node_status(self, address: str):
        """kvrecall.v1.NodeStatus of the node at ``address``."""
        from kvrecall.v1 import cluster_pb2
        node = self.node(address)
        return node._call(lambda t: self._cluster_stub(address).GetNodeStatus(
            cluster_pb2.GetNodeStatusRequest(), timeout=t, metadata=node._metadata))

    def order(self, key: bytes) -> List[str]:
        """Live node ids in placement order for ``key``."""
        with self._lock:
            stale = time.monotonic() - self._read_at >= self._refresh_interval_s
        if stale:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the last view stays in force
                pass
        with self._lock:
            live = [n.node_id for n in self._membership.nodes if n.live]
        return placement_order(key, live)

    def _addresses(self, key: bytes) -> List[str]:
        order = self.order(key)
        with self._lock:
            by_id = {n.node_id: n.address for n in self._membership.nodes}
        out = [by_id[i] for i in order]
        return out + [s for s in self._seeds if s not in out]

    def _on_owner(self, key: bytes, call):
        last = None
        for address in self._addresses(key):
            try:
                result = call(self.node(address))
            except Exception as e:  # noqa: BLE001
                if not _node_failure(e):
                    raise
                last = e
                continue
            if last is not None:
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    pass
            return result
        try:
            self.refresh()
        except Exception:  # noqa: BLE001
            pass
        raise last

    # --- calls ---

    def register_model(self, model_id: str, **kwargs):
        return self._on_owner(bytes(16), lambda c: c.register_model(model_id, **kwargs))

    def put_spans(self, model_id: str, spans, salt: str = "") -> List[dict]:
        """Stores spans in chain order: each run of consecutive spans with the
        same first owner in one call to that owner."""
        results = []
        i = 0
        while i < len(spans):
            first = self.order(spans[i].hash)[:1]
            j = i + 1
            while j < len(spans) and self.order(spans[j].hash)[:1] == first:
                j += 1
            run = list(spans[i:j])
            results += self._on_owner(spans[i].hash, lambda c: c.put_spans(model_id, run, salt))
            i = j
        return results

    def get_spans(self, model_id: str, hashes: Sequence[bytes], layers=None):
        """Fetches spans in request order, one call per first owner."""
        groups: Dict[str, List[int]] = {}
        for i, h in enumerate(hashes):
            groups.setdefault((self.order(h) or [""])[0], []).append(i)
        out: List[Optional[object]] = [None] * len(hashes)
        for idx in groups.values():
            group = [hashes[i] for i in idx]
            got = self._on_owner(group[0], lambda c: c.get_spans(model_id, group, layers))
            for j, f in enumerate(got):
                f.index = idx[j]
                out[idx[j]] = f
        return out

    def lookup(self, model_id: str, hashes: Sequence[bytes]):
        key = bytes(hashes[0]) if hashes else bytes(16)
        return self._on_owner(key, lambda c: c.lookup(model_id, hashes))

    def delete_spans(self, hashes: Sequence[bytes]):
        key = bytes(hashes[0]) if hashes else bytes(16)
        return self._on_owner(key, lambda c: c.delete_spans(hashes))

    def close(self):
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
