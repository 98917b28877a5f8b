#!/usr/bin/python3
"""Draws a kvrecall_soak CSV: the daemon's RSS and each operation's p50/p99
latency per second (docs/reliability.md).

    /usr/bin/python3 deploy/soak_plot.py soak.csv docs/images/soak.png [title]
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPS = ["put", "get", "lookup", "attend", "delete"]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"soak_plot: {sys.argv[1]} has no samples", file=sys.stderr)
        return 1
    t = [float(r["t_s"]) for r in rows]
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax_rss.plot(t, [float(r["rss_mib"]) for r in rows], color="black", label="kvrecalld RSS")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_ops = ax_rss.twinx()
    ax_ops.plot(t, [float(r["ops"]) for r in rows], color="tab:gray", alpha=0.5, label="ops/s")
    ax_ops.set_ylabel("operations / s")
    ax_rss.legend(loc="upper left")
    ax_ops.legend(loc="upper right")
    for i, op in enumerate(OPS):
        colour = f"C{i}"
        ax_lat.plot(t, [float(r[f"{op}_p50_ms"]) for r in rows], color=colour, label=f"{op} p50")
        ax_lat.plot(t, [float(r[f"{op}_p99_ms"]) for r in rows], color=colour, linestyle="--",
                    label=f"{op} p99")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms, log)")
    ax_lat.set_xlabel("time (s)")
    ax_lat.legend(ncol=5, fontsize="small", loc="upper center")
    if len(sys.argv) > 3:
        fig.suptitle(sys.argv[3])
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())
