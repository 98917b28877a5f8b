"""Retrieval through the Python client against a real kvrecalld (conftest.py):
contexts, index builds, search, partial attention merged into exact
attention, one BatchAttend stream, artifacts, typed errors."""

import numpy as np
import pytest

import kvrecall
from kvrecall import errors

SEED = 7
MODEL = "py-retrieval-model"
L, HQ, HKV, D, BLOCK = 2, 4, 2, 16, 32


@pytest.fixture()
def client(daemon):
    with kvrecall.Client(daemon.address, deadline_s=60) as c:
        yield c


def stored_context(client, tokens=100, salt=""):
    rng = np.random.default_rng(SEED)
    client.register_model(MODEL, num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          dtype="f32", block_tokens=BLOCK)
    ids = rng.integers(0, 256, size=tokens).tolist()
    kv = rng.standard_normal((L, 2, HKV, tokens, D)).astype(np.float32)
    hashes = client.put_sequence(MODEL, ids, kv, salt=salt)
    ctx = client.open_context(MODEL, hashes)
    return ctx, kv, rng


def full_attention(kv, layer, q, positions):
    """numpy float64 attention of q [HQ, D] over `positions`: (o, lse)."""
    o = np.zeros((HQ, D))
    lse = np.zeros(HQ)
    for h in range(HQ):
        k = kv[layer, 0, h // (HQ // HKV), positions].astype(np.float64)
        v = kv[layer, 1, h // (HQ // HKV), positions].astype(np.float64)
        s = k @ q[h].astype(np.float64) / np.sqrt(D)
        m = s.max()
        w = np.exp(s - m)
        lse[h] = m + np.log(w.sum())
        o[h] = (w / w.sum()) @ v
    return o, lse


def test_attend_merged_with_a_local_partial_is_exact_attention(client):
    ctx, kv, rng = stored_context(client)
    assert ctx.num_tokens == 100 and ctx.num_spans == 4
    q = rng.standard_normal((HQ, D)).astype(np.float32)
    # The worker holds sinks [0, 4) and the window [80, 100) itself.
    remote = client.attend(ctx.context, 1, q, kind="all", exclude=[(0, 4), (80, 100)])
    local_pos = np.r_[0:4, 80:100]
    o_local, lse_local = full_attention(kv, 1, q, local_pos)
    o, lse = kvrecall.merge_attention([(remote.out, remote.lse), (o_local, lse_local)])
    o_ref, lse_ref = full_attention(kv, 1, q, np.arange(100))
    assert np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref) < 1e-5
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_build_search_and_stream(client):
    ctx, kv, rng = stored_context(client, salt="stream")
    prefill = rng.standard_normal((100, HQ, D)).astype(np.float32)
    assert client.add_queries(ctx.context, 0, prefill) == 100
    with pytest.raises(errors.FailedPreconditionError, match="build"):
        client.search(ctx.context, 0, prefill[0], k=5, kind="roar")
    seen = []
    op = client.build_index(ctx.context, "roar", progress=seen.append)
    assert op.state == kvrecall.retrieval.retrieval_pb2.OPERATION_STATE_DONE
    assert seen and seen[-1].fraction == 1.0
    assert len(client.list_indexes(ctx.context)) == L * HKV

    q = rng.standard_normal((HQ, D)).astype(np.float32)
    exact = client.search(ctx.context, 0, q, k=5, kind="all")
    got = client.search(ctx.context, 0, q, k=5, kind="roar", effort=1 << 20)  # max effort: exact
    for h in range(HQ):
        np.testing.assert_array_equal(got.positions[h], exact.positions[h])
        k = kv[0, 0, h // 2].astype(np.float64) @ q[h].astype(np.float64)
        np.testing.assert_array_equal(np.sort(got.positions[h]), np.sort(np.argsort(-k)[:5]))

    reqs = [client.attend_request(ctx.context, layer, q, k=5, kind="roar", request_id=layer)
            for layer in (0, 1, 0)]
    results = list(client.attend_stream(reqs))
    assert [r.request_id for r in results] == [0, 1, 0]
    np.testing.assert_array_equal(results[0].out, results[2].out)
    bad = [client.attend_request(ctx.context, 5, q, k=5, kind="roar")]
    with pytest.raises(errors.InvalidArgumentError):
        list(client.attend_stream(bad))
    client.delete_index(ctx.context, "roar")
    with pytest.raises(errors.NotFoundError):
        client.delete_index(ctx.context, "roar")


def test_bad_requests_raise_typed_errors(client):
    ctx, kv, rng = stored_context(client, salt="errors")
    q = rng.standard_normal((HQ, D)).astype(np.float32)
    with pytest.raises(errors.InvalidArgumentError, match="finite"):
        client.attend(ctx.context, 0, np.full((HQ, D), np.nan, np.float32), kind="all")
    with pytest.raises(errors.InvalidArgumentError):
        client.attend(ctx.context, 0, q[:2], kind="all")
    with pytest.raises(errors.InvalidArgumentError, match="larger"):
        client.search(ctx.context, 0, q, k=101, kind="all")
    with pytest.raises(errors.InvalidArgumentError, match="disjoint"):
        client.search(ctx.context, 0, q, k=3, kind="all", exclude=[(0, 10), (5, 20)])
    with pytest.raises(errors.NotFoundError, match="unknown context"):
        client.search(b"\x01" * 16, 0, q, k=3, kind="all")
    with pytest.raises(errors.NotFoundError):
        client.open_context(MODEL, [b"\x02" * 16])


def test_artifacts_are_versioned(client):
    stored_context(client, salt="artifacts")
    data = bytes(range(256)) * 9000  # several chunks
    a = client.put_artifact(MODEL, "head_roles", data, "first")
    b = client.put_artifact(MODEL, "head_roles", b"second", "second")
    assert (a.version, b.version) == (b.version - 1, b.version)
    info, got = client.get_artifact(MODEL, "head_roles", a.version)
    assert got == data and info.description == "first"
    assert client.get_artifact(MODEL, "head_roles")[1] == b"second"
    assert any(x.kind == "head_roles" for x in client.list_artifacts(MODEL))
    with pytest.raises(errors.NotFoundError):
        client.get_artifact(MODEL, "nothing")


def test_merge_attention_is_stable_and_has_an_identity():
    o1, l1 = np.array([[1.0, 0.0]]), np.array([1000.0])
    o2, l2 = np.array([[0.0, 1.0]]), np.array([0.0])
    o, lse = kvrecall.merge_attention([(o1, l1), (o2, l2)])
    np.testing.assert_allclose(o, [[1.0, 0.0]])
    np.testing.assert_allclose(lse, [1000.0])
    empty = (np.zeros((1, 2)), np.array([-np.inf]))
    o, lse = kvrecall.merge_attention([empty, (o2, l2)])
    np.testing.assert_allclose(o, o2)
    o, lse = kvrecall.merge_attention([empty, empty])
    assert np.isneginf(lse[0]) and np.all(o == 0)
