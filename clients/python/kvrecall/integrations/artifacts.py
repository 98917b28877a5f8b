"""Calibration artifacts of a model, fitted from its own keys on a calibration
text and stored in kvrecalld per model (PutArtifact), in the formats the
service reads:

- `loki_basis` (docs/formats/loki_basis.md): PCA bases of the post-RoPE keys
  per (layer, KV head); kvrecalld's `loki` index and the worker's local Loki
  selection (its `loki_components`) use them.
- `sparse_encoder` (docs/formats/sparse_encoder.md): top-kappa sparse
  encoders of the keys per (layer, KV head), for the `inverted` index.

    keys = {(layer, kv_head): float32 [n, d]}
    blob = serialize_loki_basis(fit_loki_bases(keys))
    client.put_artifact(model_id, "loki_basis", blob)
"""

import dataclasses
import struct

import numpy as np
from kvrecall._xxhash import xxhash

__all__ = ["PcaBasis", "SparseEncoder", "fit_pca_basis", "fit_loki_bases",
           "serialize_loki_basis", "parse_loki_basis", "train_sparse_encoder",
           "serialize_sparse_encoders", "loki_components"]


@dataclasses.dataclass
class PcaBasis:
    layer: int
    kv_head: int
    num_keys: int
    mean: np.ndarray        # [d] f32
    variance: np.ndarray    # [d] f64, descending
    components: np.ndarray  # [d, d] f32, row i = i-th principal axis


def fit_pca_basis(keys, layer=-1, kv_head=-1):
    """PCA of keys [n, d] (centred covariance in float64); each axis's sign
    makes its largest-magnitude component positive."""
    x = np.asarray(keys, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need keys [n >= 2, d], got {x.shape}")
    mean = x.mean(axis=0)
    c = x - mean
    cov = c.T @ c / (x.shape[0] - 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(-w, kind="stable")
    w = np.clip(w[order], 0, None)
    comps = v[:, order].T  # rows = axes
    for i in range(comps.shape[0]):
        j = int(np.argmax(np.abs(comps[i])))
        if comps[i, j] < 0:
            comps[i] = -comps[i]
    for i in range(1, len(w)):  # keep the stored variances non-increasing after clipping
        w[i] = min(w[i], w[i - 1])
    return PcaBasis(layer, kv_head, x.shape[0], mean.astype(np.float32), w,
                    comps.astype(np.float32))


def fit_loki_bases(keys_by_layer_head):
    """{(layer, kv_head): keys [n, d]} -> [PcaBasis] in (layer, kv_head) order."""
    return [fit_pca_basis(keys_by_layer_head[key], *key) for key in sorted(keys_by_layer_head)]


def _with_checksum(body: bytes) -> bytes:
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body, seed=0))


def serialize_loki_basis(bases):
    parts = [b"KVRLOKIB", struct.pack("<II", 1, len(bases))]
    for b in bases:
        d = b.components.shape[0]
        parts.append(struct.pack("<iiIQB", b.layer, b.kv_head, d, b.num_keys, 1))
        parts.append(np.asarray(b.mean, "<f4").tobytes())
        parts.append(np.asarray(b.variance, "<f8").tobytes())
        parts.append(np.ascontiguousarray(b.components, "<f4").tobytes())
    return _with_checksum(b"".join(parts))


def parse_loki_basis(blob):
    """The inverse of serialize_loki_basis (checks the magic and checksum)."""
    if blob[:8] != b"KVRLOKIB":
        raise ValueError("not a loki_basis artifact")
    if struct.unpack("<Q", blob[-8:])[0] != xxhash.xxh3_64_intdigest(blob[:-8], seed=0):
        raise ValueError("loki_basis checksum mismatch")
    version, count = struct.unpack_from("<II", blob, 8)
    if version != 1:
        raise ValueError(f"loki_basis version {version}")
    off = 16
    out = []
    for _ in range(count):
        layer, head, d, n, _centred = struct.unpack_from("<iiIQB", blob, off)
        off += struct.calcsize("<iiIQB")
        mean = np.frombuffer(blob, "<f4", d, off); off += 4 * d
        var = np.frombuffer(blob, "<f8", d, off); off += 8 * d
        comps = np.frombuffer(blob, "<f4", d * d, off).reshape(d, d); off += 4 * d * d
        out.append(PcaBasis(layer, head, n, mean.copy(), var.copy(), comps.copy()))
    return out


def loki_components(bases, num_layers, num_kv_heads):
    """The worker's loki_components: {layer: [num_kv_heads, d, d] f32}."""
    by = {(b.layer, b.kv_head): b.components for b in bases}
    out = {}
    for layer in range(num_layers):
        if all((layer, h) in by for h in range(num_kv_heads)):
            out[layer] = np.stack([by[(layer, h)] for h in range(num_kv_heads)]).astype(np.float32)
    return out


@dataclasses.dataclass
class SparseEncoder:
    layer: int
    kv_head: int
    k: int
    input_scale: float
    w_enc: np.ndarray  # [F, d]
    b_enc: np.ndarray  # [F]
    w_dec: np.ndarray  # [F, d], unit rows
    b_dec: np.ndarray  # [d], scaled units
    num_samples: int
    fvu: float


def train_sparse_encoder(data, layer=-1, kv_head=-1, num_features=0, k=8, epochs=10,
                         batch_size=256, learning_rate=1e-3, aux_coefficient=1.0 / 32, seed=1,
                         device="cpu"):
    """A top-k sparse autoencoder of data [n, d] (the S^3 encoder; the same
    recipe as the service's TrainSparseEncoder: inputs scaled to unit mean
    per-dimension variance, decoder rows renormalised after every Adam step,
    an auxiliary loss on features dead for an epoch), trained with torch on
    `device` (initialisation and shuffling drawn on the CPU from `seed`)."""
    import torch
    x = torch.as_tensor(np.asarray(data, dtype=np.float32)).to(device)
    n, d = x.shape
    f = num_features or 8 * d
    g = torch.Generator().manual_seed(seed)
    scale = float(1.0 / np.sqrt(max(x.var(dim=0).mean().item(), 1e-12)))
    xs = x * scale
    b_dec = xs.mean(dim=0).clone().requires_grad_(True)
    w_dec = torch.randn(f, d, generator=g).to(device)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).requires_grad_(True)
    w_enc = w_dec.detach().clone().requires_grad_(True)
    b_enc = torch.zeros(f, device=device, requires_grad=True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=learning_rate, betas=(0.9, 0.999))
    since_fired = torch.zeros(f, device=device)
    aux_k = 2 * k

    def encode(batch):
        pre = (batch - b_dec) @ w_enc.T + b_enc
        vals, ids = pre.topk(k, dim=1)
        return pre, vals.clamp(min=0), ids

    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            batch = xs[perm[s:s + batch_size]]
            pre, acts, ids = encode(batch)
            recon = torch.zeros(batch.shape[0], f, device=device).scatter(1, ids, acts) @ w_dec + b_dec
            loss = ((recon - batch) ** 2).mean()
            fired = torch.zeros(f, dtype=torch.bool, device=device)
            fired[ids[acts > 0]] = True
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + batch.shape[0])
            dead = since_fired >= n
            if aux_coefficient > 0 and bool(dead.any()):
                dead_pre = pre.masked_fill(~dead, float("-inf"))
                kk = min(aux_k, int(dead.sum()))
                dv, di = dead_pre.topk(kk, dim=1)
                aux = torch.zeros(batch.shape[0], f, device=device).scatter(
                    1, di, dv.clamp(min=0)) @ w_dec
                residual = (batch - recon).detach()
                loss = loss + aux_coefficient * ((aux - residual) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    with torch.no_grad():
        _, acts, ids = encode(xs)
        recon = torch.zeros(n, f, device=device).scatter(1, ids, acts) @ w_dec + b_dec
        fvu = float(((xs - recon) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum().clamp(min=1e-12))
        w_dec_n = w_dec / w_dec.norm(dim=1, keepdim=True)
    host = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return SparseEncoder(layer, kv_head, k, scale, host(w_enc), host(b_enc), host(w_dec_n),
                         host(b_dec), n, fvu)


def serialize_sparse_encoders(encoders):
    parts = [b"KVRSPENC", struct.pack("<II", 1, len(encoders))]
    for e in encoders:
        f, d = e.w_enc.shape
        parts.append(struct.pack("<iiIIIfQd", e.layer, e.kv_head, d, f, e.k, e.input_scale,
                                 e.num_samples, e.fvu))
        for a in (e.w_enc, e.b_enc, e.w_dec, e.b_dec):
            parts.append(np.ascontiguousarray(a, "<f4").tobytes())
    return _with_checksum(b"".join(parts))
