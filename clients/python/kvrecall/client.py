"""Python client of kvrecalld: numpy arrays in and out.

    import kvrecall
    c = kvrecall.Client("127.0.0.1:7878")
    c.register_model("m", num_layers=8, num_q_heads=4, num_kv_heads=2, head_dim=128,
                     dtype="f16", block_tokens=256)
    hit = c.lookup_tokens("m", token_ids)            # prefix already stored?
    hashes = c.put_sequence("m", token_ids, kv)      # kv: [layers, 2, kv_heads, tokens, head_dim]
    kv_back = c.get_sequence("m", hashes)            # the same array
    layer3 = c.get_sequence("m", hashes, layers=(3, 4))

Arrays use the span layout ``[layer][K|V][kv_head][token][head_dim]``
(docs/api.md). dtype f16 is ``numpy.float16``, f32 ``numpy.float32``; numpy
has no bfloat16, so bf16 payloads come back as ``numpy.uint16`` bit patterns
(``bf16_to_float32`` converts) and bf16 arrays are sent from uint16 (or from
float32, rounded to nearest even).

Every call has a deadline and is retried with exponential backoff and jitter
while the daemon is UNAVAILABLE; errors raise the typed exceptions of
``kvrecall.errors``.
"""

import dataclasses
import random
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import grpc
import numpy as np
from kvrecall._xxhash import xxhash

from kvrecall import errors, hashing
from kvrecall.retrieval import RetrievalMixin
from kvrecall.v1 import (admin_pb2, admin_pb2_grpc, common_pb2, kv_store_pb2, kv_store_pb2_grpc,
                         retrieval_pb2_grpc)

_DTYPES = {"f16": common_pb2.DTYPE_F16, "bf16": common_pb2.DTYPE_BF16, "f32": common_pb2.DTYPE_F32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_NUMPY = {common_pb2.DTYPE_F16: np.dtype("<f2"), common_pb2.DTYPE_BF16: np.dtype("<u2"),
          common_pb2.DTYPE_F32: np.dtype("<f4")}
_ITEM_BYTES = {common_pb2.DTYPE_F16: 2, common_pb2.DTYPE_BF16: 2, common_pb2.DTYPE_F32: 4}


def miss_reason_name(reason: int) -> str:
    """'never_stored', 'evicted', ... for a MissReason value."""
    name = common_pb2.MissReason.Name(reason)
    return name[len("MISS_REASON_"):].lower() if reason else "none"


def tier_name(tier: int) -> str:
    """'memory', 'disk', 'rocksdb' ('' when unspecified)."""
    return common_pb2.Tier.Name(tier)[len("TIER_"):].lower() if tier else ""


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


@dataclasses.dataclass
class ModelGeometry:
    """A registered model (kvrecall.v1.ModelGeometry)."""
    model_id: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "f16", "bf16" or "f32"
    keys_post_rope: bool = True
    block_tokens: int = 256

    def span_payload_bytes(self, num_tokens: int) -> int:
        return (self.num_layers * 2 * self.num_kv_heads * num_tokens * self.head_dim
                * _ITEM_BYTES[_DTYPES[self.dtype]])

    @classmethod
    def from_proto(cls, p) -> "ModelGeometry":
        return cls(p.model_id, p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim,
                   _DTYPE_NAMES.get(p.dtype, "unspecified"), p.keys_post_rope, p.block_tokens)


@dataclasses.dataclass
class Span:
    """One span to store. ``payload`` is an array in the span layout
    [layers, 2, kv_heads, num_tokens, head_dim] (or its raw bytes)."""
    hash: bytes
    parent: bytes
    num_tokens: int
    payload: object
    token_ids: Optional[Sequence[int]] = None
    durable: bool = False


@dataclasses.dataclass
class FetchedSpan:
    """One span returned by get_spans: found, or missing with a reason."""
    index: int
    hash: bytes
    found: bool
    miss_reason: str  # "none" when found
    tier: str = ""
    parent: bytes = b""
    num_tokens: int = 0
    token_ids: List[int] = dataclasses.field(default_factory=list)
    layers: Tuple[int, int] = (0, 0)
    array: Optional[np.ndarray] = None  # [layers, 2, kv_heads, num_tokens, head_dim]


@dataclasses.dataclass
class LookupResult:
    """The longest stored prefix of a chain and why the rest is missing."""
    prefix_spans: int
    prefix_tokens: int
    missing: List[Tuple[int, bytes, str]]  # (index, hash, reason)
    hashes: List[bytes]  # lookup_tokens: the chain the server computed


class Client(RetrievalMixin):
    """A connection to kvrecalld (KvStore, Admin and Retrieval). Thread-safe
    (one gRPC channel)."""

    def __init__(self, target: str = "127.0.0.1:7878", token: Optional[str] = None,
                 deadline_s: float = 30.0, max_attempts: int = 4,
                 initial_backoff_s: float = 0.05, max_backoff_s: float = 2.0,
                 backoff_multiplier: float = 2.0, jitter: float = 0.2,
                 chunk_bytes: int = 1 << 20, max_message_bytes: int = 16 << 20,
                 tls: bool = False, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 tls_server_name: Optional[str] = None, channel_options: Sequence = ()):
        if deadline_s <= 0 or max_attempts < 1 or not 0 <= jitter < 1:
            raise ValueError("need deadline_s > 0, max_attempts >= 1, 0 <= jitter < 1")
        if not 4096 <= chunk_bytes <= max_message_bytes - (64 << 10):
            raise ValueError("chunk_bytes must be in 4 KiB..max_message_bytes - 64 KiB")
        channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
            *channel_options,  # e.g. kvrecall.cluster's reconnect backoff
        ]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls or tls_ca or tls_cert:
            # TLS (docs/security.md): tls_ca is the PEM file of the CA that
            # signed the daemon's certificate (None: the system's roots);
            # tls_cert/tls_key are this client's, for daemons that require one.
            def read(path):
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca), private_key=read(tls_key),
                certificate_chain=read(tls_cert))
            if tls_server_name:
                channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._kv = kv_store_pb2_grpc.KvStoreStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._retrieval = retrieval_pb2_grpc.RetrievalStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.backoff_multiplier = backoff_multiplier
        self.jitter = jitter
        self.chunk_bytes = chunk_bytes
        self._models = {}

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- plumbing ---

    def _call(self, fn: Callable[[float], object]):
        """Runs fn(timeout_s) with retries of UNAVAILABLE inside one deadline."""
        deadline = time.monotonic() + self.deadline_s
        backoff = self.initial_backoff_s
        attempt = 1
        while True:
            try:
                return fn(max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_attempts:
                    raise errors.from_rpc_error(e) from None
                wait = min(backoff, self.max_backoff_s) * random.uniform(1 - self.jitter,
                                                                         1 + self.jitter)
                if time.monotonic() + wait >= deadline:
                    raise errors.from_rpc_error(e) from None
                time.sleep(wait)
                backoff *= self.backoff_multiplier
                attempt += 1

    def _model(self, model_id: str) -> ModelGeometry:
        if model_id not in self._models:
            for m in self.list_models():
                self._models[m.model_id] = m
        if model_id not in self._models:
            raise errors.NotFoundError(f"model {model_id} is not registered")
        return self._models[model_id]

    # --- models ---

    def register_model(self, model_id: str, num_layers: int, num_q_heads: int,
                       num_kv_heads: int, head_dim: int, dtype: str = "bf16",
                       keys_post_rope: bool = True, block_tokens: int = 256) -> ModelGeometry:
        """Registers a geometry (idempotent); AlreadyExistsError for another one."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        req = kv_store_pb2.RegisterModelRequest(model=kv_store_pb2.ModelGeometry(
            model_id=model_id, num_layers=num_layers, num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=_DTYPES[dtype],
            keys_post_rope=keys_post_rope, block_tokens=block_tokens))
        resp = self._call(lambda t: self._kv.RegisterModel(req, timeout=t,
                                                           metadata=self._metadata))
        model = ModelGeometry.from_proto(resp.model)
        self._models[model_id] = model
        return model

    def list_models(self) -> List[ModelGeometry]:
        resp = self._call(lambda t: self._kv.ListModels(kv_store_pb2.ListModelsRequest(),
                                                        timeout=t, metadata=self._metadata))
        return [ModelGeometry.from_proto(m) for m in resp.models]

    # --- spans ---

    def _payload_bytes(self, model: ModelGeometry, span: Span) -> bytes:
        if isinstance(span.payload, (bytes, bytearray, memoryview)):
            return bytes(span.payload)
        a = np.asarray(span.payload)
        want = (model.num_layers, 2, model.num_kv_heads, span.num_tokens, model.head_dim)
        if a.shape != want:
            raise errors.InvalidArgumentError(
                f"span payload has shape {a.shape}, {model.model_id} needs {want}")
        if model.dtype == "bf16":
            a = float32_to_bf16(a) if a.dtype.kind == "f" else a.astype("<u2", copy=False)
        else:
            a = a.astype(_NUMPY[_DTYPES[model.dtype]], copy=False)
        return np.ascontiguousarray(a).tobytes()

    def put_spans(self, model_id: str, spans: Sequence[Span], salt: str = "",
                  progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
        """Stores spans (in chain order) in one stream; returns one dict per span
        with ``hash``, ``already_present`` and ``durable_tier``."""
        model = self._model(model_id)
        payloads = [self._payload_bytes(model, s) for s in spans]
        total = sum(len(p) for p in payloads)
        chunk = self.chunk_bytes

        def messages():
            sent = 0
            for s, payload in zip(spans, payloads):
                header = kv_store_pb2.PutSpanHeader(
                    model_id=model_id, hash=bytes(s.hash), parent_hash=bytes(s.parent),
                    num_tokens=s.num_tokens, token_ids=list(s.token_ids or []),
                    payload_bytes=len(payload),
                    payload_checksum=xxhash.xxh3_64_intdigest(payload), durable=s.durable,
                    salt=salt)
                view = memoryview(payload)
                offset = 0
                first = True
                while first or offset < len(payload):
                    piece = bytes(view[offset:offset + chunk])
                    offset += len(piece)
                    sent += len(piece)
                    if first:
                        yield kv_store_pb2.PutSpansRequest(header=header, payload_chunk=piece)
                        first = False
                    else:
                        yield kv_store_pb2.PutSpansRequest(payload_chunk=piece)
                    if progress is not None:
                        progress(sent, total)

        resp = self._call(lambda t: self._kv.PutSpans(messages(), timeout=t,
                                                      metadata=self._metadata))
        return [{"hash": r.hash, "already_present": r.already_present,
                 "durable_tier": tier_name(r.durable_tier)} for r in resp.results]

    def put_sequence(self, model_id: str, token_ids: Sequence[int], kv: np.ndarray,
                     salt: str = "", durable: bool = False, include_partial_tail: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None) -> List[bytes]:
        """Cuts a sequence's K/V ``[layers, 2, kv_heads, tokens, head_dim]`` into
        spans of block_tokens, hashes them from ``token_ids`` and stores them.
        Returns the span hashes."""
        model = self._model(model_id)
        kv = np.asarray(kv)
        n = len(token_ids)
        want = (model.num_layers, 2, model.num_kv_heads, n, model.head_dim)
        if kv.shape != want:
            raise errors.InvalidArgumentError(f"kv has shape {kv.shape}, expected {want}")
        hashes = hashing.chain_span_hashes(model_id, salt, token_ids, model.block_tokens,
                                           include_partial_tail)
        spans = []
        parent = hashing.span_root_hash(model_id, salt)
        for i, h in enumerate(hashes):
            t0 = i * model.block_tokens
            t1 = min(n, t0 + model.block_tokens)
            spans.append(Span(hash=h, parent=parent, num_tokens=t1 - t0,
                              payload=kv[:, :, :, t0:t1, :], token_ids=list(token_ids[t0:t1]),
                              durable=durable))
            parent = h
        self.put_spans(model_id, spans, salt=salt, progress=progress)
        return hashes

    def get_spans(self, model_id: str, hashes: Sequence[bytes],
                  layers: Optional[Tuple[int, int]] = None,
                  progress: Optional[Callable[[int], None]] = None) -> List[FetchedSpan]:
        """Fetches spans in request order; a missing span has ``found=False``
        and its ``miss_reason``. ``layers=(begin, end)`` fetches a layer range."""
        req = kv_store_pb2.GetSpansRequest(model_id=model_id, hashes=[bytes(h) for h in hashes])
        if layers is not None:
            req.layers.begin, req.layers.end = int(layers[0]), int(layers[1])

        def fetch(timeout):
            out = []
            parts = []
            header = None
            received = 0

            def finish():
                if header is None:
                    return
                payload = b"".join(parts)
                if header.found and len(payload) != header.payload_bytes:
                    raise errors.InternalError("a span's payload ended early")
                if header.found and xxhash.xxh3_64_intdigest(payload) != header.payload_checksum:
                    raise errors.DataLossError(
                        f"span {header.hash.hex()}: payload checksum mismatch in transit")
                span = FetchedSpan(index=header.index, hash=header.hash, found=header.found,
                                   miss_reason=miss_reason_name(header.miss_reason),
                                   tier=tier_name(header.tier))
                if header.found:
                    span.parent = header.parent_hash
                    span.num_tokens = header.num_tokens
                    span.token_ids = list(header.token_ids)
                    span.layers = (header.layers.begin, header.layers.end)
                    span.array = np.frombuffer(payload, dtype=_NUMPY[header.dtype]).reshape(
                        tuple(header.shape))
                out.append(span)

            for msg in self._kv.GetSpans(req, timeout=timeout, metadata=self._metadata):
                if msg.HasField("header"):
                    finish()
                    header = msg.header
                    parts = []
                if msg.payload_chunk:
                    parts.append(msg.payload_chunk)
                    received += len(msg.payload_chunk)
                    if progress is not None:
                        progress(received)
            finish()
            return out

        return self._call(fetch)

    def get_sequence(self, model_id: str, hashes: Sequence[bytes],
                     layers: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """get_spans, concatenated along the token axis into
        ``[layers, 2, kv_heads, tokens, head_dim]``. NotFoundError when a span
        is missing (the message says why)."""
        spans = self.get_spans(model_id, hashes, layers)
        for s in spans:
            if not s.found:
                raise errors.NotFoundError(f"span {s.index} ({s.hash.hex()}) is missing: "
                                           f"{s.miss_reason}")
        return np.concatenate([s.array for s in spans], axis=3)

    def _lookup(self, req) -> LookupResult:
        resp = self._call(lambda t: self._kv.Lookup(req, timeout=t, metadata=self._metadata))
        return LookupResult(resp.prefix_spans, resp.prefix_tokens,
                            [(m.index, m.hash, miss_reason_name(m.reason)) for m in resp.missing],
                            list(resp.hashes))

    def lookup(self, model_id: str, hashes: Sequence[bytes]) -> LookupResult:
        """How many leading spans of the chain are stored, and why the rest is not."""
        return self._lookup(kv_store_pb2.LookupRequest(model_id=model_id,
                                                       hashes=[bytes(h) for h in hashes]))

    def lookup_tokens(self, model_id: str, token_ids: Sequence[int], salt: str = "",
                      include_partial_tail: bool = False) -> LookupResult:
        """lookup() with the chain hashed by the server from token ids (its
        hashes are returned, to compare with this client's)."""
        return self._lookup(kv_store_pb2.LookupRequest(
            model_id=model_id, tokens=kv_store_pb2.TokenChain(
                token_ids=[int(t) for t in token_ids], salt=salt,
                include_partial_tail=include_partial_tail)))

    @staticmethod
    def _items(resp) -> List[Tuple[bytes, str, str]]:
        return [(r.hash, _CODE_NAMES.get(r.code, str(r.code)), r.message) for r in resp.results]

    def delete_spans(self, hashes: Sequence[bytes]) -> List[Tuple[bytes, str, str]]:
        """Deletes spans; returns (hash, code name, message) per span."""
        req = kv_store_pb2.DeleteSpansRequest(hashes=[bytes(h) for h in hashes])
        return self._items(self._call(lambda t: self._kv.DeleteSpans(
            req, timeout=t, metadata=self._metadata)))

    def pin_spans(self, hashes: Sequence[bytes], ttl_s: float = 0) -> List[Tuple[bytes, str, str]]:
        """Pins spans in memory for ttl_s seconds (0: until unpinned)."""
        req = kv_store_pb2.PinSpansRequest(hashes=[bytes(h) for h in hashes],
                                           ttl_ms=int(round(ttl_s * 1000)))
        return self._items(self._call(lambda t: self._kv.PinSpans(
            req, timeout=t, metadata=self._metadata)))

    def unpin_spans(self, hashes: Sequence[bytes]) -> List[Tuple[bytes, str, str]]:
        req = kv_store_pb2.UnpinSpansRequest(hashes=[bytes(h) for h in hashes])
        return self._items(self._call(lambda t: self._kv.UnpinSpans(
            req, timeout=t, metadata=self._metadata)))

    # --- admin ---

    def stats(self):
        """kvrecall.v1.StatsResponse (per tier, per RPC, misses by reason)."""
        return self._call(lambda t: self._admin.Stats(admin_pb2.StatsRequest(), timeout=t,
                                                      metadata=self._metadata))

    def get_config(self):
        """kvrecall.v1.GetConfigResponse (effective options, versions)."""
        return self._call(lambda t: self._admin.GetConfig(admin_pb2.GetConfigRequest(), timeout=t,
                                                          metadata=self._metadata))

    def check_compatibility(self):
        """FailedPreconditionError when the daemon's key contract differs from
        this client's (the hashes would never match)."""
        config = self.get_config()
        if config.span_hash_version != hashing.SPAN_HASH_VERSION:
            raise errors.FailedPreconditionError(
                f"daemon uses span hash {config.span_hash_version}, this client "
                f"{hashing.SPAN_HASH_VERSION}")


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
