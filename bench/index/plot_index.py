#!/usr/bin/python3
"""Recall@100 against % of keys scanned, one panel per evaluation set and one
curve per index kind, from the CSV written by index_bench; with --table, also
prints a markdown table of each kind's cheapest swept point reaching
recall@100 >= 0.95.

    /usr/bin/python3 bench/index/plot_index.py index_bench.csv index_bench.png [--table]
"""
import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def print_table(rows, sets, kinds):
    """Markdown: per set, each kind's cheapest point with recall@100 >= 0.95."""
    print("| set | keys | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name in sets:
        cells = []
        n = ""
        for kind in kinds:
            pts = [r for r in rows if r["set"] == name and r["kind"] == kind
                   and r["us_per_query_1t"] and float(r["recall100"]) >= 0.95]
            if not pts:
                cells.append("not reached")
                continue
            best = min(pts, key=lambda r: float(r["pct_scanned"]))
            n = best["n"]
            cells.append("%.1f%% / %.0f us" % (float(best["pct_scanned"]),
                                               float(best["us_per_query_1t"])))
        print("| %s | %s | %s |" % (name, n, " | ".join(cells)))


def main(argv):
    table = "--table" in argv
    argv = [a for a in argv if a != "--table"]
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print("plot_index: no rows in " + argv[1], file=sys.stderr)
        return 1
    sets = []
    for r in rows:
        if r["set"] not in sets:
            sets.append(r["set"])
    kinds = []
    for r in rows:
        if r["kind"] not in kinds and not r["kind"].startswith(("oracle", "sink")):
            kinds.append(r["kind"])
    cols = min(4, len(sets))
    nrows = math.ceil(len(sets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(sets):
        ax = axes[i // cols][i % cols]
        for j, kind in enumerate(kinds):
            pts = sorted(
                (float(r["pct_scanned"]), float(r["recall100"]))
                for r in rows
                if r["set"] == name and r["kind"] == kind
            )
            if not pts:
                continue
            x = [max(p[0], 0.01) for p in pts]
            y = [p[1] for p in pts]
            ax.plot(x, y, marker="o", markersize=3, label=kind, color=colors[j % len(colors)])
        for r in rows:
            if r["set"] == name and r["kind"] == "sink+window":
                ax.axhline(float(r["recall100"]), color="gray", linestyle=":", linewidth=1,
                           label="sinks+window (2%)")
        ax.axhline(0.95, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlim(0.1, 100)
        ax.set_ylim(0, 1.01)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("% of keys scanned")
        ax.set_ylabel("recall@100")
        ax.grid(True, which="both", alpha=0.3)
    for i in range(len(sets), nrows * cols):
        axes[i // cols][i % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(argv[2], dpi=110)
    if table:
        print_table(rows, sets, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
