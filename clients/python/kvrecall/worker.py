"""kvrecall.worker: the decode worker (DecodeSession) from Python, through
the C ABI of libkvrecall_worker.so with ctypes, so it runs on any Python.

Tensors are torch tensors (CUDA tensors with backend="cuda", CPU tensors with
backend="cpu") or, on the CPU backend, numpy arrays (bf16 as uint16 bit
patterns). Queries and outputs are float32; keys and values are the model's
KV dtype (bf16 or f16).

    from kvrecall.worker import Session
    s = Session(num_layers=8, num_q_heads=4, num_kv_heads=2, head_dim=128,
                policy=policy_json, capacity_tokens=8192, backend="cuda")
    s.start_prefix([len(prompt)])
    for layer in range(8):
        s.load_prefix_layer(layer, k[layer], v[layer])     # [B, Hkv, T, d]
    out = s.attend_layer(layer, q, k_new, v_new)           # one decode step, layer by layer

The library is found through $KVRECALL_WORKER_LIB, next to the package in a
build tree (<build>/lib/libkvrecall_worker.so), or on the loader's path.
"""

import ctypes
import json
import os
import pathlib

__all__ = ["Session", "WorkerError", "load_library", "validate_policy"]

DTYPES = {"f16": 1, "bf16": 2}
MODES = {"gpu_resident": 0, "offloaded": 1}
REUSE = {"positions": 0, "fetch": 1}


class WorkerError(RuntimeError):
    """A failed worker call: `code` is the canonical status code."""

    def __init__(self, code, message):
        super().__init__(f"{_CODE_NAMES.get(code, code)}: {message}")
        self.code = code
        self.message = message


_CODE_NAMES = {3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 8: "RESOURCE_EXHAUSTED",
               9: "FAILED_PRECONDITION", 13: "INTERNAL", 14: "UNAVAILABLE"}


class _Options(ctypes.Structure):
    _fields_ = [
        ("num_layers", ctypes.c_int32), ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("kv_dtype", ctypes.c_int32), ("batch_size", ctypes.c_int32),
        ("capacity_tokens", ctypes.c_int64), ("page_size", ctypes.c_int32),
        ("mode", ctypes.c_int32), ("graph_safe", ctypes.c_int32),
        ("kv_pool_count", ctypes.c_int32), ("policy_json", ctypes.c_char_p),
        ("backend", ctypes.c_char_p),
        ("loki_components", ctypes.POINTER(ctypes.POINTER(ctypes.c_float))),
        ("target", ctypes.c_char_p), ("bearer_token", ctypes.c_char_p),
        ("model_id", ctypes.c_char_p), ("reuse_transfer", ctypes.c_int32),
        ("append_chunk", ctypes.c_int32), ("deadline_ms", ctypes.c_int64),
    ]


_STAT_FIELDS = ["steps", "remote_calls", "rpc_wait_us", "server_us", "server_search_us",
                "server_attend_us", "query_download_us", "state_upload_us", "append_us",
                "gather_wait_us", "bytes_sent", "bytes_received"]


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in _STAT_FIELDS]


_LIB = None


def load_library(path=None):
    """Loads libkvrecall_worker.so once and declares its functions."""
    global _LIB
    if _LIB is not None and path is None:
        return _LIB
    candidates = [path, os.environ.get("KVRECALL_WORKER_LIB")]
    here = pathlib.Path(__file__).resolve().parent
    candidates += [str(here.parent.parent / "lib" / "libkvrecall_worker.so"),
                   str(here / "libkvrecall_worker.so"), "libkvrecall_worker.so"]
    errors = []
    for c in candidates:
        if not c:
            continue
        try:
            lib = ctypes.CDLL(c)
            break
        except OSError as e:
            errors.append(f"{c}: {e}")
    else:
        raise OSError("libkvrecall_worker.so not found (set KVRECALL_WORKER_LIB): " + "; ".join(errors))
    i32, i64, vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    sig = {
        "kvr_last_error": (ctypes.c_char_p, []),
        "kvr_api_version": (i32, []),
        "kvr_session_create": (i32, [ctypes.POINTER(_Options), ctypes.POINTER(vp)]),
        "kvr_session_destroy": (None, [vp]),
        "kvr_session_start_prefix": (i32, [vp, ctypes.POINTER(i64), ctypes.c_char_p, ctypes.POINTER(i32)]),
        "kvr_session_load_prefix_layer": (i32, [vp, i32, vp, vp, i64, i64, i64, i64, vp]),
        "kvr_session_attend_layer": (i32, [vp, i32, vp, vp, vp, vp, vp]),
        "kvr_session_seq_len": (i32, [vp, i32, ctypes.POINTER(i64)]),
        "kvr_session_selection": (i32, [vp, i32, i32, i32, ctypes.POINTER(i64), i64,
                                        ctypes.POINTER(i64), vp]),
        "kvr_session_stats_get": (i32, [vp, ctypes.POINTER(_Stats)]),
        "kvr_session_stats_reset": (i32, [vp]),
        "kvr_policy_validate": (i32, [ctypes.c_char_p, ctypes.c_char_p, i64]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    if lib.kvr_api_version() != 1:
        raise OSError(f"libkvrecall_worker.so speaks C API {lib.kvr_api_version()}, this module 1")
    if path is None:
        _LIB = lib
    return lib


def _check(lib, code):
    if code != 0:
        raise WorkerError(code, lib.kvr_last_error().decode("utf-8", "replace"))


def _policy_text(policy):
    if isinstance(policy, (bytes, str)):
        return policy.encode() if isinstance(policy, str) else policy
    return json.dumps(policy).encode()


def validate_policy(policy):
    """Validates a policy (JSON text or dict); returns its one-line summary."""
    lib = load_library()
    buf = ctypes.create_string_buffer(4096)
    _check(lib, lib.kvr_policy_validate(_policy_text(policy), buf, len(buf)))
    return buf.value.decode()


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _ptr(x, what, contiguous=True):
    if x is None:
        raise ValueError(f"{what} is required")
    if _is_torch(x):
        if contiguous and not x.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
        return x.data_ptr()
    import numpy as np
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a torch tensor or a numpy array")
    if contiguous and not x.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{what} must be C-contiguous")
    return x.ctypes.data


def _strides(x):
    if _is_torch(x):
        return list(x.stride())
    return [s // x.itemsize for s in x.strides]


class Session:
    """A DecodeSession (docs/worker.md). Not thread-safe."""

    def __init__(self, *, num_layers, num_q_heads, num_kv_heads, head_dim, policy,
                 capacity_tokens, kv_dtype="bf16", batch_size=1, page_size=16,
                 mode="gpu_resident", backend="cpu", graph_safe=False, kv_pool_count=0,
                 loki_components=None, target=None, model_id=None, bearer_token=None,
                 reuse_transfer="positions", append_chunk=0, deadline_ms=0):
        self._lib = load_library()
        self._handle = None
        self.batch_size = batch_size
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.backend = backend
        if kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(DTYPES)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        if reuse_transfer not in REUSE:
            raise ValueError(f"reuse_transfer must be one of {sorted(REUSE)}")
        self._keep = []  # buffers the C call reads
        loki = None
        if loki_components:
            import numpy as np
            arr_t = ctypes.POINTER(ctypes.c_float) * num_layers
            loki = arr_t()
            for layer, comp in loki_components.items():
                a = np.ascontiguousarray(np.asarray(comp, dtype=np.float32))
                self._keep.append(a)
                loki[layer] = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        opts = _Options(
            num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, kv_dtype=DTYPES[kv_dtype], batch_size=batch_size,
            capacity_tokens=capacity_tokens, page_size=page_size, mode=MODES[mode],
            graph_safe=int(bool(graph_safe)), kv_pool_count=kv_pool_count,
            policy_json=_policy_text(policy), backend=backend.encode(),
            loki_components=ctypes.cast(loki, ctypes.POINTER(ctypes.POINTER(ctypes.c_float))) if loki else None,
            target=target.encode() if target else None,
            bearer_token=bearer_token.encode() if bearer_token else None,
            model_id=model_id.encode() if model_id else None,
            reuse_transfer=REUSE[reuse_transfer], append_chunk=append_chunk,
            deadline_ms=deadline_ms)
        handle = ctypes.c_void_p()
        _check(self._lib, self._lib.kvr_session_create(ctypes.byref(opts), ctypes.byref(handle)))
        self._handle = handle
        self._keep.clear()

    def close(self):
        if self._handle is not None:
            self._lib.kvr_session_destroy(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _stream(self, stream):
        if stream is not None:
            return stream
        if self.backend == "cuda":
            import torch
            return torch.cuda.current_stream().cuda_stream
        return None

    def start_prefix(self, prefix_tokens, chains=None):
        """prefix_tokens: one length per sequence; chains (offloaded): per
        sequence, the span hashes (16-byte bytes) of its stored prompt."""
        n = len(prefix_tokens)
        lens = (ctypes.c_int64 * n)(*prefix_tokens)
        hashes, counts = None, None
        if chains is not None:
            blob = b"".join(bytes(h) for chain in chains for h in chain)
            hashes = blob
            counts = (ctypes.c_int32 * len(chains))(*[len(c) for c in chains])
        _check(self._lib, self._lib.kvr_session_start_prefix(self._handle, lens, hashes, counts))

    def load_prefix_layer(self, layer, k, v, stream=None):
        """k, v: [batch, num_kv_heads, T, head_dim] (any strides, unit inner stride)."""
        sk, sv = _strides(k), _strides(v)
        if sk != sv or len(sk) != 4 or sk[3] != 1 or tuple(k.shape) != tuple(v.shape):
            raise ValueError("k and v must be [batch, kv_heads, tokens, head_dim] with equal "
                             "strides and a unit last stride")
        _check(self._lib, self._lib.kvr_session_load_prefix_layer(
            self._handle, layer, _ptr(k, "k", False), _ptr(v, "v", False), int(k.shape[2]),
            sk[0], sk[1], sk[2], self._stream(stream)))

    def attend_layer(self, layer, q, k_new, v_new, out=None, stream=None):
        """One layer of a decode step; returns out [batch, num_q_heads, head_dim] f32."""
        if out is None:
            if _is_torch(q):
                import torch
                out = torch.empty_like(q, dtype=torch.float32)
            else:
                import numpy as np
                out = np.empty(q.shape, dtype=np.float32)
        _check(self._lib, self._lib.kvr_session_attend_layer(
            self._handle, layer, _ptr(q, "q"), _ptr(k_new, "k_new"), _ptr(v_new, "v_new"),
            _ptr(out, "out"), self._stream(stream)))
        return out

    def seq_len(self, b=0):
        n = ctypes.c_int64()
        _check(self._lib, self._lib.kvr_session_seq_len(self._handle, b, ctypes.byref(n)))
        return n.value

    def selection(self, layer, b=0, head=0, stream=None):
        """Positions `layer` selected at the last step (sinks and window excluded)."""
        count = ctypes.c_int64()
        _check(self._lib, self._lib.kvr_session_selection(self._handle, layer, b, head, None, 0,
                                                          ctypes.byref(count), self._stream(stream)))
        buf = (ctypes.c_int64 * max(1, count.value))()
        _check(self._lib, self._lib.kvr_session_selection(self._handle, layer, b, head, buf,
                                                          count.value, ctypes.byref(count),
                                                          self._stream(stream)))
        return list(buf[:count.value])

    def stats(self):
        st = _Stats()
        _check(self._lib, self._lib.kvr_session_stats_get(self._handle, ctypes.byref(st)))
        return {name: getattr(st, name) for name in _STAT_FIELDS}

    def reset_stats(self):
        _check(self._lib, self._lib.kvr_session_stats_reset(self._handle))
