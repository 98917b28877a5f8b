"""Layer policies (the decode worker's JSON role tables, docs/worker.md) for
the rows of the fidelity table and the examples.

Each function returns a dict in the kvrecall.layer_policy.v1 format; the
worker validates it when a session is created. Budgets are a fraction of the
context (`budget`) or positions per query head (`k`); selected positions
come from outside the sinks and the recent window.
"""

import copy
import json

FORMAT = "kvrecall.layer_policy.v1"


def _policy(name, layers, sinks, window):
    return {"format": FORMAT, "name": name, "num_layers": len(layers), "sinks": sinks,
            "window": window, "layers": layers}


def _budget(budget=None, k=None):
    if (budget is None) == (k is None):
        raise ValueError("give exactly one of budget (a fraction) or k (positions per head)")
    return {"budget": float(budget)} if budget is not None else {"k": int(k)}


def full(num_layers, sinks=4, window=64):
    """Every layer attends to every position."""
    return _policy("full", [{"role": "full"} for _ in range(num_layers)], sinks, window)


def sinks_window(num_layers, sinks=4, window=64):
    """StreamingLLM-style: the sinks and the recent window (plus the one
    exact top-scoring position a select layer must take: k = 1)."""
    layers = [{"role": "select", "where": "local", "kind": "exact", "k": 1}
              for _ in range(num_layers)]
    return _policy(f"sinks{sinks}+window{window}", layers, sinks, window)


def uniform(num_layers, kind, where="local", budget=None, k=None, num_full=0, sinks=4,
            window=64, effort=0, knobs=""):
    """Every layer (after the first num_full) selects its own top-k with
    `kind` (RetrievalAttention / Quest / Loki style)."""
    spec = {"role": "select", "where": where, "kind": kind, **_budget(budget, k)}
    if effort:
        spec["effort"] = int(effort)
    if knobs:
        spec["knobs"] = knobs
    layers = [{"role": "full"} for _ in range(num_full)]
    layers += [copy.deepcopy(spec) for _ in range(num_layers - num_full)]
    amount = f"{budget:g}" if budget is not None else f"k{k}"
    return _policy(f"{where}-{kind}-{amount}", layers, sinks, window)


def tidal(num_layers, select_layer=2, reselect_layer=None, budget=None, k=None, num_full=None,
          sinks=4, window=64, remote_kind=None, effort=0):
    """TidalDecode (Yang et al., 2024): layers before `select_layer` full;
    `select_layer` full attention that also keeps its exact top-k; later
    layers reuse it until `reselect_layer`, which selects again (full with a
    budget) for the rest. remote_kind: the selection layers are
    SELECT(remote, kind) instead (offloaded contexts)."""
    num_full = select_layer if num_full is None else num_full
    b = _budget(budget, k)
    layers = []
    source = None
    for layer in range(num_layers):
        if layer < num_full:
            layers.append({"role": "full"})
        elif layer == select_layer or layer == reselect_layer:
            if remote_kind:
                spec = {"role": "select", "where": "remote", "kind": remote_kind, **b}
                if effort:
                    spec["effort"] = int(effort)
            else:
                spec = {"role": "full", **b}
            layers.append(spec)
            source = layer
        elif source is None:
            layers.append({"role": "full"})
        else:
            layers.append({"role": "reuse", "source": source})
    name = f"tidal-s{select_layer}" + (f"-r{reselect_layer}" if reselect_layer is not None else "")
    return _policy(name, layers, sinks, window)


def selection_layers(policy):
    """Layers that choose positions (select, or full with a budget)."""
    return [i for i, s in enumerate(policy["layers"])
            if s["role"] == "select" or (s["role"] == "full" and ("k" in s or "budget" in s))]


def load(path):
    """A policy from a JSON file (e.g. `kvrecall profile-policy -o policy.json`)."""
    with open(path) as f:
        return json.load(f)


def needs_offloaded(policy):
    """True when some layer selects through kvrecalld (where = remote)."""
    return any(s.get("where") == "remote" for s in policy["layers"])


def kinds(policy):
    """The selection kinds a policy uses, by where: {"local": set, "remote": set}."""
    out = {"local": set(), "remote": set()}
    for s in policy["layers"]:
        if s["role"] == "select":
            out[s.get("where", "local")].add(s["kind"])
    return out
