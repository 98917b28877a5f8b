#!/usr/bin/env python3
"""Derives the subset of etcd's v3 API that kvrecalld speaks (the KV, Lease
and Watch services and the messages they use) from the .proto files Debian's
golang-etcd-server-dev installs, at build time, so that nothing of etcd is
copied into this repository.

Field numbers, names, packages (etcdserverpb, mvccpb) and service names are
kept exactly: the wire format and the gRPC method paths
(/etcdserverpb.KV/Range, ...) must be etcd's. What is removed is what only
etcd's Go build uses: gogoproto options, google.api HTTP annotations, and the
services and messages outside the subset (Cluster, Maintenance, Auth).

    extract_etcd_protos.py <etcd source root> <output root>

writes <output root>/etcd/mvccpb/kv.proto and
<output root>/etcd/etcdserverpb/rpc.proto.
"""

import os
import re
import sys

SERVICES = ("KV", "Watch", "Lease")
NOTICE = ("// Generated at build time by proto/etcd/extract_etcd_protos.py from {src}\n"
          "// (Debian golang-etcd-server-dev): the {what} of etcd's v3 API, field numbers\n"
          "// unchanged, gogoproto and google.api options removed. Do not edit.\n")


def strip_options(text):
    text = re.sub(r'^import "(gogoproto/gogo\.proto|google/api/annotations\.proto|'
                  r'etcd/auth/authpb/auth\.proto)";\n', "", text, flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[^;]*;\n", "", text, flags=re.M)
    # option (google.api.http) = { ... }; with one level of nested braces.
    text = re.sub(r"\s*option \(google\.api\.http\) = \{(?:[^{}]|\{[^{}]*\})*\};", "", text)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    # An rpc whose options block became empty: "rpc X(..) returns (..) {\n  }" -> ";".
    text = re.sub(r"(rpc [^{;]*\))\s*\{\s*\}", r"\1;", text)
    return text


def code_of(line):
    i = line.find("//")
    return line if i < 0 else line[:i]


def split_blocks(text):
    """Top-level items: (kind, name, text) with leading comments attached."""
    lines = text.splitlines(keepends=True)
    items, pending, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(message|service|enum)\s+(\w+)", line)
        if not m:
            if line.strip().startswith("//"):
                pending.append(line)
            else:
                if pending:
                    items.append(("text", None, "".join(pending)))
                    pending = []
                items.append(("text", None, line))
            i += 1
            continue
        depth, body = 0, []
        while True:
            body.append(lines[i])
            c = code_of(lines[i])
            depth += c.count("{") - c.count("}")
            i += 1
            if depth == 0 and "{" in "".join(code_of(b) for b in body):
                break
        items.append((m.group(1), m.group(2), "".join(pending) + "".join(body)))
        pending = []
    if pending:
        items.append(("text", None, "".join(pending)))
    return items


def referenced_types(block):
    body = "\n".join(code_of(l) for l in block.splitlines())
    refs = set(re.findall(r"\b(?:rpc\s+\w+\s*\(\s*(?:stream\s+)?(\w+)\s*\)\s*returns\s*\(\s*"
                          r"(?:stream\s+)?(\w+)\s*\))", body))
    names = {n for pair in refs for n in pair}
    names |= set(re.findall(r"^\s*(?:repeated\s+|optional\s+)?(\w+)\s+\w+\s*=\s*\d+", body, re.M))
    return names


def main():
    src_root, out_root = sys.argv[1], sys.argv[2]
    kv_src = os.path.join(src_root, "mvcc/mvccpb/kv.proto")
    rpc_src = os.path.join(src_root, "etcdserver/etcdserverpb/rpc.proto")
    for path in (kv_src, rpc_src):
        if not os.path.exists(path):
            sys.exit(f"extract_etcd_protos: {path} is missing (install golang-etcd-server-dev)")

    with open(kv_src) as f:
        kv = strip_options(f.read())
    with open(rpc_src) as f:
        rpc = strip_options(f.read())
    rpc = rpc.replace('import "etcd/mvcc/mvccpb/kv.proto";', 'import "etcd/mvccpb/kv.proto";')

    items = split_blocks(rpc)
    defined = {name: block for kind, name, block in items if kind in ("message", "enum")}
    keep, todo = set(), []
    for kind, name, block in items:
        if kind == "service" and name in SERVICES:
            todo.extend(referenced_types(block))
    while todo:
        name = todo.pop()
        if name in keep or name not in defined:
            continue
        keep.add(name)
        todo.extend(referenced_types(defined[name]))
    missing = [s for s in SERVICES if not any(k == "service" and n == s for k, n, _ in items)]
    if missing:
        sys.exit(f"extract_etcd_protos: {rpc_src} lacks the services {missing}")

    out = []
    for kind, name, block in items:
        if kind == "service" and name not in SERVICES:
            continue
        if kind in ("message", "enum") and name not in keep:
            continue
        out.append(block)
    rpc_out = re.sub(r"\n{3,}", "\n\n", "".join(out))
    if "authpb." in "\n".join(code_of(l) for l in rpc_out.splitlines()):
        sys.exit("extract_etcd_protos: the subset still refers to authpb")

    for rel, text, what in (("etcd/mvccpb/kv.proto", kv, "key-value and event messages"),
                            ("etcd/etcdserverpb/rpc.proto", rpc_out,
                             "KV, Lease and Watch services")):
        path = os.path.join(out_root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src = kv_src if rel.endswith("kv.proto") else rpc_src
        content = NOTICE.format(src=src, what=what) + text
        old = open(path).read() if os.path.exists(path) else None
        if old != content:
            with open(path, "w") as f:
                f.write(content)


if __name__ == "__main__":
    main()
