"""The peer of worker_bench's GPU-resident rows: PyTorch's
scaled_dot_product_attention over a static bf16 KV cache, the same
geometry (32 layers, 32 query heads over 8 KV heads, d = 128), batch and
context, the same number of distinct KV pools aliased by the layers, the new
token written into the cache at every layer (as our AppendKv does), one step
captured in a CUDA graph and replayed (median of CUDA-event timings).

    python3 bench/worker/torch_sdpa_peer.py --contexts 32768,131072 --batches 1,8 --pools 4 --out DIR
"""

import argparse
import csv
import os
import statistics

import torch
import torch.nn.functional as F

LAYERS, HQ, HKV, D = 32, 32, 8, 128


def time_step(context, batch, pools, replays):
    dev = torch.device("cuda")
    cap = context + 256
    ks = [torch.randn(batch, HKV, cap, D, device=dev, dtype=torch.bfloat16) for _ in range(pools)]
    vs = [torch.randn(batch, HKV, cap, D, device=dev, dtype=torch.bfloat16) for _ in range(pools)]
    qs = [3 * torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    k_new = torch.randn(batch, HKV, 1, D, device=dev, dtype=torch.bfloat16)
    v_new = torch.randn(batch, HKV, 1, D, device=dev, dtype=torch.bfloat16)
    pos = torch.tensor([context], device=dev)
    outs = [None] * LAYERS

    def step():
        for layer in range(LAYERS):
            k, v = ks[layer % pools], vs[layer % pools]
            k.index_copy_(2, pos, k_new)
            v.index_copy_(2, pos, v_new)
            outs[layer] = F.scaled_dot_product_attention(
                qs[layer], k[:, :, :context + 1], v[:, :, :context + 1], enable_gqa=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ms = []
    for r in range(replays + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if r >= 3:
            ms.append(a.elapsed_time(b))
    del ks, vs, g
    torch.cuda.empty_cache()
    return statistics.median(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pools", type=int, default=4)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            ms = time_step(context, batch, args.pools, args.replays)
            rows.append({"context": context, "batch": batch, "ms_per_step": ms})
            print(f"torch sdpa T={context} B={batch}: {ms:.3f} ms/step", flush=True)
    if args.out:
        with open(os.path.join(args.out, "torch_sdpa.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["context", "batch", "ms_per_step"])
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
