"""kvrecall: Python client of the kvrecall KV-cache store (API kvrecall.v1).

See kvrecall.client for the client, kvrecall.hashing for the span-key
contract and kvrecall.errors for the typed exceptions.
"""

from kvrecall.errors import *  # noqa: F401,F403 (the typed exceptions)
from kvrecall.hashing import (SPAN_HASH_VERSION, chain_span_hashes, span_hash,  # noqa: F401
                              span_root_hash)

try:  # the client needs the stubs generated at build time (build/python/kvrecall/v1)
    from kvrecall.client import (Client, FetchedSpan, LookupResult, ModelGeometry,  # noqa: F401
                                 Span, bf16_to_float32, float32_to_bf16, miss_reason_name)
    from kvrecall.retrieval import (AttendResult, ContextInfo, SearchResult,  # noqa: F401
                                    merge_attention)
except ImportError as _e:  # pragma: no cover - hashing works without the stubs
    _IMPORT_ERROR = _e

    def __getattr__(name):
        raise ImportError(f"kvrecall.{name} needs the generated stubs in kvrecall/v1 "
                          f"(build the proto_python target): {_IMPORT_ERROR}")
