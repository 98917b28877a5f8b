"""Hugging Face transformers (5.x) with kvrecall attention: a Cache whose
decode steps run in a kvrecall.worker.Session, and an attention function
registered through transformers' AttentionInterface, so that
`LlamaForCausalLM.generate(...)` decodes under any kvrecall layer policy.

    import torch, transformers
    from kvrecall.integrations.llama import LlamaRunner
    from kvrecall.integrations import transformers as kvt

    kvt.register()                                       # attn_implementation "kvrecall"
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="kvrecall").cuda().eval()
    runner = LlamaRunner(path, device="cuda", target="127.0.0.1:7878")   # the K/V side
    cache = kvt.KvrecallCache(runner, policy="tidal", prompt_ids=ids, max_new_tokens=64)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False,
                         pad_token_id=0)

How it fits (transformers' LlamaAttention computes q/k/v and RoPE, then calls
past_key_values.update(k, v, layer) and the registered attention function):
- prefill (the first forward, or more tokens before decoding starts): the
  cache keeps each layer's K/V rounded to the worker's KV dtype and the
  attention function computes full causal attention over them in torch
  (kvrecall.integrations.llama.causal_attention, the plain runner's);
- first decode step: the cache opens a decoder over the prefilled K/V
  (GPU-resident, or offloaded: the prompt's spans are stored in kvrecalld
  and `prompt_ids` names them), and every layer's attention is one
  Session.attend_layer call.
No attention-mask function is registered, so transformers passes no mask:
prompts in a batch must have equal lengths (no padding). One cache serves
one generate call.
"""

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from kvrecall.integrations.llama import Prompt, causal_attention

__all__ = ["ATTN_IMPLEMENTATION", "KvrecallCache", "kvrecall_attention", "register"]

ATTN_IMPLEMENTATION = "kvrecall"
_CURRENT = {"cache": None}  # the cache whose update() ran last (the same layer's attention follows)


class _KvrecallLayer(CacheLayerMixin):
    """Length bookkeeping of one layer (the K/V live in the cache and the worker)."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states, *args, **kwargs):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = key_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("KvrecallCache.update handles every layer")

    def get_seq_length(self, *args, **kwargs):
        return self.length

    def get_mask_sizes(self, query, *args, **kwargs):
        q = query.shape[0] if hasattr(query, "shape") else int(query)
        return self.length + q, 0

    def get_max_cache_shape(self, *args, **kwargs):
        return -1


_KvrecallLayer.__abstractmethods__ = frozenset()  # robust to abstract methods added upstream


class KvrecallCache(Cache):
    """past_key_values for generate(): prefill K/V in torch, decode through
    a kvrecall worker session (policy and mode as LlamaRunner.decoder).
    runner: a LlamaRunner on the same device as the model (its kvrecalld
    for offloaded mode). prompt_ids: the prompt [B, T] (needed offloaded,
    to store and name its spans). Not thread-safe."""

    def __init__(self, runner, policy="full", mode="gpu_resident", max_new_tokens=512,
                 prompt_ids=None):
        c = runner.config
        super().__init__(layers=[_KvrecallLayer() for _ in range(c.num_layers)])
        self.runner = runner
        self.policy = policy
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.prompt_ids = None
        if prompt_ids is not None:
            ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
            self.prompt_ids = ids[None] if ids.dim() == 1 else ids
        self.kv = [None] * c.num_layers       # prefill (k, v) [B, T, Hkv, d], KV dtype
        self.queries = [None] * c.num_layers  # offloaded: prefill queries (roar's training)
        self.decoder = None
        self.step_inputs = None               # (layer, ...) handed to the attention function

    # --- transformers' Cache interface ---

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """key/value_states [B, Hkv, q_len, d] (keys post-RoPE)."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states)
        model = self.runner.model
        q_len = key_states.shape[-2]
        k = model.round_kv(key_states.transpose(1, 2).float())
        v = model.round_kv(value_states.transpose(1, 2).float())
        if self.decoder is None and (layer.length == 0 or q_len > 1):
            start = layer.length
            if self.kv[layer_idx] is not None:
                k = torch.cat([self.kv[layer_idx][0].float(), k], dim=1)
                v = torch.cat([self.kv[layer_idx][1].float(), v], dim=1)
            self.kv[layer_idx] = (k.to(model.kv_torch), v.to(model.kv_torch))
            self.step_inputs = ("prefill", layer_idx, k, v, start)
        else:
            if q_len != 1:
                raise ValueError("KvrecallCache decodes one token per step")
            if self.decoder is None:
                if layer_idx != 0:
                    raise RuntimeError("the first decode step must start at layer 0")
                self._start_decoder()
            self.step_inputs = ("decode", layer_idx, k[:, 0].to(model.kv_torch).contiguous(),
                                v[:, 0].to(model.kv_torch).contiguous(), layer.length)
        layer.length += q_len
        _CURRENT["cache"] = self
        return key_states, value_states

    def get_seq_length(self, layer_idx=0, *args, **kwargs):
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query, layer_idx=0, *args, **kwargs):
        return self.layers[layer_idx].get_mask_sizes(query)

    def get_max_cache_shape(self, layer_idx=0, *args, **kwargs):
        return -1

    @property
    def is_compileable(self):
        return False

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("KvrecallCache supports greedy and sampling, not beam search")

    def crop(self, max_length):
        raise NotImplementedError("KvrecallCache cannot drop tokens (assisted decoding)")

    # --- kvrecall ---

    def _start_decoder(self):
        model = self.runner.model
        b, t = self.kv[0][0].shape[:2]
        tokens = self.prompt_ids if self.prompt_ids is not None else \
            torch.zeros(b, t, dtype=torch.long)
        if tokens.shape != (b, t):
            raise ValueError(f"prompt_ids has shape {tuple(tokens.shape)}, the prefill saw {(b, t)}")
        if self.mode == "offloaded" and self.prompt_ids is None:
            raise ValueError("offloaded decoding needs prompt_ids (its spans are stored by tokens)")
        prompt = Prompt(tokens=tokens.to(model.device), kv=self.kv, logits=None,
                        queries=self.queries if self.mode == "offloaded" else None,
                        reused_tokens=[0] * b)
        self.prompt = prompt
        self.decoder = self.runner.decoder(prompt, self.policy, self.mode, self.max_new_tokens)

    def close(self):
        if self.decoder is not None:
            self.decoder.close()
            if self.mode == "offloaded":
                self.runner.close_contexts(self.prompt)
            self.decoder = None


def kvrecall_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """The attention function of attn_implementation "kvrecall": query
    [B, Hq, q_len, d] post-RoPE; returns ([B, q_len, Hq, d], None)."""
    cache = _CURRENT["cache"]
    layer = getattr(module, "layer_idx", None)
    if cache is None or cache.step_inputs is None or cache.step_inputs[1] != layer:
        raise RuntimeError("kvrecall attention needs past_key_values=KvrecallCache(...) and "
                           "use_cache=True")
    phase, _, k, v, start = cache.step_inputs
    cache.step_inputs = None
    q = query.transpose(1, 2).float()  # [B, q_len, Hq, d]
    if phase == "prefill":
        if cache.mode == "offloaded":
            prev = cache.queries[layer]
            cache.queries[layer] = q if prev is None else torch.cat([prev, q], dim=1)
        out = causal_attention(q, k, v, start)
    else:
        out = cache.decoder.session.attend_layer(layer, q[:, 0].contiguous(), k, v)[:, None]
    return out.to(query.dtype), None


def register():
    """Registers attn_implementation "kvrecall" (no mask function: the
    attention is causal by construction and prompts are unpadded)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvrecall_attention)
