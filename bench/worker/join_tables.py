"""Joins worker_bench.csv and torch_sdpa.csv (one device run) into the
markdown tables of docs/worker.md: per (context, batch), ms per decode step
of each path and its speedup over PyTorch SDPA; then the offloaded rows."""

import csv
import sys


def main(out_dir, device):
    ours = list(csv.DictReader(open(f"{out_dir}/worker_bench.csv")))
    peer = {(int(r["context"]), int(r["batch"])): float(r["ms_per_step"])
            for r in csv.DictReader(open(f"{out_dir}/torch_sdpa.csv"))}
    print(f"GPU-resident, attention of all 32 layers per decode step ({device}):\n")
    print("| context | batch | torch SDPA ms | dense (ours) ms | x SDPA | TidalDecode ms | x SDPA |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(int(r["context"]), int(r["batch"])) for r in ours if r["mode"] == "gpu-resident"})
    for key in keys:
        row = {r["policy"]: float(r["ms_per_step"]) for r in ours
               if r["mode"] == "gpu-resident" and (int(r["context"]), int(r["batch"])) == key}
        sdpa = peer.get(key)
        d, t = row.get("dense (ours)"), row.get("tidaldecode")
        ratio = lambda x: f"{sdpa / x:.2f}" if sdpa and x else "-"
        print(f"| {key[0]} | {key[1]} | {sdpa:.3f} | {d:.3f} | {ratio(d)} | {t:.3f} | **{ratio(t)}** |")
    off = [r for r in ours if r["mode"] == "offloaded"]
    if off:
        print(f"\nOffloaded, context {off[0]['context']}, batch 1 ({device}):\n")
        print("| policy | s per token | where the time went |")
        print("|---|---|---|")
        for r in off:
            print(f"| {r['policy']} | {float(r['ms_per_step']) / 1000:.4f} | {r['note']} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "GPU")
