#!/usr/bin/env python3
"""PyTorch peers of gpu_bench, measured in the same device command.

Reads DIR/device.csv and DIR/ours.csv written by gpu_bench, reruns every row
with a PyTorch peer on the same shapes and data distribution, and writes
DIR/peers.csv and DIR/results.md (the joined table, also printed last).

Peers (timed like gpu_bench: one call captured into a CUDA graph, replays
timed with CUDA events, median, L2 flushed before each replay by reading
256 MiB, after warm-up):
  sparse_attention  index_select gather of the selected K/V rows from the same
                    paged pool + scaled_dot_product_attention (enable_gqa)
  dense_attention   SDPA alone (cannot return scores), SDPA + a separate q.K^T
                    matmul for the scores, and + torch.topk for the selection
  merge_states      max / exp / weighted sum in PyTorch ops
  top_k             torch.topk, sorted and unsorted (the faster one is the peer)
  loki_score        q'.K'^T matmul in bf16 (+ torch.topk)
  quest_score       maximum(q*max, q*min).sum(-1) (+ torch.topk)

Rows of the same kernel and shape that differ only in the launcher's path
(gpu_bench's "path" column: "auto" against "fma, merge kernel", or "bf16
scores" against "f32 scores") share one peer measurement.

Usage: python3 torch_peers.py --dir DIR
"""

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

_FLUSH = None
_EAGER = False  # set when some peer could not be captured into a graph


def timed_us(fn, min_reps=10):
    """Median device time of fn() in microseconds, as gpu_bench times its
    kernels: fn is captured once into a CUDA graph and the replays are timed
    with CUDA events (eager launches are timed instead, and marked, when the
    capture fails); the L2 is flushed before each replay by reading 256 MiB."""
    global _FLUSH, _EAGER
    if _FLUSH is None:
        _FLUSH = torch.ones(64 << 20, dtype=torch.int32, device="cuda")  # 256 MiB
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager timing
        progress(f"graph capture failed ({type(e).__name__}: {e}); timing eager launches")
        _EAGER = True
        torch.cuda.synchronize()
    times = []
    t0 = time.time()
    for _ in range(200):
        _FLUSH.sum()  # reads 256 MiB: the L2 is left holding clean lines
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
        if len(times) >= min_reps and time.time() - t0 > 0.3:
            break
    times.sort()
    return times[len(times) // 2]


def progress(msg):
    print(f"[torch_peers] {msg}", file=sys.stderr, flush=True)


class Peers:
    def __init__(self, rows):
        self.rows = rows
        self.pool = None
        self.pool_tokens = 0

    def ensure_pool(self, tokens, hkv, d):
        if self.pool_tokens >= tokens:
            return
        self.pool = None
        torch.cuda.empty_cache()
        k = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
        self.pool = (k.view(-1, d), v.view(-1, d))
        self.pool_tokens = tokens
        progress(f"KV pool of {tokens} tokens")

    def sparse(self, r):
        b, ctx, L, ps = r["batch"], r["ctx"], r["tokens"], r["page_size"]
        hq, hkv, d = r["hq"], r["hkv"], r["d"]
        max_tokens = max(x["batch"] * x["ctx"] for x in self.rows if x["kernel"] == "sparse_attention")
        self.ensure_pool(max_tokens, hkv, d)
        kflat, vflat = self.pool
        pool_pages = self.pool_tokens // ps
        pages_per_seq = (ctx + ps - 1) // ps
        page_table = torch.randperm(pool_pages, device="cuda")[: b * pages_per_seq].view(b, pages_per_seq)
        # L distinct random positions per (sequence, KV head), unordered.
        pos = torch.empty(b, hkv, L, dtype=torch.int64, device="cuda")
        for i in range(b):
            pos[i] = torch.rand(hkv, ctx, device="cuda").argsort(dim=-1)[:, :L]
        slot = page_table.gather(1, (pos // ps).view(b, -1)).view(b, hkv, L) * ps + pos % ps
        flat = (slot * hkv + torch.arange(hkv, device="cuda").view(1, hkv, 1)).view(-1)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)

        def run():
            kg = kflat.index_select(0, flat).view(b, hkv, L, d)
            vg = vflat.index_select(0, flat).view(b, hkv, L, d)
            return F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)

        return {"peer": "index_select+SDPA", "peer_us": timed_us(run)}

    def dense(self, r):
        self.pool = None
        self.pool_tokens = 0
        torch.cuda.empty_cache()
        b, ctx, k = r["batch"], r["ctx"], r["k"]
        hq, hkv, d = r["hq"], r["hkv"], r["d"]
        g = hq // hkv
        kc = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        scale = 1.0 / math.sqrt(d)

        def sdpa():
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

        def sdpa_scores():
            o = sdpa()
            s = torch.matmul(q.view(b, hkv, g, d), kc.transpose(-1, -2)) * scale
            return o, s

        def sdpa_scores_topk():
            o, s = sdpa_scores()
            return o, torch.topk(s.view(b, hq, ctx), k, dim=-1, sorted=False)

        out = {"sdpa_us": timed_us(sdpa)}
        if k > 0:
            out.update(peer="SDPA+q.K^T+topk", peer_us=timed_us(sdpa_scores_topk))
        else:
            out.update(peer="SDPA+q.K^T", peer_us=timed_us(sdpa_scores))
        del kc, vc
        return out

    def merge(self, r):
        j, h, d = r["states"], r["rows"], r["d"]
        o_states = torch.randn(j, h, d, device="cuda")
        lse = torch.randn(j, h, device="cuda") * 3

        def run():
            m = lse.max(dim=0).values
            w = torch.exp(lse - m)
            s = w.sum(dim=0)
            o = (w.unsqueeze(-1) * o_states).sum(dim=0) / s.unsqueeze(-1)
            return o, m + torch.log(s)

        return {"peer": "torch ops", "peer_us": timed_us(run)}

    def topk(self, r):
        x = torch.randn(r["rows"], r["n"], device="cuda")
        k = r["k"]
        t_sorted = timed_us(lambda: torch.topk(x, k, dim=-1, sorted=True))
        t_unsorted = timed_us(lambda: torch.topk(x, k, dim=-1, sorted=False))
        return {"peer": "torch.topk", "peer_us": min(t_sorted, t_unsorted), "topk_sorted_us": t_sorted,
                "topk_unsorted_us": t_unsorted}

    def loki(self, r):
        b, ctx, k = r["batch"], r["ctx"], r["k"]
        hq, hkv = r["hq"], r["hkv"]
        g, rank = hq // hkv, 32
        keys = torch.randn(b, hkv, ctx, rank, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, hkv, g, rank, device="cuda", dtype=torch.bfloat16)

        def run():
            s = torch.matmul(q, keys.transpose(-1, -2))
            if k > 0:
                return torch.topk(s.view(b, hq, ctx), k, dim=-1, sorted=False)
            return s

        return {"peer": "matmul" + ("+topk" if k > 0 else ""), "peer_us": timed_us(run)}

    def quest(self, r):
        b, pages, k = r["batch"], r["n"], r["k"]
        hq, hkv, d = r["hq"], r["hkv"], r["d"]
        g = hq // hkv
        pmax = torch.randn(b, hkv, 1, pages, d, device="cuda", dtype=torch.bfloat16)
        pmin = torch.randn(b, hkv, 1, pages, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, hkv, g, 1, d, device="cuda", dtype=torch.bfloat16)

        def run():
            s = torch.maximum(q * pmax, q * pmin).sum(dim=-1)
            return torch.topk(s.view(b, hq, pages), k, dim=-1, sorted=False)

        return {"peer": "max/sum+topk", "peer_us": timed_us(run)}

    def run(self, r):
        global _EAGER
        _EAGER = False
        fn = {"sparse_attention": self.sparse, "dense_attention": self.dense, "merge_states": self.merge,
              "top_k": self.topk, "loki_score": self.loki, "quest_score": self.quest}[r["kernel"]]
        out = fn(r)
        if _EAGER:
            out["peer"] += " (eager)"
        return out


def shape_of(r):
    k = r["kernel"]
    if k == "sparse_attention":
        gqa = "" if r["hq"] == 32 else f" hq={r['hq']}"
        return f"b={r['batch']} ctx={r['ctx'] // 1024}K L={r['tokens']} page={r['page_size']}{gqa}"
    if k == "dense_attention":
        gqa = "" if r["hq"] == 32 else f" hq={r['hq']}"
        return f"b={r['batch']} ctx={r['ctx'] // 1024}K" + (f" top{r['k']}" if r["k"] else "") + gqa
    if k == "merge_states":
        return f"heads={r['rows']} J={r['states']}"
    if k == "top_k":
        return f"rows={r['rows']} n={r['n']} k={r['k']}"
    if k == "loki_score":
        return f"b={r['batch']} ctx={r['ctx'] // 1024}K r=32" + (f" top{r['k']}" if r["k"] else "")
    return f"b={r['batch']} ctx={r['ctx'] // 1024}K pages={r['n']} top{r['k']}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    with open(os.path.join(args.dir, "device.csv")) as f:
        dev = next(csv.DictReader(f))
    ints = ("batch", "ctx", "tokens", "rows", "n", "k", "states", "page_size", "hq", "hkv", "d")
    rows = []
    with open(os.path.join(args.dir, "ours.csv")) as f:
        for r in csv.DictReader(f):
            for key in ints:
                r[key] = int(r[key])
            for key in ("ours_us", "bytes", "flops"):
                r[key] = float(r[key])
            r.setdefault("path", "auto")  # CSVs written before the path column
            rows.append(r)
    copy_gbps = float(dev["copy_gbps"])
    fma_tflops = float(dev["fma_tflops"])
    peers = Peers(rows)
    # Dense rows allocate their own contiguous K/V: run them after the sparse pool is released.
    order = sorted(range(len(rows)), key=lambda i: rows[i]["kernel"] == "dense_attention")
    measured = {}  # (kernel, shape) -> peer result, shared by the paths of one shape
    for i in order:
        r = rows[i]
        key = (r["kernel"], shape_of(r))
        if key not in measured:
            measured[key] = peers.run(r)
        r.update(measured[key])
        progress(f"{r['kernel']:<16} {shape_of(r):<40} {r['path']:<17} ours {r['ours_us']:9.1f} us  "
                 f"{r['peer']} {r['peer_us']:9.1f} us")
        torch.cuda.synchronize()

    with open(os.path.join(args.dir, "peers.csv"), "w", newline="") as f:
        keys = ["kernel", "variant", "path", "shape", "ours_us", "peer", "peer_us", "sdpa_us", "topk_sorted_us",
                "topk_unsorted_us", "bytes", "flops"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, shape=shape_of(r)))

    lines = []
    lines.append(f"Device: {dev['name']} ({dev['sms']} SMs, L2 {int(dev['l2_bytes']) >> 20} MiB); "
                 f"host CPU: {dev['cpu_model']}, {dev['cpu_cores']} cores; torch {torch.__version__}.")
    lines.append(f"Measured in the same run: device-to-device copy {copy_gbps:.0f} GB/s (read + write), "
                 f"FP32 FMA {fma_tflops:.1f} TFLOP/s.")
    lines.append("")
    lines.append("| kernel | shape | path | ours (us) | peer | peer (us) | speedup | GB/s | % of copy BW | "
                 "BW floor (us) | FLOP floor (us) |")
    lines.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bw_floor = r["bytes"] / (copy_gbps * 1e3)
        flop_floor = r["flops"] / (fma_tflops * 1e6) if r["flops"] else 0.0
        gbps = r["bytes"] / r["ours_us"] / 1e3
        peer = r["peer"]
        if r["kernel"] == "dense_attention":
            peer += f" (SDPA alone {r['sdpa_us']:.0f})"
        if r["kernel"] == "top_k":
            peer += f" (sorted {r['topk_sorted_us']:.0f} / unsorted {r['topk_unsorted_us']:.0f})"
        lines.append(f"| {r['kernel']} | {shape_of(r)} | {r['path']} | {r['ours_us']:.1f} | {peer} | {r['peer_us']:.1f} | "
                     f"{r['peer_us'] / r['ours_us']:.2f}x | {gbps:.0f} | {100 * bw_floor / r['ours_us']:.0f}% | "
                     f"{bw_floor:.1f} | {flop_floor:.1f} |")
    text = "\n".join(lines)
    with open(os.path.join(args.dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
