"""A plain PyTorch runner for Llama-architecture Hugging Face checkpoints
(config.json + safetensors shards, read directly) whose decode attention runs
through kvrecall.

    from kvrecall.integrations.llama import LlamaRunner
    runner = LlamaRunner("models/kvr-tiny-llama", target="127.0.0.1:7878")
    out = runner.generate(b"And it came to pass", 64, policy="tidal")
    print(bytes(out[0]).decode("utf-8", "replace"))

What it does (docs/e2e.md):
- prefill: full causal attention in torch over the prompt; the prompt's K/V
  (post-RoPE keys, rounded to the KV dtype, bf16) are stored in kvrecalld as
  spans under the published hash contract (`put_spans`), and a prompt whose
  leading blocks are already stored loads their K/V (`lookup_tokens`,
  `get_spans`) and prefills only the rest (prefix reuse);
- decode: every layer's attention is one `kvrecall.worker.Session`
  `attend_layer` call under a layer policy (full, TidalDecode, local or
  remote selection, ...), GPU-resident or offloaded (the prompt's K/V stay in
  kvrecalld; the session keeps sinks, window and new tokens);
- teacher forcing (`decode_steps` with the true next tokens) for the
  fidelity harness, and free-running greedy `generate`.

Computation is float32 (bf16 weights upcast); K/V are rounded to bf16 where
they are made, so the runner's own attention, the worker and kvrecalld all
see the same K/V. Runs on torch 1.13 (CPU) and torch 2.x (CUDA).
"""

import dataclasses
import json
import math
import pathlib
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from kvrecall.integrations import policies as _policies
from kvrecall.integrations.safetensors import load_checkpoint

__all__ = ["LlamaConfig", "LlamaModel", "Prompt", "WorkerDecoder", "LocalDecoder",
           "LlamaRunner", "causal_attention", "bits_per_byte"]

_KV_TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @classmethod
    def from_dir(cls, model_dir):
        c = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        if c.get("rope_scaling"):
            raise ValueError(f"{model_dir}: rope_scaling {c['rope_scaling']} is not supported")
        heads = c["num_attention_heads"]
        return cls(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                   num_layers=c["num_hidden_layers"], num_q_heads=heads,
                   num_kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   intermediate_size=c["intermediate_size"],
                   rope_theta=float(c.get("rope_theta", 10000.0)),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))


def causal_attention(q, k, v, q_start=0, chunk=1024):
    """Causal grouped-query attention in float32.

    q: [B, T, Hq, d] (positions q_start .. q_start + T - 1); k, v: [B, S, Hkv, d]
    (positions 0 .. S - 1, S >= q_start + T). Returns [B, T, Hq, d] float32;
    query t sees keys 0 .. q_start + t."""
    bsz, t_len, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(bsz, t_len, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        # Query rows grouped by their KV head: [Hkv, group, T, d].
        qh = q[b].float().view(t_len, hkv, group, d).permute(1, 2, 0, 3)
        kh = k[b].float().permute(1, 0, 2)  # [Hkv, S, d]
        vh = v[b].float().permute(1, 0, 2)
        for c0 in range(0, t_len, chunk):
            c1 = min(t_len, c0 + chunk)
            n, s_end = c1 - c0, q_start + c1
            qc = qh[:, :, c0:c1].reshape(hkv, group * n, d)
            scores = torch.matmul(qc, kh[:, :s_end].transpose(1, 2)) * scale  # [Hkv, g*n, S]
            rows = torch.arange(q_start + c0, q_start + c1, device=q.device).repeat(group)[:, None]
            cols = torch.arange(s_end, device=q.device)[None, :]
            scores.masked_fill_(cols > rows, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1), vh[:, :s_end])  # [Hkv, g*n, d]
            out[b, c0:c1] = o.view(hkv, group, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
    return out


def bits_per_byte(logits, targets):
    """Per-position bits of the targets: -log2 softmax(logits)[target].
    logits [..., V], targets [...] -> float64 numpy [...]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.as_tensor(targets).to(lp.device).long()
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll / math.log(2)).cpu().numpy()


class LlamaModel:
    """The weights and the forward pieces of a Llama-architecture model.
    Not thread-safe."""

    def __init__(self, model_dir, device="cpu", kv_dtype="bf16"):
        self.dir = pathlib.Path(model_dir)
        self.config = LlamaConfig.from_dir(model_dir)
        self.device = torch.device(device)
        if kv_dtype not in _KV_TORCH:
            raise ValueError(f"kv_dtype must be one of {sorted(_KV_TORCH)}")
        self.kv_dtype = kv_dtype
        self.kv_torch = _KV_TORCH[kv_dtype]
        w = load_checkpoint(model_dir, device=self.device)
        c = self.config
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in w]
        if missing:
            raise ValueError(f"{model_dir}: missing tensors {missing}")
        self.embed_tokens = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = (w["model.embed_tokens.weight"] if c.tie_word_embeddings or
                        "lm_head.weight" not in w else w["lm_head.weight"]).T.contiguous()
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "ln1": w[p + "input_layernorm.weight"], "ln2": w[p + "post_attention_layernorm.weight"],
                "q": w[p + "self_attn.q_proj.weight"].T.contiguous(), "k": w[p + "self_attn.k_proj.weight"].T.contiguous(),
                "v": w[p + "self_attn.v_proj.weight"].T.contiguous(), "o": w[p + "self_attn.o_proj.weight"].T.contiguous(),
                "gate": w[p + "mlp.gate_proj.weight"].T.contiguous(), "up": w[p + "mlp.up_proj.weight"].T.contiguous(),
                "down": w[p + "mlp.down_proj.weight"].T.contiguous()})
        d = c.head_dim
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float().to(
            self.device) / d))
        self.model_id = self.dir.resolve().name

    # --- pieces ---

    def rms_norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * weight

    def rope(self, positions):
        """cos, sin [..., d/2] float32 of integer positions [...] (HF's
        float32 inv_freq times position)."""
        freqs = positions.to(self.device).float()[..., None] * self.inv_freq
        return freqs.cos(), freqs.sin()

    @staticmethod
    def apply_rope(x, cos, sin):
        """x [B, T, H, d] with cos/sin [B or 1, T, d/2]: the rotate_half layout."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def round_kv(self, x):
        """Rounds to the KV dtype and back to float32 (what a bf16 cache holds;
        kv_dtype "f32" keeps float32, as the captures are computed)."""
        return x if self.kv_torch == torch.float32 else x.to(self.kv_torch).float()

    def qkv(self, layer, x, cos, sin):
        """x [B, T, D] -> q [B, T, Hq, d] f32 post-RoPE; k (post-RoPE), v
        [B, T, Hkv, d] rounded to the KV dtype (as float32)."""
        c, p = self.config, self.layers[layer]
        h = self.rms_norm(x, p["ln1"])
        b, t, _ = x.shape
        q = (h @ p["q"]).view(b, t, c.num_q_heads, c.head_dim)
        k = (h @ p["k"]).view(b, t, c.num_kv_heads, c.head_dim)
        v = (h @ p["v"]).view(b, t, c.num_kv_heads, c.head_dim)
        return self.apply_rope(q, cos, sin), self.round_kv(self.apply_rope(k, cos, sin)), \
            self.round_kv(v)

    def finish_layer(self, layer, x, attn):
        """The residual, o_proj and the MLP after attention (attn [B, T, Hq*d])."""
        p = self.layers[layer]
        x = x + attn @ p["o"]
        h = self.rms_norm(x, p["ln2"])
        return x + (torch.nn.functional.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]

    def head(self, x):
        return self.rms_norm(x, self.norm) @ self.lm_head

    def embed(self, tokens):
        return self.embed_tokens[tokens.to(self.device)]

    # --- prefill ---

    @torch.no_grad()
    def prefill(self, tokens, past=None, keep_queries=False, logits="last", attention=None):
        """Full causal attention over tokens [B, T] (positions P .. P+T-1 after
        `past`: a list per layer of (k, v) [B, P, Hkv, d] in the KV dtype).
        Returns a Prompt with the K/V of all P+T positions, the logits
        ("last": [B, V] of the last position; "all": [B, T, V]) and, with
        keep_queries, the post-RoPE queries [B, T, Hq, d] per layer.
        `attention(layer, q, k, v, q_start)` replaces causal_attention."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        b, t = tokens.shape
        start = 0 if past is None else past[0][0].shape[1]
        c = self.config
        x = self.embed(tokens)
        positions = torch.arange(start, start + t, device=self.device)[None]
        cos, sin = self.rope(positions)
        attention = attention or (lambda l, q, k, v, s: causal_attention(q, k, v, s))
        kv, queries = [], []
        for layer in range(c.num_layers):
            q, k, v = self.qkv(layer, x, cos, sin)
            if past is not None:
                k = torch.cat([past[layer][0].float(), k], dim=1)
                v = torch.cat([past[layer][1].float(), v], dim=1)
            attn = attention(layer, q, k, v, start)
            x = self.finish_layer(layer, x, attn.reshape(b, t, c.num_q_heads * c.head_dim))
            kv.append((k.to(self.kv_torch), v.to(self.kv_torch)))
            if keep_queries:
                queries.append(q)
        out = self.head(x[:, -1:] if logits == "last" else x)
        out = out[:, -1] if logits == "last" else out
        return Prompt(tokens=tokens, kv=kv, logits=out, queries=queries if keep_queries else None,
                      reused_tokens=[0] * b)

    def kv_payload(self, prompt, b, begin=0, end=None):
        """The span payload [layers, 2, Hkv, n, d] of sequence b's positions
        [begin, end), as uint16 (bf16) or float16 numpy."""
        end = prompt.kv[0][0].shape[1] if end is None else end
        a = torch.stack([torch.stack([k[b, begin:end], v[b, begin:end]]) for k, v in prompt.kv])
        a = a.permute(0, 1, 3, 2, 4).contiguous().cpu()  # [L, 2, Hkv, n, d]
        if self.kv_dtype == "bf16":
            return a.view(torch.int16).numpy().view(np.uint16)
        return a.numpy()


@dataclasses.dataclass
class Prompt:
    """A prefilled batch: tokens [B, T], K/V per layer ([B, T, Hkv, d], KV
    dtype), logits of the last position (or all), optional queries, and the
    stored span hashes and prefix-reuse record per sequence."""
    tokens: torch.Tensor
    kv: list
    logits: torch.Tensor
    queries: Optional[list] = None
    hashes: Optional[List[List[bytes]]] = None
    reused_tokens: Optional[List[int]] = None
    timings: dict = dataclasses.field(default_factory=dict)
    bytes_fetched: int = 0
    bytes_stored: int = 0

    @property
    def batch_size(self):
        return self.tokens.shape[0]

    @property
    def num_tokens(self):
        return self.tokens.shape[1]


class LocalDecoder:
    """The runner's own decode: full attention in torch over its K/V cache
    (the reference the worker's full-attention decode is checked against).
    The cache holds the KV-dtype values as float32. Not thread-safe."""

    def __init__(self, model, prompt, capacity_tokens):
        self.model = model
        c = model.config
        b, t = prompt.batch_size, prompt.num_tokens
        self.k = [torch.zeros(b, capacity_tokens, c.num_kv_heads, c.head_dim, device=model.device)
                  for _ in range(c.num_layers)]
        self.v = [torch.zeros_like(x) for x in self.k]
        for layer, (k, v) in enumerate(prompt.kv):
            self.k[layer][:, :t] = k.float()
            self.v[layer][:, :t] = v.float()
        self.length = t

    @torch.no_grad()
    def step(self, tokens):
        m, c = self.model, self.model.config
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=m.device).view(-1)
        b = tokens.shape[0]
        x = m.embed(tokens)[:, None]
        cos, sin = m.rope(torch.full((1, 1), self.length, device=m.device))
        for layer in range(c.num_layers):
            q, k, v = m.qkv(layer, x, cos, sin)
            self.k[layer][:, self.length] = k[:, 0]
            self.v[layer][:, self.length] = v[:, 0]
            attn = causal_attention(q, self.k[layer][:, :self.length + 1],
                                    self.v[layer][:, :self.length + 1], self.length)
            x = m.finish_layer(layer, x, attn.reshape(b, 1, -1))
        self.length += 1
        return m.head(x)[:, 0]

    def close(self):
        pass


class WorkerDecoder:
    """Decode steps whose attention runs in a kvrecall.worker.Session under a
    layer policy. mode "gpu_resident" (the session holds every position) or
    "offloaded" (the prompt stays in kvrecalld; `prompt.hashes` must name its
    stored spans). Not thread-safe."""

    def __init__(self, model, prompt, policy, capacity_tokens, mode="gpu_resident", target=None,
                 model_id=None, loki_components=None, reuse_transfer="positions", backend=None,
                 progress=None, token=None):
        from kvrecall.worker import Session
        c = model.config
        self.model = model
        self.policy = policy
        backend = backend or ("cuda" if model.device.type == "cuda" else "cpu")
        if mode == "offloaded" and (target is None or prompt.hashes is None):
            raise ValueError("offloaded decoding needs a kvrecalld target and the prompt's stored spans")
        self.session = Session(
            num_layers=c.num_layers, num_q_heads=c.num_q_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, policy=policy, capacity_tokens=capacity_tokens,
            kv_dtype=model.kv_dtype, batch_size=prompt.batch_size, mode=mode, backend=backend,
            loki_components=loki_components, target=target if mode == "offloaded" else None,
            model_id=model_id if mode == "offloaded" else None, bearer_token=token,
            reuse_transfer=reuse_transfer)
        t = prompt.num_tokens
        self.session.start_prefix([t] * prompt.batch_size,
                                  prompt.hashes if mode == "offloaded" else None)
        for layer, (k, v) in enumerate(prompt.kv):
            self.session.load_prefix_layer(layer, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))
        self.length = t

    @torch.no_grad()
    def step(self, tokens):
        """One decode step: tokens [B] at position `length`; returns logits [B, V]."""
        m, c = self.model, self.model.config
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=m.device).view(-1)
        b = tokens.shape[0]
        x = m.embed(tokens)[:, None]
        cos, sin = m.rope(torch.full((1, 1), self.length, device=m.device))
        for layer in range(c.num_layers):
            q, k, v = m.qkv(layer, x, cos, sin)
            out = self.session.attend_layer(layer, q[:, 0].contiguous(),
                                            k[:, 0].to(m.kv_torch).contiguous(),
                                            v[:, 0].to(m.kv_torch).contiguous())
            x = m.finish_layer(layer, x, out.reshape(b, 1, -1))
        self.length += 1
        return m.head(x)[:, 0]

    def stats(self):
        return self.session.stats()

    def close(self):
        self.session.close()


def _resolve_policy(policy, num_layers, budget=0.02):
    if isinstance(policy, dict):
        return policy
    if isinstance(policy, (str, pathlib.Path)) and str(policy).endswith(".json"):
        return _policies.load(policy)
    if policy == "full":
        return _policies.full(num_layers)
    if policy == "tidal":
        return _policies.tidal(num_layers, select_layer=2, reselect_layer=num_layers // 2 + 1,
                               budget=budget)
    if policy in ("exact", "loki", "quest"):
        return _policies.uniform(num_layers, policy, "local", budget=budget)
    raise ValueError(f"unknown policy {policy!r}: a dict, a .json file, full, tidal, exact, loki, quest")


class LlamaRunner:
    """A model plus (optionally) its kvrecalld: prefill with prefix reuse and
    span storage, decoders under any policy, generate and teacher forcing.

    target: kvrecalld address (None: no store, GPU-resident only).
    Not thread-safe."""

    def __init__(self, model_dir, device=None, target=None, model_id=None, token=None,
                 block_tokens=256, salt=""):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = LlamaModel(model_dir, device=device)
        self.config = self.model.config
        self.model_id = model_id or self.model.model_id
        self.target = target
        self.token = token
        self.salt = salt
        self.client = None
        self.loki = None            # {layer: [Hkv, d, d]} after calibrate()
        self._queried = set()       # contexts that received their prefill queries
        if target is not None:
            import kvrecall
            self.client = kvrecall.Client(target, token=token, deadline_s=600)
            c = self.config
            geometry = self.client.register_model(
                self.model_id, num_layers=c.num_layers, num_q_heads=c.num_q_heads,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=self.model.kv_dtype,
                block_tokens=block_tokens)
            self.block_tokens = geometry.block_tokens
        else:
            self.block_tokens = block_tokens

    # --- prompts, spans and prefix reuse ---

    def prompt(self, tokens, store=True, reuse=True, keep_queries=False, logits="last"):
        """Prefills a batch of equal-length prompts ([B, T] ints, or bytes /
        one list for B = 1). With a kvrecalld: reuse loads the K/V of the
        longest stored prefix of whole blocks (each sequence alone; the
        recomputed part still covers the last token) and store puts the
        missing spans (the last one partial), so `hashes` names the whole
        prompt. Returns a Prompt with timings (s) and bytes moved."""
        if isinstance(tokens, (bytes, bytearray)):
            tokens = list(tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if self.client is None or not reuse:
            t0 = time.perf_counter()
            p = self.model.prefill(tokens, keep_queries=keep_queries, logits=logits)
            self._sync()
            p.timings = {"compute_s": time.perf_counter() - t0}
        else:
            parts = [self._prompt_one(tokens[b], keep_queries, logits)
                     for b in range(tokens.shape[0])]
            p = parts[0] if len(parts) == 1 else _cat_prompts(parts)
        p.timings["ttft_s"] = sum(p.timings.get(k, 0) for k in ("lookup_s", "fetch_s", "compute_s"))
        if self.client is not None and store:
            self.store(p)
        return p

    def _sync(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    def _prompt_one(self, tokens, keep_queries, logits):
        from kvrecall import hashing
        ids = tokens.tolist()
        t0 = time.perf_counter()
        hit = self.client.lookup_tokens(self.model_id, ids, salt=self.salt)
        mine = hashing.chain_span_hashes(self.model_id, self.salt, ids, self.block_tokens)
        if [bytes(h) for h in hit.hashes] != mine[:len(hit.hashes)]:
            raise RuntimeError("kvrecalld hashes token chains differently from this client")
        # Leave at least the last token to compute (its logits start decoding).
        usable = min(hit.prefix_spans, (len(ids) - 1) // self.block_tokens)
        t1 = time.perf_counter()
        past, fetched = None, 0
        if usable > 0:
            spans = self.client.get_spans(self.model_id, mine[:usable])
            arr = np.concatenate([s.array for s in spans], axis=3)  # [L, 2, Hkv, R, d]
            fetched = arr.nbytes
            t = torch.from_numpy(arr.view(np.int16) if self.model.kv_dtype == "bf16" else arr)
            if self.model.kv_dtype == "bf16":
                t = t.view(torch.bfloat16)
            t = t.to(self.model.device).permute(0, 1, 3, 2, 4)  # [L, 2, R, Hkv, d]
            past = [(t[layer, 0][None], t[layer, 1][None]) for layer in range(t.shape[0])]
        t2 = time.perf_counter()
        reused = usable * self.block_tokens
        p = self.model.prefill(tokens[reused:][None], past=past, keep_queries=keep_queries,
                               logits=logits)
        self._sync()
        t3 = time.perf_counter()
        p.tokens = tokens[None].to(self.model.device)
        p.reused_tokens = [reused]
        p.bytes_fetched = fetched
        p.timings = {"lookup_s": t1 - t0, "fetch_s": t2 - t1, "compute_s": t3 - t2}
        return p

    def store(self, prompt):
        """Puts the spans of every prompt of the batch that kvrecalld lacks
        (full blocks and the partial last one); sets prompt.hashes."""
        from kvrecall import Span, hashing
        t0 = time.perf_counter()
        prompt.hashes = []
        stored = 0
        for b in range(prompt.batch_size):
            ids = prompt.tokens[b].tolist()
            hashes = hashing.chain_span_hashes(self.model_id, self.salt, ids, self.block_tokens,
                                               include_partial_tail=True)
            have = self.client.lookup(self.model_id, hashes).prefix_spans
            spans = []
            for i in range(have, len(hashes)):
                t0_, t1_ = i * self.block_tokens, min(len(ids), (i + 1) * self.block_tokens)
                payload = self.model.kv_payload(prompt, b, t0_, t1_)
                stored += payload.nbytes
                parent = hashes[i - 1] if i > 0 else hashing.span_root_hash(self.model_id, self.salt)
                spans.append(Span(hash=hashes[i], parent=parent, num_tokens=t1_ - t0_,
                                  payload=payload, token_ids=ids[t0_:t1_]))
            if spans:
                self.client.put_spans(self.model_id, spans, salt=self.salt)
            prompt.hashes.append(hashes)
        prompt.bytes_stored += stored
        prompt.timings["store_s"] = time.perf_counter() - t0
        return prompt.hashes

    def send_queries(self, prompt):
        """AddQueries: each layer's prefill queries of each prompt (the
        training queries of query-aware indexes such as roar), once per
        context. Needs prompt.queries (prefill with keep_queries)."""
        if prompt.queries is None:
            raise ValueError("the prompt was prefilled without keep_queries")
        for b in range(prompt.batch_size):
            ctx = self.client.open_context(self.model_id, prompt.hashes[b]).context
            if ctx in self._queried:
                continue
            first = prompt.reused_tokens[b] if prompt.reused_tokens else 0
            for layer, q in enumerate(prompt.queries):
                self.client.add_queries(ctx, layer, q[b].cpu().numpy().astype(np.float32),
                                        first_position=first)
            self._queried.add(ctx)

    def close_contexts(self, prompt):
        """Closes the prompt's contexts in kvrecalld (dropping tokens appended
        by an offloaded decode, so the next decode starts from the prompt)."""
        from kvrecall import errors
        for b in range(prompt.batch_size):
            try:
                self.client.close_context(prompt.hashes[b][-1])
            except errors.NotFoundError:
                pass

    # --- calibration artifacts ---

    def calibrate(self, tokens, upload=True, sparse_encoder=True, progress=None, epochs=2,
                  sparse_keys=4096):
        """Fits the Loki bases (PCA of each layer's and KV head's post-RoPE
        keys) and, optionally, the sparse encoders (trained on at most
        `sparse_keys` of each head's keys) of a calibration text, sets
        self.loki (the worker's local Loki components) and uploads the
        loki_basis and sparse_encoder artifacts. Returns the artifact
        versions stored ({} without upload)."""
        from kvrecall.integrations import artifacts
        p = self.model.prefill(torch.as_tensor(list(tokens))[None], logits="last")
        keys = {}
        for layer, (k, _) in enumerate(p.kv):
            for h in range(self.config.num_kv_heads):
                keys[(layer, h)] = k[0, :, h].float().cpu().numpy()
        bases = artifacts.fit_loki_bases(keys)
        self.loki = artifacts.loki_components(bases, self.config.num_layers, self.config.num_kv_heads)
        versions = {}
        if upload and self.client is not None:
            info = self.client.put_artifact(self.model_id, "loki_basis",
                                            artifacts.serialize_loki_basis(bases),
                                            description=f"PCA of {len(tokens)} calibration tokens")
            versions["loki_basis"] = info.version
        if sparse_encoder:
            encoders = []
            for i, key in enumerate(sorted(keys)):
                data = keys[key]
                if len(data) > sparse_keys:
                    pick = np.random.default_rng(key[0] * 1000 + key[1]).choice(
                        len(data), sparse_keys, replace=False)
                    data = data[np.sort(pick)]
                encoders.append(artifacts.train_sparse_encoder(data, *key, epochs=epochs,
                                                               device=self.model.device))
                if progress:
                    progress(f"sparse encoder {i + 1}/{len(keys)}: layer {key[0]} head {key[1]} "
                             f"fvu {encoders[-1].fvu:.3f}")
            if upload and self.client is not None:
                info = self.client.put_artifact(
                    self.model_id, "sparse_encoder", artifacts.serialize_sparse_encoders(encoders),
                    description=f"top-8 encoders of {len(tokens)} calibration tokens")
                versions["sparse_encoder"] = info.version
        return versions

    # --- decoding ---

    def decoder(self, prompt, policy, mode="gpu_resident", max_new_tokens=512, local=False,
                reuse_transfer="positions"):
        """A decoder over a prefilled prompt: LocalDecoder (local=True, the
        runner's own full attention) or a WorkerDecoder under `policy`."""
        capacity = prompt.num_tokens + max_new_tokens + 1
        if local:
            return LocalDecoder(self.model, prompt, capacity)
        policy = _resolve_policy(policy, self.config.num_layers)
        if mode == "offloaded":
            if prompt.hashes is None:
                self.store(prompt)
            if prompt.queries is not None:
                self.send_queries(prompt)
            needs_loki = "loki" in _policies.kinds(policy)["local"]
        else:
            needs_loki = "loki" in _policies.kinds(policy)["local"]
        if needs_loki and self.loki is None:
            raise ValueError("a local loki policy needs Loki bases: call calibrate() first")
        loki = {l: c for l, c in (self.loki or {}).items()
                if policy["layers"][l].get("kind") == "loki"
                and policy["layers"][l].get("where", "local") == "local"} or None
        return WorkerDecoder(self.model, prompt, policy, capacity, mode=mode, target=self.target,
                             model_id=self.model_id, loki_components=loki,
                             reuse_transfer=reuse_transfer, token=self.token)

    @torch.no_grad()
    def decode_steps(self, decoder, inputs):
        """Teacher forcing: feeds inputs [B, D] one column per step; returns
        the logits [B, D, V] of every step."""
        inputs = torch.as_tensor(inputs, dtype=torch.long)
        return torch.stack([decoder.step(inputs[:, i]) for i in range(inputs.shape[1])], dim=1)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, policy="full", mode="gpu_resident", local=False):
        """Greedy decoding: returns the new tokens [B, max_new_tokens] as a list
        of lists. `prompt` is a Prompt or tokens (prefilled with reuse and
        storage when a kvrecalld is configured)."""
        if not isinstance(prompt, Prompt):
            prompt = self.prompt(prompt, store=self.client is not None,
                                 keep_queries=mode == "offloaded")
        dec = self.decoder(prompt, policy, mode, max_new_tokens, local=local)
        try:
            nxt = prompt.logits.argmax(-1)
            out = [nxt]
            for _ in range(max_new_tokens - 1):
                nxt = dec.step(nxt).argmax(-1)
                out.append(nxt)
        finally:
            dec.close()
            if mode == "offloaded":
                self.close_contexts(prompt)
        return torch.stack(out, dim=1).tolist()


def _cat_prompts(parts):
    kv = [(torch.cat([p.kv[l][0] for p in parts]), torch.cat([p.kv[l][1] for p in parts]))
          for l in range(len(parts[0].kv))]
    queries = None
    if parts[0].queries is not None and len({p.queries[0].shape[1] for p in parts}) == 1:
        queries = [torch.cat([p.queries[l] for p in parts]) for l in range(len(parts[0].queries))]
    timings = {}
    for p in parts:
        for k, v in p.timings.items():
            timings[k] = timings.get(k, 0) + v
    return Prompt(tokens=torch.cat([p.tokens for p in parts]), kv=kv,
                  logits=torch.cat([p.logits for p in parts]), queries=queries,
                  reused_tokens=[r for p in parts for r in p.reused_tokens], timings=timings,
                  bytes_fetched=sum(p.bytes_fetched for p in parts))
