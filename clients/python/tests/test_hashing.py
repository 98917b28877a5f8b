"""kvrecall.hashing passes the shared span-hash vectors (docs/hashing.md)."""

import pathlib

import pytest

from kvrecall import hashing

VECTORS = pathlib.Path(__file__).resolve().parents[3] / "tests" / "vectors" / "span_hash_vectors.tsv"


def load_cases():
    cases = []
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        model, salt, block, partial, tokens, root, hashes = line.split("\t")
        cases.append(dict(model=model, salt=salt, block=int(block), partial=partial == "1",
                          tokens=[int(t) for t in tokens.split(",") if t], root=root,
                          hashes=[h for h in hashes.split(",") if h]))
    return cases


CASES = load_cases()


def test_there_are_vectors():
    assert len(CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-{c['block']}-{len(c['tokens'])}")
def test_vectors(case):
    assert hashing.span_root_hash(case["model"], case["salt"]).hex() == case["root"]
    got = hashing.chain_span_hashes(case["model"], case["salt"], case["tokens"], case["block"],
                                    case["partial"])
    assert [h.hex() for h in got] == case["hashes"]


def test_chain_is_span_hash_of_parent():
    root = hashing.span_root_hash("m", "s")
    h0 = hashing.span_hash(root, [1, 2])
    assert hashing.chain_span_hashes("m", "s", [1, 2, 3, 4], 2) == [h0, hashing.span_hash(h0, [3, 4])]


def test_bad_input_raises():
    with pytest.raises(ValueError):
        hashing.span_hash(b"short", [1])
    with pytest.raises(ValueError):
        hashing.span_hash(bytes(16), [-1])
    with pytest.raises(ValueError):
        hashing.chain_span_hashes("m", "", [1], 0)
