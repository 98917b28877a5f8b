#!/usr/bin/env python3
"""Prefix reuse: time to first token of a prompt whose leading spans are
already in kvrecalld (warm: Lookup, GetSpans of the stored K/V, prefill of
the rest) against prefilling it all (cold), in the same run, and the bytes
moved; the logits of both agree to bf16 rounding (docs/e2e.md).

    PYTHONPATH=build/python KVRECALL_WORKER_LIB=build/lib/libkvrecall_worker.so \\
      python3 bench/e2e/prefix_reuse.py --kvrecalld=build/bin/kvrecalld --model=MODEL --corpus=dev.txt
"""

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fidelity import Daemon, machine_name  # noqa: E402

from kvrecall.integrations.llama import LlamaRunner  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--kvrecalld", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length")
    ap.add_argument("--shared", type=int, default=7936, help="tokens shared with a stored prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d = Daemon(a.kvrecalld)
    try:
        r = LlamaRunner(a.model, device=a.device, target=d.address, model_id="prefix-reuse")
        text = open(a.corpus, "rb").read()
        base = list(text[:a.tokens])
        r.prompt(base)  # stores the spans of the first prompt
        rows = []
        for i in range(a.repeats):
            other = base[:a.shared] + list(text[a.tokens * (i + 2):a.tokens * (i + 2) + a.tokens - a.shared])
            cold = r.prompt(other, reuse=False, store=False)
            warm = r.prompt(other, reuse=True, store=False)
            diff = (warm.logits - cold.logits).abs().max().item()
            same = bool((warm.logits.argmax(-1) == cold.logits.argmax(-1)).all())
            rows.append((cold.timings["ttft_s"], warm.timings, warm.reused_tokens[0],
                         warm.bytes_fetched, diff, same))
        print(f"Prefix reuse on {machine_name(r.model.device)} ({r.model.device}): prompt "
              f"{a.tokens} tokens, {a.shared} shared with a stored prompt "
              f"({rows[0][2]} reused in whole spans of {r.block_tokens}); median of {a.repeats}")
        rows.sort(key=lambda x: x[1]["ttft_s"])
        cold_t = sorted(x[0] for x in rows)[len(rows) // 2]
        ttft, t, reused, fetched, diff, same = rows[len(rows) // 2]
        print("| | time to first token | lookup | fetch (GetSpans) | prefill compute | bytes fetched |")
        print("|---|---|---|---|---|---|")
        print(f"| cold | {1000 * cold_t:.1f} ms | – | – | {1000 * cold_t:.1f} ms | 0 |")
        print(f"| warm | {1000 * t['ttft_s']:.1f} ms | {1000 * t['lookup_s']:.1f} ms | "
              f"{1000 * t['fetch_s']:.1f} ms | {1000 * t['compute_s']:.1f} ms | "
              f"{fetched / 1048576:.1f} MiB |")
        print(f"warm / cold: {t['ttft_s'] / cold_t:.2f}; logits max |diff| {diff:.2e}, same next "
              f"token: {same}; fetch rate {fetched / 1048576 / max(t['fetch_s'], 1e-9):.0f} MiB/s")
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(main())
