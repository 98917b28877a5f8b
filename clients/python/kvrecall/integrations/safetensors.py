"""Reads Hugging Face safetensors checkpoints without the safetensors package.

A `.safetensors` file is an 8-byte little-endian header length n, n bytes of
JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets from the end of the header), then the raw little-endian data.
bf16 values are the top 16 bits of a float32. A sharded checkpoint has a
`model.safetensors.index.json` whose "weight_map" names each tensor's shard.

    weights = load_checkpoint("path/to/model")       # name -> float32 torch tensor
"""

import json
import mmap
import os
import pathlib
import struct

import numpy as np

__all__ = ["read_safetensors", "load_checkpoint", "checkpoint_files"]

_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4",
          "U8": "u1", "I8": "i1", "BOOL": "?"}


def _header(f):
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("not a safetensors file: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 << 20:
        raise ValueError(f"not a safetensors file: header length {n}")
    return n, json.loads(f.read(n))


def read_safetensors(path, names=None, as_float32=True):
    """Returns {name: numpy array} for the tensors of one file (all, or
    `names`). With as_float32, BF16/F16/F32 tensors come back as float32."""
    path = str(path)
    out = {}
    with open(path, "rb") as f:
        n, header = _header(f)
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in header.items():
                if name == "__metadata__" or (names is not None and name not in names):
                    continue
                dtype = info["dtype"]
                if dtype not in _NUMPY:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
                begin, end = info["data_offsets"]
                shape = tuple(info["shape"])
                np_dtype = np.dtype(_NUMPY[dtype])
                count = int(np.prod(shape)) if shape else 1
                if end - begin != count * np_dtype.itemsize or 8 + n + end > size:
                    raise ValueError(f"{path}: tensor {name} has inconsistent offsets")
                a = np.frombuffer(mm, dtype=np_dtype, count=count, offset=8 + n + begin).reshape(shape)
                if dtype == "BF16" and as_float32:
                    a = (a.astype(np.uint32) << 16).view(np.float32)
                elif dtype in ("F16", "F64") and as_float32:
                    a = a.astype(np.float32)
                else:
                    a = a.copy()
                out[name] = a
    return out


def checkpoint_files(model_dir):
    """The safetensors files of a checkpoint directory, in shard order."""
    d = pathlib.Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors files")
    return files


def load_checkpoint(model_dir, device="cpu"):
    """{name: float32 torch tensor on `device`} for every tensor of a checkpoint."""
    import torch
    weights = {}
    for path in checkpoint_files(model_dir):
        for name, a in read_safetensors(path).items():
            weights[name] = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return weights
