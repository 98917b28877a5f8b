"""Joins the tables of several fidelity.py runs over the same windows (a run
that stopped at its deadline, then one for the rows it skipped) into one
fidelity.csv, fidelity.md and fidelity.png, rows in the order of the first
run that has them; a row measured twice keeps its first measurement.

    python3 bench/e2e/merge_runs.py OUT_DIR RUN1.json RUN2.json ...
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (write_outputs, markdown, plot)


def main(out_dir, runs):
    table, seen, meta = [], set(), None
    for path in runs:
        data = json.loads(pathlib.Path(path).read_text())
        m = data["meta"]
        if meta is None:
            meta = dict(m)
            meta["checks"] = list(m.get("checks", []))
            meta["seconds"] = 0.0
        elif m["windows"] != meta["windows"] or m["decode"] != meta["decode"]:
            raise SystemExit(f"{path}: other windows or decode length than the first run")
        meta["seconds"] += m.get("seconds", 0.0)
        for r in data["rows"]:
            key = (r["row"], r["mode"])
            if key not in seen:
                seen.add(key)
                table.append(r)
        for c in m.get("checks", []):
            if c not in meta["checks"]:
                meta["checks"].append(c)
    measured = {f"{r} ({m})" for r, m in seen}
    meta["skipped_rows"] = [s for s in meta.get("skipped_rows", [])
                            if s.rsplit(" windows", 1)[0] not in measured]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fidelity.write_outputs(out, table, meta)
    print(fidelity.markdown(table, meta))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
