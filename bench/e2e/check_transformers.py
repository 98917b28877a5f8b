#!/usr/bin/env python3
"""Checks the Hugging Face transformers integration against the plain runner
(docs/e2e.md): LlamaForCausalLM.generate with attn_implementation "kvrecall"
and a KvrecallCache must produce exactly the plain runner's greedy tokens
(64 new tokens) under a full-attention policy and sparse policies
(TidalDecode on the GPU-resident session; with --target also an offloaded
remote roar selection through kvrecalld). Also prints whether transformers'
own sdpa attention (K/V not rounded to bf16) gives the same tokens
(informational).

Needs transformers 5.x and torch (the GPU machine):

    PYTHONPATH=build/python KVRECALL_WORKER_LIB=build/lib/libkvrecall_worker.so \\
      python3 bench/e2e/check_transformers.py --model=MODEL_DIR --corpus=dev.txt [--target=HOST:PORT]
"""

import argparse
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--target", help="kvrecalld for the offloaded row (optional)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt_bytes", type=int, default=2048)
    ap.add_argument("--offset", type=int, default=220464)
    ap.add_argument("--new_tokens", type=int, default=64)
    a = ap.parse_args()

    import transformers
    from kvrecall.integrations import policies as P
    from kvrecall.integrations import transformers as kvt
    from kvrecall.integrations.llama import LlamaRunner

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kvt.register()
    hf = transformers.LlamaForCausalLM.from_pretrained(
        a.model, dtype=torch.float32, attn_implementation=kvt.ATTN_IMPLEMENTATION).to(device).eval()
    runner = LlamaRunner(a.model, device=device, target=a.target, model_id="kvr-tiny-llama-hf")
    text = open(a.corpus, "rb").read()[a.offset:a.offset + a.prompt_bytes]
    ids = torch.tensor([list(text)], device=device)
    n = a.new_tokens
    layers = runner.config.num_layers
    cases = [("full", P.full(layers), "gpu_resident"),
             ("tidal-s2-r5 k=64", P.tidal(layers, select_layer=2, reselect_layer=5, k=64),
              "gpu_resident"),
             ("local exact k=64", P.uniform(layers, "exact", "local", k=64), "gpu_resident")]
    if a.target:
        cases.append(("offloaded remote roar k=64", P.uniform(layers, "roar", "remote", k=64),
                      "offloaded"))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device "
          f"{torch.cuda.get_device_name() if device == 'cuda' else device}")
    failed = 0
    for name, policy, mode in cases:
        t0 = time.time()
        plain = runner.generate(ids, n, policy=policy, mode=mode)[0]
        t1 = time.time()
        cache = kvt.KvrecallCache(runner, policy, mode=mode, max_new_tokens=n, prompt_ids=ids)
        try:
            with torch.no_grad():
                out = hf.generate(ids, past_key_values=cache, max_new_tokens=n, do_sample=False,
                                  pad_token_id=0, use_cache=True)
        finally:
            cache.close()
        t2 = time.time()
        got = out[0, ids.shape[1]:].tolist()
        same = got == plain
        failed += not same
        first = next((i for i, (x, y) in enumerate(zip(got, plain)) if x != y), None)
        print(f"{name:28s} {mode:12s} generate == plain runner: {'yes' if same else 'NO'} "
              f"({n} tokens; plain {t1 - t0:.1f} s, transformers {t2 - t1:.1f} s)"
              + ("" if same else f" first difference at token {first}"))
        if not same:
            print("  plain:        ", bytes(plain).decode("utf-8", "replace")[:120])
            print("  transformers: ", bytes(got).decode("utf-8", "replace")[:120])
    hf.set_attn_implementation("sdpa")
    with torch.no_grad():
        native = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    plain = runner.generate(ids, n, policy="full")[0]
    print(f"transformers sdpa (its own cache) == kvrecall full: "
          f"{'yes' if native.tolist() == plain else 'no'} (informational)")
    print("sample:", repr(bytes(plain).decode("utf-8", "replace")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
