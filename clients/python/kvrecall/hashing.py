"""The chained span hash of kvrecall (docs/hashing.md, contract version 1).

The same prefix under the same model id and salt gives the same 16-byte keys
here, in the C++ client (common/span_hash.h) and on every node; both pass
tests/vectors/span_hash_vectors.tsv.

    root     = XXH3-128(seed, b"kvrecall.span.v1\\0" + u32le(len(model)) + model
                              + u32le(len(salt)) + salt)
    h_i      = XXH3-128(seed, h_{i-1} + u32le(n_i) + u32le(t_0) + ... + u32le(t_{n_i - 1}))

Hashes are the 16 canonical (big-endian) bytes; ``.hex()`` gives the 32-digit
form the CLI and the logs print.
"""

import struct
from typing import Iterable, List, Sequence

from kvrecall._xxhash import xxhash

#: The version of the key contract these functions implement.
SPAN_HASH_VERSION = "kvrecall.span.v1"
#: "kvrecall" in ASCII read as a big-endian 64-bit integer.
SEED = 0x6B76726563616C6C


def _u32(values: Iterable[int]) -> bytes:
    values = list(values)
    for v in values:
        if not 0 <= int(v) <= 0xFFFFFFFF:
            raise ValueError(f"token id {v} is not an unsigned 32-bit integer")
    return struct.pack(f"<{len(values)}I", *values)


def span_root_hash(model_id: str, salt: str = "") -> bytes:
    """The parent hash of a model's first span (16 bytes)."""
    m, s = model_id.encode("utf-8"), salt.encode("utf-8")
    data = b"kvrecall.span.v1\x00" + struct.pack("<I", len(m)) + m + struct.pack("<I", len(s)) + s
    return xxhash.xxh3_128(data, seed=SEED).digest()


def span_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a span holding ``token_ids`` whose parent hashes to ``parent``."""
    if len(parent) != 16:
        raise ValueError(f"a parent hash is 16 bytes, got {len(parent)}")
    data = bytes(parent) + struct.pack("<I", len(token_ids)) + _u32(token_ids)
    return xxhash.xxh3_128(data, seed=SEED).digest()


def chain_span_hashes(model_id: str, salt: str, token_ids: Sequence[int], block_tokens: int,
                      include_partial_tail: bool = False) -> List[bytes]:
    """Hashes of consecutive spans of ``block_tokens`` tokens over ``token_ids``.

    A final partial block is hashed only when ``include_partial_tail``.
    """
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    token_ids = [int(t) for t in token_ids]
    parent = span_root_hash(model_id, salt)
    out = []
    for begin in range(0, len(token_ids), block_tokens):
        block = token_ids[begin:begin + block_tokens]
        if len(block) < block_tokens and not include_partial_tail:
            break
        parent = span_hash(parent, block)
        out.append(parent)
    return out
