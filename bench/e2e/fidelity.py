#!/usr/bin/env python3
"""Fidelity of kvrecall's decode policies in the model's own loss (docs/e2e.md).

Teacher-forced, on dev.txt: each window is 8192 + 1 bytes; the first
8192 - D positions are prefilled with full attention, then the last D are
decoded one token at a time through the decode worker (the true next byte is
fed at every step) under each policy. Per row: bits per byte over the D
decode predictions, the difference to full attention, and the top-1
next-byte agreement with full attention.

Windows decode as one batch in lockstep; each batch's prefill is reused by
every row, its spans are stored once and each offloaded index is built once
per window (the contexts are closed between rows, so the next row starts
from the prompt; the built indexes persist).

    PYTHONPATH=build/python KVRECALL_WORKER_LIB=build/lib/libkvrecall_worker.so \\
      /usr/bin/python3 bench/e2e/fidelity.py --kvrecalld=build/bin/kvrecalld \\
      --kvrecall=build/bin/kvrecall --model=MODEL_DIR --corpus=dev.txt --select=4 --out=OUT

--quick: 2 windows of 2048 bytes, D = 64, 5% budgets (a CI-sized check).
"""

import argparse
import csv
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from kvrecall.integrations import policies as P
from kvrecall.integrations.llama import LlamaRunner, bits_per_byte, causal_attention

LOCAL_KINDS = ["exact", "loki", "quest"]
REMOTE_KINDS = ["flat", "roar", "loki", "quest", "inverted", "faiss_hnsw"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Daemon:
    """kvrecalld on 127.0.0.1 port 0 with a fresh data directory."""

    def __init__(self, binary, memory="8GiB"):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-fidelity-"))
        port = self.dir / "port"
        self.log = open(self.dir / "kvrecalld.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "--listen=127.0.0.1:0", f"--port_file={port}", f"--data_dir={self.dir / 'data'}",
             f"--memory_capacity_bytes={memory}", "--disk_capacity_bytes=16GiB",
             "--rocksdb_capacity_bytes=16GiB"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvrecalld did not start: {(self.dir / 'kvrecalld.log').read_text()}")
            time.sleep(0.02)
        self.address = f"127.0.0.1:{int(port.read_text())}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- rows -------------------------------------------------------------------

def build_rows(num_layers, budgets, sinks, window, prompt_tokens, tidal_budget, offloaded,
               extra_policies, kinds_filter):
    """[(name, group, budget, mode, policy)]: group is the plot series."""
    rows = [("full", "full", 1.0, "gpu_resident", P.full(num_layers, sinks, window)),
            (f"sinks{sinks}+window{window}", "sinks+window", None, "gpu_resident",
             P.sinks_window(num_layers, sinks, window))]
    k2 = math.ceil(tidal_budget * prompt_tokens)
    rows.append((f"sinks{sinks}+window{window + k2} (same tokens as {tidal_budget:g})",
                 "sinks+window", tidal_budget, "gpu_resident",
                 P.sinks_window(num_layers, sinks, window + k2)))
    local_rows = []
    for kind in LOCAL_KINDS:
        if kinds_filter and f"local:{kind}" not in kinds_filter:
            continue
        for b in budgets:
            name = "oracle exact" if kind == "exact" else f"local {kind}"
            row = (f"{name} {b:g}", f"local {kind}", b, "gpu_resident",
                   P.uniform(num_layers, kind, "local", budget=b, sinks=sinks, window=window))
            (rows if kind == "exact" else local_rows).append(row)
    reselects = [None] + list(range(3, num_layers))
    for r in reselects:
        pol = P.tidal(num_layers, select_layer=2, reselect_layer=r, budget=tidal_budget, sinks=sinks,
                      window=window)
        rows.append((f"{pol['name']} {tidal_budget:g}", "tidal", tidal_budget, "gpu_resident", pol))
    for name, pol in extra_policies:
        mode = "offloaded" if P.needs_offloaded(pol) else "gpu_resident"
        rows.append((name, name, tidal_budget, mode, pol))
    if offloaded:
        rows.append(("full", "full", 1.0, "offloaded", P.full(num_layers, sinks, window)))
        rows.append((f"remote all {tidal_budget:g}", "remote all", tidal_budget, "offloaded",
                     P.uniform(num_layers, "all", "remote", budget=tidal_budget, sinks=sinks,
                               window=window)))
        mid = num_layers // 2 + 1
        pol = P.tidal(num_layers, select_layer=2, reselect_layer=mid, budget=tidal_budget,
                      sinks=sinks, window=window)
        rows.append((f"{pol['name']} {tidal_budget:g}", "tidal", tidal_budget, "offloaded", pol))
        for kind in REMOTE_KINDS:
            if kinds_filter and f"remote:{kind}" not in kinds_filter:
                continue
            for b in budgets:
                rows.append((f"remote {kind} {b:g}", f"remote {kind}", b, "offloaded",
                             P.uniform(num_layers, kind, "remote", budget=b, sinks=sinks,
                                       window=window)))
    rows += local_rows
    return rows


# --- windows ----------------------------------------------------------------

def window_bytes(corpus, index, length):
    return corpus[index * length:index * length + length + 1]


@torch.no_grad()
def screen_windows(runner, corpus, candidates, length, decode, sinks, window, batch):
    """Per candidate window: bits/byte of its last `decode` predictions with
    the whole window as context and with only the sinks + window + decode
    region (a short prefill): the gap is how much the decode region depends
    on distant context."""
    out = []
    m = runner.model
    for c0 in range(0, len(candidates), batch):
        ids = candidates[c0:c0 + batch]
        w = torch.tensor([list(window_bytes(corpus, i, length)) for i in ids])
        full = m.prefill(w[:, :-1], logits="all").logits[:, -decode:]
        bits_full = bits_per_byte(full, w[:, -decode:]).mean(axis=1)
        short_len = decode + window
        short_in = torch.cat([w[:, :sinks], w[:, -1 - short_len:-1]], dim=1)
        short = m.prefill(short_in, logits="all").logits[:, -decode:]
        bits_short = bits_per_byte(short, w[:, -decode:]).mean(axis=1)
        for i, bf, bs in zip(ids, bits_full, bits_short):
            out.append({"window": int(i), "bits_full": float(bf), "bits_local": float(bs),
                        "gap": float(bs - bf)})
            log(f"screen window {i}: full context {bf:.3f}, sinks+window only {bs:.3f} bits/byte")
    return out


@torch.no_grad()
def attention_stats(prompt, budgets, sinks, window, last=128):
    """Per layer, over the last `last` prompt positions' queries (full causal
    attention): mass on sinks + window, mass of the exact top-b of the
    remaining candidates, and the layer's entropy in bits."""
    rows = []
    t = prompt.num_tokens
    for layer, (k, v) in enumerate(prompt.kv):
        q = prompt.queries[layer][:, t - last:]  # [B, last, Hq, d]
        b, n, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        kk = k.float()
        qq = q.view(b, n, hkv, g, d)
        scores = torch.einsum("bnhgd,bshd->bhgns", qq, kk) / math.sqrt(d)
        pos = torch.arange(t, device=q.device)
        qpos = torch.arange(t - last, t, device=q.device)
        scores = scores.masked_fill(pos[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1)  # [B, Hkv, g, n, S]
        local = (pos[None, :] < sinks) | (pos[None, :] >= (qpos[:, None] + 1 - window))
        mass_local = (p * local).sum(-1).mean().item()
        ent = -(p.clamp_min(1e-30).log2() * p).sum(-1).mean().item()
        row = {"layer": layer, "mass_sinks_window": mass_local, "entropy_bits": ent}
        cand = p.masked_fill(local, 0)
        srt = cand.sort(dim=-1, descending=True).values
        for bud in budgets:
            kk_ = math.ceil(bud * t)
            row[f"mass_top_{bud:g}"] = srt[..., :kk_].sum(-1).mean().item()
        rows.append(row)
    return rows


# --- HyLRA ------------------------------------------------------------------

def hylra_policy(args, corpus, length, out_dir, budget, max_compute, n_full):
    """Captures a calibration window (a different part of dev.txt) with
    kvrecall-capture and profiles it with `kvrecall profile-policy`."""
    cap = out_dir / "hylra_capture"
    tmp_text = out_dir / "hylra_window.bin"
    tmp_text.write_bytes(corpus)
    cmd = [sys.executable, "-m", "kvrecall.integrations.capture", f"--model={args.model}",
           f"--text={tmp_text}", f"--offset={args.calibration_window * length}", f"--bytes={length}",
           f"-o{cap}"]
    if args.device:
        cmd.append(f"--device={args.device}")
    subprocess.run(cmd, check=True)
    tmp_text.unlink()
    policy_file = out_dir / f"hylra-c{max_compute}.json"
    cmd = [args.kvrecall, "--progress=never", "profile-policy", f"--captures={cap}",
           f"--model={args.model_id}",
           f"--budget={budget}", f"--max_compute={max_compute}", f"--n_full={n_full}",
           "--select=local:exact", f"--sinks={args.sinks}", f"--window={args.window}",
           "--reuse_full", f"--steps=last:{min(256, args.decode)}", f"-o{policy_file}"]
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    shutil.rmtree(cap, ignore_errors=True)
    return P.load(policy_file)


# --- main -------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--model_id", default="kvr-tiny-llama")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--target", help="a running kvrecalld (else --kvrecalld starts one)")
    ap.add_argument("--kvrecalld", help="kvrecalld binary to start on a port-0 loopback")
    ap.add_argument("--kvrecall", help="kvrecall CLI (for profile-policy: the HyLRA row)")
    ap.add_argument("--hylra", default="", help="HyLRA policy JSON file(s), comma-separated (else "
                    "profiled with --kvrecall on --calibration_window)")
    ap.add_argument("--policy", action="append", default=[],
                    help="extra row NAME=FILE.json (any role table); repeatable")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--window_bytes", type=int, default=8192)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--windows", default="", help="window indexes, comma-separated")
    ap.add_argument("--select", type=int, default=0,
                    help="pick the N windows (of --candidates) whose decode region depends most "
                         "on distant context")
    ap.add_argument("--candidates", default="", help="window indexes to screen (default: all)")
    ap.add_argument("--batch", type=int, default=4, help="windows decoded in lockstep")
    ap.add_argument("--budgets", default="0.01,0.02,0.05")
    ap.add_argument("--tidal_budget", type=float, default=0.02)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--calibration_window", type=int, default=-1,
                    help="window index of the calibration text (Loki bases, sparse encoders, "
                         "HyLRA); default: the last window of the corpus")
    ap.add_argument("--kinds", default="", help="only these selection kinds, e.g. "
                    "local:exact,remote:roar (default: all)")
    ap.add_argument("--no_offloaded", action="store_true", help="GPU-resident rows only")
    ap.add_argument("--rows", default="", help="regex: only rows whose name matches")
    ap.add_argument("--deadline_s", type=float, default=0,
                    help="skip the rows that would start after this many seconds (0: none)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--machine", default="", help="machine description for the report")
    args = ap.parse_args(argv)
    if args.quick:
        args.window_bytes, args.decode = 2048, 64
        args.budgets = "0.05"
        args.tidal_budget = 0.05
        if not args.windows and not args.select:
            args.windows = "20,40"
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = pathlib.Path(args.corpus).read_bytes()
    length, decode = args.window_bytes, args.decode
    n_windows = (len(corpus) - 1) // length
    if args.calibration_window < 0:
        args.calibration_window = n_windows - 1
    budgets = [float(b) for b in args.budgets.split(",") if b]
    kinds_filter = set(k for k in args.kinds.split(",") if k)

    daemon = None
    target = args.target
    offloaded = not args.no_offloaded
    if offloaded and target is None:
        if not args.kvrecalld:
            ap.error("offloaded rows need --target or --kvrecalld (or pass --no_offloaded)")
        daemon = Daemon(args.kvrecalld)
        target = daemon.address
    try:
        return run(args, corpus, length, decode, n_windows, budgets, kinds_filter, target,
                   offloaded, out_dir)
    finally:
        if daemon is not None:
            daemon.stop()


def run(args, corpus, length, decode, n_windows, budgets, kinds_filter, target, offloaded, out_dir):
    t_start = time.time()
    runner = LlamaRunner(args.model, device=args.device, target=target, model_id=args.model_id)
    dev = runner.model.device
    cfg = runner.config
    prompt_tokens = length - decode

    # Windows.
    screened = []
    if args.windows:
        windows = [int(w) for w in args.windows.split(",")]
    else:
        cands = [int(c) for c in args.candidates.split(",") if c] or list(range(n_windows))
        cands = [c for c in cands if c != args.calibration_window]
        screened = screen_windows(runner, corpus, cands, length, decode, args.sinks, args.window,
                                  args.batch)
        screened.sort(key=lambda r: -r["gap"])
        windows = sorted(r["window"] for r in screened[:args.select or 4])
    if args.calibration_window in windows:
        raise SystemExit("the calibration window must not be an evaluated window")
    log(f"windows {windows} ({length} bytes, prompt {prompt_tokens}, decode {decode}); "
        f"calibration window {args.calibration_window}")

    # Calibration: Loki bases (local loki rows, the service's loki) and
    # sparse encoders (inverted) from a window not evaluated.
    calib = list(window_bytes(corpus, args.calibration_window, length)[:length])
    need_sparse = offloaded and (not kinds_filter or "remote:inverted" in kinds_filter)
    t0 = time.time()
    versions = runner.calibrate(calib, upload=target is not None, sparse_encoder=need_sparse,
                                progress=log)
    log(f"calibration ({len(calib)} tokens): {versions} in {time.time() - t0:.1f} s")

    extra = []
    for item in args.policy:
        name, _, path = item.partition("=")
        extra.append((name, P.load(path)))
    hylra_files = [f for f in args.hylra.split(",") if f]
    tidal_compute = 4  # tidal-s2-rR: layers 0, 1 full, 2 and R select
    if hylra_files:
        for f in hylra_files:
            pol = P.load(f)
            extra.append((f"hylra {pathlib.Path(f).stem}", pol))
    elif args.kvrecall:
        pol = hylra_policy(args, corpus, length, out_dir, args.tidal_budget, tidal_compute, 2)
        extra.append((f"hylra c{tidal_compute} {args.tidal_budget:g}", pol))

    rows = build_rows(cfg.num_layers, budgets, args.sinks, args.window, prompt_tokens,
                      args.tidal_budget, offloaded, extra, kinds_filter)
    if args.rows:
        rows = [r for r in rows if re.search(args.rows, r[0]) or r[0] == "full"]
    log(f"{len(rows)} rows")

    results = {}  # (name, mode) -> dict(bits=[...], top1=[...], seconds)
    stats_rows = []
    skipped = []
    for b0 in range(0, len(windows), args.batch):
        ids = windows[b0:b0 + args.batch]
        w = torch.tensor([list(window_bytes(corpus, i, length)) for i in ids])
        inputs, labels = w[:, prompt_tokens:length], w[:, prompt_tokens + 1:length + 1]
        t0 = time.time()
        prompt = runner.prompt(w[:, :prompt_tokens], reuse=False, store=target is not None,
                               keep_queries=True)
        log(f"windows {ids}: prefill {prompt_tokens} tokens in {time.time() - t0:.1f} s")
        stats_rows += [dict(r, windows=ids) for r in attention_stats(
            prompt, budgets, args.sinks, args.window, last=min(128, prompt_tokens // 2))]
        if target is not None:
            runner.send_queries(prompt)
        prompt.queries = None
        full_top1 = None
        for name, group, budget, mode, policy in rows:
            if args.deadline_s and time.time() - t_start > args.deadline_s and name != "full":
                skipped.append(f"{name} ({mode}) windows {ids}")
                continue
            t0 = time.time()
            dec = runner.decoder(prompt, policy, mode, decode)
            setup = time.time() - t0
            t0 = time.time()
            try:
                logits = runner.decode_steps(dec, inputs)
                stats = dec.stats()
            finally:
                dec.close()
                if mode == "offloaded":
                    runner.close_contexts(prompt)
            secs = time.time() - t0
            bits = bits_per_byte(logits, labels)  # [B, D]
            top1 = logits.argmax(-1).cpu()
            if name == "full" and mode == "gpu_resident":
                full_top1 = top1
            agree = (top1 == full_top1).float().numpy() if full_top1 is not None else None
            r = results.setdefault((name, mode), {"name": name, "group": group, "budget": budget,
                                                  "mode": mode, "bits": [], "agree": [],
                                                  "seconds": 0.0, "setup_s": 0.0, "steps": 0,
                                                  "policy": policy.get("name", name),
                                                  "remote_calls": 0})
            r["bits"].append(bits)
            if agree is not None:
                r["agree"].append(agree)
            r["seconds"] += secs
            r["setup_s"] += setup
            r["steps"] += decode
            r["remote_calls"] += stats.get("remote_calls", 0)
            log(f"  {mode:12s} {name:44s} {bits.mean():.4f} bits/byte  {secs:6.1f} s "
                f"(+{setup:.1f} s setup)")
            write_outputs(out_dir, *summarize(results, args, windows, length, decode,
                                              prompt_tokens, dev, cfg, t_start, screened,
                                              stats_rows, skipped), plot_it=False)

    table, meta = summarize(results, args, windows, length, decode, prompt_tokens, dev, cfg,
                            t_start, screened, stats_rows, skipped)
    write_outputs(out_dir, table, meta, bits_by_row={
        f"{mode}: {name}": np.concatenate(r["bits"]) for (name, mode), r in results.items()})
    print(markdown(table, meta))
    return 0 if all(c["ok"] for c in meta["checks"]) else 1


def summarize(results, args, windows, length, decode, prompt_tokens, dev, cfg, t_start, screened,
              stats_rows, skipped):
    full_all = np.concatenate(results[("full", "gpu_resident")]["bits"])
    full_bits = full_all.mean()
    table = []
    for (name, mode), r in results.items():
        bits = np.concatenate(r["bits"])
        paired = (bits - full_all[:len(bits)]).ravel()
        agree = np.concatenate(r["agree"]).mean() if r["agree"] else float("nan")
        table.append({"row": name, "mode": mode, "group": r["group"], "budget": r["budget"],
                      "policy": r["policy"], "bits_per_byte": float(bits.mean()),
                      "delta": float(bits.mean() - full_bits),
                      "delta_se": float(paired.std(ddof=1) / np.sqrt(paired.size)) if paired.size > 1 else 0.0,
                      "top1_agreement": float(agree),
                      "ms_per_step": 1000 * r["seconds"] / max(1, r["steps"]),
                      "setup_s": r["setup_s"], "remote_calls": r["remote_calls"],
                      "windows_done": len(r["bits"])})
    checks = agreement_checks(results, args.tidal_budget, cfg.num_layers)
    meta = {"windows": windows, "window_bytes": length, "decode": decode,
            "prompt_tokens": prompt_tokens, "calibration_window": args.calibration_window,
            "device": str(dev), "machine": args.machine or machine_name(dev),
            "torch": torch.__version__, "seconds": round(time.time() - t_start, 1),
            "screened": screened, "attention_stats": stats_rows, "checks": checks,
            "sinks": args.sinks, "window": args.window, "skipped_rows": skipped}
    return table, meta


def agreement_checks(results, budget, num_layers):
    """GPU-resident vs offloaded (a real kvrecalld) on the rows that exist in
    both: |difference| <= 1e-3 bits/byte."""
    def mean(key):
        r = results.get(key)
        return None if r is None else float(np.concatenate(r["bits"]).mean())

    mid = num_layers // 2 + 1
    pairs = [(("full", "gpu_resident"), ("full", "offloaded")),
             ((f"oracle exact {budget:g}", "gpu_resident"), (f"remote all {budget:g}", "offloaded")),
             ((f"oracle exact {budget:g}", "gpu_resident"), (f"remote flat {budget:g}", "offloaded")),
             ((f"tidal-s2-r{mid} {budget:g}", "gpu_resident"),
              (f"tidal-s2-r{mid} {budget:g}", "offloaded"))]
    out = []
    for a, b in pairs:
        ma, mb = mean(a), mean(b)
        if ma is None or mb is None:
            continue
        out.append({"resident": a[0], "offloaded": b[0], "resident_bits": ma,
                    "offloaded_bits": mb, "diff": mb - ma, "ok": abs(mb - ma) <= 1e-3})
    return out


def machine_name(dev):
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name += f", {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    return name


def markdown(table, meta):
    lines = [f"Fidelity on {meta['machine']} ({meta['device']}): windows {meta['windows']} of "
             f"{meta['window_bytes']} bytes, prompt {meta['prompt_tokens']}, decode "
             f"{meta['decode']} teacher-forced steps; sinks {meta['sinks']}, window "
             f"{meta['window']}; {meta['seconds']:.0f} s in all.", "",
             "| row | mode | bits/byte | Δ vs full (± s.e.) | top-1 agreement | ms/step |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['row']} | {r['mode']} | {r['bits_per_byte']:.4f} | "
                     f"{r['delta']:+.4f} ± {r.get('delta_se', 0):.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['ms_per_step']:.1f} |")
    if meta.get("skipped_rows"):
        lines += ["", "Skipped (time): " + "; ".join(meta["skipped_rows"])]
    if meta["checks"]:
        lines += ["", "| GPU-resident row | offloaded row | resident | offloaded | difference | ≤ 1e-3 |",
                  "|---|---|---|---|---|---|"]
        for c in meta["checks"]:
            lines.append(f"| {c['resident']} | {c['offloaded']} | {c['resident_bits']:.5f} | "
                         f"{c['offloaded_bits']:.5f} | {c['diff']:+.1e} | "
                         f"{'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)


def write_outputs(out_dir, table, meta, plot_it=True, bits_by_row=None):
    with open(out_dir / "fidelity.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(table[0]))
        wr.writeheader()
        wr.writerows(table)
    (out_dir / "fidelity.json").write_text(json.dumps({"rows": table, "meta": meta}, indent=1))
    if bits_by_row:
        np.savez_compressed(out_dir / "fidelity_bits.npz", **bits_by_row)
    (out_dir / "fidelity.md").write_text(markdown(table, meta) + "\n")
    if not plot_it:
        return
    try:
        plot(out_dir / "fidelity.png", table, meta)
    except ImportError as e:  # no matplotlib (the GPU machine): the CSV has everything
        log(f"no plot: {e}")


def plot(path, table, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    series = {}
    for r in table:
        if r["group"] in ("full", "sinks+window") or r["budget"] is None:
            continue
        if r["group"].startswith(("local", "remote")):
            series.setdefault((r["group"], r["mode"]), []).append((r["budget"], r["bits_per_byte"]))
    for (g, mode), pts in sorted(series.items()):
        pts.sort()
        ax.plot([100 * b for b, _ in pts], [y for _, y in pts], marker="o",
                linestyle="--" if g.startswith("remote") else "-", label=g)
    tid = [r for r in table if r["group"] == "tidal" and r["mode"] == "gpu_resident"]
    if tid:
        best = min(tid, key=lambda r: r["bits_per_byte"])
        ax.scatter([100 * best["budget"]], [best["bits_per_byte"]], marker="*", s=150,
                   color="black", zorder=5, label=f"best {best['row']}")
    for r in table:
        if r["group"] == "full" and r["mode"] == "gpu_resident":
            ax.axhline(r["bits_per_byte"], color="gray", label="full attention")
        if r["group"] == "sinks+window" and r["budget"] is None:
            ax.axhline(r["bits_per_byte"], color="red", linestyle=":", label=r["row"])
        if r["group"].startswith("hylra"):
            ax.scatter([100 * r["budget"]], [r["bits_per_byte"]], marker="^", s=90, zorder=5,
                       label=r["row"])
    ax.set_xscale("log")
    ax.set_xlabel("selected tokens per query head (% of the context)")
    ax.set_ylabel("bits per byte over the decode region")
    ax.set_title(f"kvr-tiny-llama, {len(meta['windows'])} windows x {meta['decode']} decode steps "
                 f"({meta['machine']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
