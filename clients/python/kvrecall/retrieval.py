"""Retrieval calls of the Python client (kvrecall.v1.Retrieval), mixed into
kvrecall.Client: contexts, index builds with progress, search, partial
attention, batch attention over one stream, artifacts, and the exact merge
of partial attention states.

    ctx = c.open_context("m", hashes)                      # hashes from put_sequence
    c.add_queries(ctx.context, layer, prefill_q)           # [n, q_heads, d]: roar's training
    c.build_index(ctx.context, "roar", progress=print)     # waits, reports progress
    r = c.attend(ctx.context, layer, q, k=100, exclude=[(0, 4), (n - 512, n)])
    o, lse = kvrecall.merge_attention([(r.out, r.lse), (o_local, lse_local)])

Every log-sum-exp is in natural log.
"""

import dataclasses
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from kvrecall import errors
from kvrecall.v1 import common_pb2, retrieval_pb2

_NP_TO_DTYPE = {np.dtype("<f2"): common_pb2.DTYPE_F16, np.dtype("<f4"): common_pb2.DTYPE_F32}


def _tensor(array: np.ndarray, dtype=None) -> common_pb2.Tensor:
    """A Tensor from an f16/f32 array (others are sent as f32), or raw 16-bit
    bf16 bit patterns when dtype is DTYPE_BF16."""
    a = np.asarray(array)
    if dtype == common_pb2.DTYPE_BF16:
        a = np.ascontiguousarray(a, dtype="<u2")
    elif a.dtype not in _NP_TO_DTYPE:
        a = a.astype("<f4")
        dtype = common_pb2.DTYPE_F32
    else:
        a = np.ascontiguousarray(a)
        dtype = _NP_TO_DTYPE[a.dtype]
    return common_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes())


@dataclasses.dataclass
class ContextInfo:
    context: bytes       # the context id (the last span's hash)
    num_tokens: int
    num_spans: int
    newly_opened: bool


@dataclasses.dataclass
class SearchResult:
    positions: List[np.ndarray]  # per query head, int64, by descending score
    scores: List[np.ndarray]     # per query head, exact q·k (unscaled)
    stats: object                # kvrecall.v1.RetrievalStats


@dataclasses.dataclass
class AttendResult:
    out: np.ndarray              # [q_heads, head_dim] float32
    lse: np.ndarray              # [q_heads] float32, natural log
    positions: List[np.ndarray]  # per query head (empty when omitted)
    stats: object                # kvrecall.v1.RetrievalStats
    request_id: int = 0


def merge_attention(parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """Merges partial attention states (o [heads, d], lse [heads], natural log)
    over disjoint position sets into the attention over their union:
    M = max lse_j, lse = M + ln Σ exp(lse_j − M), o = Σ exp(lse_j − lse) o_j."""
    lses = np.stack([np.asarray(l, dtype=np.float64) for _, l in parts])   # [J, heads]
    outs = np.stack([np.asarray(o, dtype=np.float64) for o, _ in parts])   # [J, heads, d]
    m = lses.max(axis=0)
    finite = np.isfinite(m)
    safe_m = np.where(finite, m, 0.0)
    w = np.exp(lses - safe_m)                                               # [J, heads]
    total = w.sum(axis=0)
    lse = np.where(finite, safe_m + np.log(np.where(finite, total, 1.0)), -np.inf)
    weights = np.where(finite, w / np.where(finite, total, 1.0), 0.0)
    out = (weights[:, :, None] * outs).sum(axis=0)
    return out.astype(np.float32), lse.astype(np.float32)


def _attend_result(resp) -> AttendResult:
    if resp.error_code:
        raise errors.from_code(resp.error_code, resp.error_message)
    heads = len(resp.lse_natural)
    out = np.frombuffer(resp.out.data, dtype="<f4").reshape(heads, -1) if heads else \
        np.zeros((0, 0), np.float32)
    return AttendResult(out=out.copy(), lse=np.array(resp.lse_natural, dtype=np.float32),
                        positions=[np.array(h.positions, dtype=np.int64) for h in resp.heads],
                        stats=resp.stats, request_id=resp.request_id)


class RetrievalMixin:
    """Methods of kvrecall.Client for kvrecall.v1.Retrieval (see the module doc)."""

    # --- contexts ---

    def open_context(self, model_id: str, chain: Sequence[bytes]) -> ContextInfo:
        """Opens the context of a stored prefix (its span hashes, in order)."""
        req = retrieval_pb2.OpenContextRequest(model_id=model_id, chain=list(chain))
        r = self._call(lambda t: self._retrieval.OpenContext(req, timeout=t,
                                                             metadata=self._metadata))
        return ContextInfo(r.context, r.num_tokens, r.num_spans, r.newly_opened)

    def close_context(self, context: bytes) -> None:
        req = retrieval_pb2.CloseContextRequest(context=context)
        self._call(lambda t: self._retrieval.CloseContext(req, timeout=t, metadata=self._metadata))

    def append_tokens(self, context: bytes, keys: np.ndarray, values: np.ndarray,
                      queries: Optional[np.ndarray] = None,
                      layers: Optional[Tuple[int, int]] = None, bf16: bool = False) -> int:
        """Appends decode-time tokens: keys/values [layers, kv_heads, n, d] in the
        model's dtype (bf16: uint16 bit patterns with bf16=True), optional queries
        [layers, n, q_heads, d]. Returns the first appended position."""
        dt = common_pb2.DTYPE_BF16 if bf16 else None
        req = retrieval_pb2.AppendTokensRequest(
            context=context, keys=_tensor(keys, dt), values=_tensor(values, dt))
        if layers is not None:
            req.layers.begin, req.layers.end = layers
        if queries is not None:
            req.queries.CopyFrom(_tensor(queries))
        r = self._call(lambda t: self._retrieval.AppendTokens(req, timeout=t,
                                                              metadata=self._metadata))
        return r.first_position

    def add_queries(self, context: bytes, layer: int, queries: np.ndarray,
                    first_position: int = 0) -> int:
        """Stores prefill queries [n, q_heads, d] of positions first_position.. as
        the training queries of query-aware index builds (in chunks)."""
        q = np.asarray(queries)
        if q.ndim != 3:
            raise errors.InvalidArgumentError(f"queries must be [n, q_heads, d], not {q.shape}")
        row_bytes = q.shape[1] * q.shape[2] * 4
        per_msg = max(1, (self.chunk_bytes * 4) // row_bytes)

        def messages():
            for b in range(0, q.shape[0], per_msg):
                yield retrieval_pb2.AddQueriesRequest(
                    context=context, layer=layer, first_position=first_position + b,
                    queries=_tensor(q[b:b + per_msg].astype("<f4")))

        r = self._call(lambda t: self._retrieval.AddQueries(messages(), timeout=t,
                                                            metadata=self._metadata))
        return r.queries_stored

    # --- index builds ---

    def build_index(self, context: bytes, kind: str, params: str = "",
                    layers: Sequence[int] = (), kv_heads: Sequence[int] = (), wait: bool = True,
                    timeout_s: float = 3600.0,
                    progress: Optional[Callable[[object], None]] = None):
        """Starts an index build; with wait, waits for it (calling progress(op)
        about once a second) and raises its error if it fails. Returns the
        kvrecall.v1.Operation."""
        req = retrieval_pb2.BuildIndexRequest(context=context, kind=kind, params=params,
                                              layers=list(layers), kv_heads=list(kv_heads))
        op = self._call(lambda t: self._retrieval.BuildIndex(req, timeout=t,
                                                             metadata=self._metadata))
        if not wait:
            return op
        op = self.wait_operation(op.id, timeout_s, progress)
        if op.state in (retrieval_pb2.OPERATION_STATE_FAILED,
                        retrieval_pb2.OPERATION_STATE_CANCELLED):
            raise errors.from_code(op.error_code, op.error_message)
        return op

    def get_operation(self, op_id: str):
        req = retrieval_pb2.GetOperationRequest(id=op_id)
        return self._call(lambda t: self._retrieval.GetOperation(req, timeout=t,
                                                                 metadata=self._metadata))

    def wait_operation(self, op_id: str, timeout_s: float = 3600.0,
                       progress: Optional[Callable[[object], None]] = None):
        """Waits until the operation ends or timeout_s passes; returns it."""
        until = time.monotonic() + timeout_s
        ended = (retrieval_pb2.OPERATION_STATE_DONE, retrieval_pb2.OPERATION_STATE_FAILED,
                 retrieval_pb2.OPERATION_STATE_CANCELLED)
        while True:
            left_ms = int(max(1, min(1000, (until - time.monotonic()) * 1000)))
            req = retrieval_pb2.WaitOperationRequest(id=op_id, timeout_ms=left_ms)
            op = self._call(lambda t: self._retrieval.WaitOperation(req, timeout=t,
                                                                    metadata=self._metadata))
            if progress is not None:
                progress(op)
            if op.state in ended or time.monotonic() >= until:
                return op

    def cancel_operation(self, op_id: str):
        req = retrieval_pb2.CancelOperationRequest(id=op_id)
        return self._call(lambda t: self._retrieval.CancelOperation(req, timeout=t,
                                                                    metadata=self._metadata))

    def list_indexes(self, context: bytes = b""):
        req = retrieval_pb2.ListIndexesRequest(context=context)
        return list(self._call(lambda t: self._retrieval.ListIndexes(
            req, timeout=t, metadata=self._metadata)).indexes)

    def delete_index(self, context: bytes, kind: str, params: str = "") -> None:
        req = retrieval_pb2.DeleteIndexRequest(context=context, kind=kind, params=params)
        self._call(lambda t: self._retrieval.DeleteIndex(req, timeout=t, metadata=self._metadata))

    # --- retrieval ---

    @staticmethod
    def _retrieve_fields(req, context, layer, queries, k, budget, kind, effort, knobs,
                         build_params, exclude, union):
        req.context = context
        req.layer = layer
        req.queries.CopyFrom(_tensor(queries))
        req.k = k
        req.budget = budget
        req.index.kind = kind
        req.index.effort = effort
        req.index.knobs = knobs
        req.index.build_params = build_params
        for b, e in exclude:
            req.exclude.add(begin=b, end=e)
        req.gqa_mode = retrieval_pb2.GQA_MODE_UNION if union else retrieval_pb2.GQA_MODE_PER_HEAD
        return req

    def search(self, context: bytes, layer: int, queries: np.ndarray, k: int = 0,
               budget: float = 0.0, kind: str = "roar", effort: int = 0, knobs: str = "",
               build_params: str = "", exclude: Iterable[Tuple[int, int]] = (),
               union: bool = False) -> SearchResult:
        """Top-k positions per query head for queries [q_heads, d]."""
        req = self._retrieve_fields(retrieval_pb2.SearchRequest(), context, layer, queries, k,
                                    budget, kind, effort, knobs, build_params, exclude, union)
        r = self._call(lambda t: self._retrieval.Search(req, timeout=t, metadata=self._metadata))
        return SearchResult([np.array(h.positions, dtype=np.int64) for h in r.heads],
                            [np.array(h.scores, dtype=np.float32) for h in r.heads], r.stats)

    def attend_request(self, context: bytes, layer: int, queries: np.ndarray, k: int = 0,
                       budget: float = 0.0, kind: str = "roar", effort: int = 0,
                       knobs: str = "", build_params: str = "",
                       exclude: Iterable[Tuple[int, int]] = (), union: bool = False,
                       omit_positions: bool = False, request_id: int = 0,
                       positions: Optional[Sequence[Sequence[int]]] = None, select_k: int = 0):
        """The AttendRequest message of attend() (for attend_stream).

        positions: attend by positions — one list per query head (or per KV
        head), no index searched. select_k: with kind "all" and k = 0, also
        return the select_k highest-scoring positions per query head."""
        req = self._retrieve_fields(retrieval_pb2.AttendRequest(), context, layer, queries, k,
                                    budget, kind, effort, knobs, build_params, exclude, union)
        req.omit_positions = omit_positions
        req.request_id = request_id
        if positions is not None:
            req.ClearField("index")
            for p in positions:
                req.positions.add().positions.extend(int(x) for x in p)
        req.select_k = select_k
        return req

    def attend(self, context: bytes, layer: int, queries: np.ndarray, **options) -> AttendResult:
        """Partial attention per query head over the retrieved positions (the
        keyword options of attend_request)."""
        req = self.attend_request(context, layer, queries, **options)
        r = self._call(lambda t: self._retrieval.Attend(req, timeout=t, metadata=self._metadata))
        return _attend_result(r)

    def attend_stream(self, requests: Iterable[object],
                      timeout_s: Optional[float] = None) -> Iterator[AttendResult]:
        """BatchAttend: one stream for many AttendRequests (attend_request()),
        yielding their results in order. A failed request raises when its
        result is reached. Not retried (a stream is not idempotent to replay)."""
        try:
            for resp in self._retrieval.BatchAttend(iter(requests),
                                                    timeout=timeout_s or self.deadline_s,
                                                    metadata=self._metadata):
                yield _attend_result(resp)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def gather_kv(self, context: bytes, kv_head_positions: Sequence[Sequence[int]],
                  layers: Tuple[int, int] = (0, 0), dtype=np.uint16):
        """The K/V rows of the given positions (one list per KV head) in layers
        [begin, end) ((0, 0): every layer). Returns {layer: (keys, values)},
        each [rows, head_dim] (rows of KV head 0's positions, then head 1's, ...;
        bf16 and f16 as uint16 bit patterns, f32 as float32)."""
        req = retrieval_pb2.GatherKvRequest(context=context)
        req.layers.begin, req.layers.end = layers
        for p in kv_head_positions:
            req.kv_heads.add().positions.extend(int(x) for x in p)
        out = {}

        def fetch(timeout):
            parts = {}
            for m in self._retrieval.GatherKv(req, timeout=timeout, metadata=self._metadata):
                kt = np.float32 if m.keys.dtype == common_pb2.DTYPE_F32 else dtype
                k = np.frombuffer(m.keys.data, dtype=kt).reshape(tuple(m.keys.shape))
                v = np.frombuffer(m.values.data, dtype=kt).reshape(tuple(m.values.shape))
                parts.setdefault(m.layer, []).append((k, v))
            return parts

        for layer, chunks in self._call(fetch).items():
            out[layer] = (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
        return out

    # --- artifacts ---

    def put_artifact(self, model_id: str, kind: str, data: bytes, description: str = ""):
        """Stores a new version of a per-model artifact; returns its ArtifactInfo."""
        chunk = self.chunk_bytes

        def messages():
            yield retrieval_pb2.PutArtifactRequest(model_id=model_id, kind=kind,
                                                   description=description, chunk=data[:chunk])
            for b in range(chunk, len(data), chunk):
                yield retrieval_pb2.PutArtifactRequest(chunk=data[b:b + chunk])

        return self._call(lambda t: self._retrieval.PutArtifact(messages(), timeout=t,
                                                                metadata=self._metadata))

    def get_artifact(self, model_id: str, kind: str, version: int = 0):
        """(ArtifactInfo, bytes) of a version (0: the latest)."""
        req = retrieval_pb2.GetArtifactRequest(model_id=model_id, kind=kind, version=version)

        def fetch(timeout):
            info, parts = None, []
            for msg in self._retrieval.GetArtifact(req, timeout=timeout, metadata=self._metadata):
                if msg.HasField("info"):
                    info = msg.info
                parts.append(msg.chunk)
            return info, b"".join(parts)

        info, data = self._call(fetch)
        if info is None or len(data) != info.bytes:
            raise errors.DataLossError("the artifact arrived incomplete")
        return info, data

    def list_artifacts(self, model_id: str):
        req = retrieval_pb2.ListArtifactsRequest(model_id=model_id)
        return list(self._call(lambda t: self._retrieval.ListArtifacts(
            req, timeout=t, metadata=self._metadata)).artifacts)
