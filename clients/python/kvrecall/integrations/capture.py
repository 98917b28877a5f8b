"""kvrecall-capture: post-RoPE Q/K/V of chosen layers of a Llama-style
safetensors model on a text, in the capture layout the index builder
(`kvrecall build-index --captures`), `kvrecall fit-loki` and `kvrecall
profile-policy` read:

    layerLL_q.npy   float16 [num_q_heads, T, head_dim]   post-RoPE queries
    layerLL_k.npy   float16 [num_kv_heads, T, head_dim]  post-RoPE keys
    layerLL_v.npy   float16 [num_kv_heads, T, head_dim]  values
    window.txt      the T input bytes (token t = byte t; byte-level models)
    capture_meta.json

Computed in float32 from the checkpoint's weights (no K/V rounding), then
rounded to float16. Usage:

    python3 -m kvrecall.integrations.capture --model=DIR --text=FILE \\
        [--offset=N] [--bytes=8192] [--layers=1,3,5,7] -o OUT
"""

import argparse
import hashlib
import json
import pathlib
import sys
import time

import numpy as np
import torch

from kvrecall.integrations.llama import LlamaModel, bits_per_byte, causal_attention


@torch.no_grad()
def capture(model, tokens, layers):
    """{layer: (q [Hq, T, d], k [Hkv, T, d], v [Hkv, T, d]) float32 numpy} for
    the requested layers, running the model only up to the last of them
    (and to the logits when every layer is requested: then also the loss).
    Returns (arrays, bits_per_byte or None)."""
    c = model.config
    t = torch.as_tensor(tokens, dtype=torch.long, device=model.device)[None]
    x = model.embed(t)
    cos, sin = model.rope(torch.arange(t.shape[1], device=model.device)[None])
    out = {}
    last = c.num_layers - 1 if not layers else max(layers)
    for layer in range(last + 1):
        q, k, v = model.qkv(layer, x, cos, sin)
        if layer in layers:
            out[layer] = tuple(a[0].permute(1, 0, 2).cpu().numpy() for a in (q, k, v))
        attn = causal_attention(q, k, v, 0)
        x = model.finish_layer(layer, x, attn.reshape(1, t.shape[1], -1))
        print(f"kvrecall-capture: layer {layer} done", file=sys.stderr, flush=True)
    loss = None
    if last == c.num_layers - 1 and t.shape[1] > 1:
        logits = model.head(x)[0, :-1]
        loss = float(bits_per_byte(logits, t[0, 1:]).mean())
    return out, loss


def write_capture(out_dir, model, text, arrays, meta_extra):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layer, (q, k, v) in sorted(arrays.items()):
        for name, a in (("q", q), ("k", k), ("v", v)):
            np.save(out / f"layer{layer:02d}_{name}.npy", a.astype("<f2"))
    (out / "window.txt").write_bytes(text)
    c = model.config
    meta = {
        "model": model.model_id,
        "model_dir": str(model.dir),
        "layers": sorted(arrays),
        "arrays": {"q": [c.num_q_heads, len(text), c.head_dim],
                   "k": [c.num_kv_heads, len(text), c.head_dim],
                   "v": [c.num_kv_heads, len(text), c.head_dim],
                   "dtype": "float16 (little-endian)", "post_rope": ["q", "k"],
                   "gqa": "query head h uses key/value head h // "
                          f"{c.num_q_heads // c.num_kv_heads}",
                   "computed_in": "float32 arithmetic from the checkpoint's weights, rounded to "
                                  "float16 at the end"},
        "window": {"file": "window.txt", "bytes": len(text),
                   "sha256": hashlib.sha256(text).hexdigest()},
    }
    meta["window"].update(meta_extra.pop("window", {}))
    meta.update(meta_extra)
    (out / "capture_meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="kvrecall-capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    ap.add_argument("--text", required=True, help="text file; its bytes are the token ids")
    ap.add_argument("--offset", type=int, default=0, help="first byte of the window")
    ap.add_argument("--bytes", type=int, default=8192, help="window length in bytes")
    ap.add_argument("--layers", default="", help="comma-separated layers (default: all)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("-o", "--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LlamaModel(a.model, device=device, kv_dtype="f32")
    data = pathlib.Path(a.text).read_bytes()
    text = data[a.offset:a.offset + a.bytes]
    if len(text) < 2:
        print(f"kvrecall-capture: {a.text} has no {a.bytes} bytes at offset {a.offset}",
              file=sys.stderr)
        return 2
    layers = [int(x) for x in a.layers.split(",") if x.strip()] or list(range(model.config.num_layers))
    bad = [l for l in layers if not 0 <= l < model.config.num_layers]
    if bad:
        print(f"kvrecall-capture: layers {bad} outside 0..{model.config.num_layers - 1}",
              file=sys.stderr)
        return 2
    t0 = time.time()
    arrays, loss = capture(model, list(text), layers)
    extra = {"window": {"source": str(a.text), "byte_offset": a.offset},
             "device": device, "seconds": round(time.time() - t0, 1)}
    if loss is not None:
        extra["window_loss_bits_per_byte_fp32"] = round(loss, 5)
    write_capture(a.out, model, text, arrays, extra)
    print(f"kvrecall-capture: {len(layers)} layers x {len(text)} tokens -> {a.out}"
          + (f" (window loss {loss:.4f} bits/byte)" if loss is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
