"""The Python client against a real kvrecalld on 127.0.0.1 (conftest.py)."""

import numpy as np
import pytest

import kvrecall
from kvrecall import errors, hashing

SEED = 20261124
MODEL = "py-test-model"


def geometry(client, dtype="f16", model=MODEL):
    return client.register_model(model, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                 dtype=dtype, block_tokens=32)


def sequence(rng, tokens, dtype=np.float16):
    ids = rng.integers(0, 50000, size=tokens).tolist()
    kv = rng.standard_normal((3, 2, 2, tokens, 16)).astype(dtype)
    return ids, kv


@pytest.fixture()
def client(daemon):
    with kvrecall.Client(daemon.address, deadline_s=30) as c:
        yield c


def test_sequence_round_trip_and_layer_ranges(client):
    rng = np.random.default_rng(SEED)
    geometry(client)
    ids, kv = sequence(rng, 80)  # 2 full spans + a partial one
    before = client.lookup_tokens(MODEL, ids)
    assert before.prefix_spans == 0
    assert before.missing[0][2] == "never_stored"

    seen = []
    hashes = client.put_sequence(MODEL, ids, kv, durable=True,
                                 progress=lambda done, total: seen.append((done, total)))
    assert hashes == hashing.chain_span_hashes(MODEL, "", ids, 32, True)
    assert seen[-1][0] == seen[-1][1] == kv.nbytes

    after = client.lookup_tokens(MODEL, ids)
    assert (after.prefix_spans, after.prefix_tokens) == (2, 64)
    assert after.hashes == hashes[:2], "the server hashes token ids exactly like the client"

    back = client.get_sequence(MODEL, hashes)
    assert back.dtype == np.float16 and back.shape == kv.shape
    np.testing.assert_array_equal(back, kv)
    layer1 = client.get_sequence(MODEL, hashes, layers=(1, 2))
    np.testing.assert_array_equal(layer1, kv[1:2])

    spans = client.get_spans(MODEL, hashes)
    assert [s.found for s in spans] == [True, True, True]
    assert spans[2].num_tokens == 16
    assert spans[0].token_ids == ids[:32]
    assert spans[1].parent == hashes[0]
    assert spans[0].tier == "memory"


def test_bf16_and_f32(client):
    rng = np.random.default_rng(SEED + 1)
    geometry(client, "bf16", "py-bf16")
    ids, kv = sequence(rng, 32, np.float32)
    hashes = client.put_sequence("py-bf16", ids, kv)
    back = client.get_sequence("py-bf16", hashes)
    assert back.dtype == np.uint16
    np.testing.assert_allclose(kvrecall.bf16_to_float32(back), kv, rtol=1e-2)
    geometry(client, "f32", "py-f32")
    hashes = client.put_sequence("py-f32", ids, kv)
    np.testing.assert_array_equal(client.get_sequence("py-f32", hashes), kv)


def test_every_miss_says_why(client):
    rng = np.random.default_rng(SEED + 2)
    geometry(client)
    ids, kv = sequence(rng, 96)
    hashes = client.put_sequence(MODEL, ids, kv)
    client.delete_spans([hashes[1]])
    never = hashing.span_hash(hashes[2], [1, 2, 3])
    spans = client.get_spans(MODEL, [hashes[0], hashes[1], never])
    assert [s.miss_reason for s in spans] == ["none", "deleted", "never_stored"]
    r = client.lookup(MODEL, hashes)
    assert r.prefix_spans == 1
    assert [m[2] for m in r.missing] == ["deleted", "parent_missing"]
    with pytest.raises(errors.NotFoundError, match="deleted"):
        client.get_sequence(MODEL, hashes)
    stats = client.stats()
    reasons = {kvrecall.miss_reason_name(m.reason): m.count for m in stats.misses_by_reason}
    assert reasons["deleted"] >= 2 and reasons["never_stored"] >= 1


def test_bad_input_raises_typed_errors(client):
    rng = np.random.default_rng(SEED + 3)
    geometry(client)
    ids, kv = sequence(rng, 32)
    with pytest.raises(errors.NotFoundError):
        client.lookup("no-such-model", [])
    with pytest.raises(errors.InvalidArgumentError, match="layers"):
        client.get_spans(MODEL, [hashing.span_root_hash(MODEL)], layers=(2, 7))
    with pytest.raises(errors.InvalidArgumentError, match="16 bytes"):
        client.lookup(MODEL, [b"short"])
    with pytest.raises(errors.AlreadyExistsError):
        client.register_model(MODEL, num_layers=4, num_q_heads=4, num_kv_heads=2, head_dim=16,
                              dtype="f16", block_tokens=32)
    with pytest.raises(errors.InvalidArgumentError, match="shape"):
        client.put_sequence(MODEL, ids, kv[:, :, :, :8])
    # A span whose parent is unknown changes nothing.
    orphan = kvrecall.Span(hash=hashing.span_hash(bytes(16), ids), parent=bytes(16),
                           num_tokens=32, payload=kv, token_ids=ids)
    with pytest.raises(errors.FailedPreconditionError):
        client.put_spans(MODEL, [orphan])
    assert client.lookup(MODEL, [orphan.hash]).missing[0][2] == "never_stored"
    # A wrong payload size is rejected by the server before the payload.
    raw = kvrecall.Span(hash=hashing.chain_span_hashes(MODEL, "", ids, 32)[0],
                        parent=hashing.span_root_hash(MODEL), num_tokens=32,
                        payload=kv.tobytes()[:-2], token_ids=ids)
    with pytest.raises(errors.InvalidArgumentError, match="payload_bytes"):
        client.put_spans(MODEL, [raw])


def test_duplicate_put_is_idempotent(client):
    rng = np.random.default_rng(SEED + 4)
    geometry(client)
    ids, kv = sequence(rng, 32)
    client.put_sequence(MODEL, ids, kv)
    spans = [kvrecall.Span(hash=hashing.chain_span_hashes(MODEL, "", ids, 32)[0],
                           parent=hashing.span_root_hash(MODEL), num_tokens=32, payload=kv,
                           token_ids=list(ids))]
    assert client.put_spans(MODEL, spans)[0]["already_present"] is True


def test_pins_and_admin(client):
    rng = np.random.default_rng(SEED + 5)
    geometry(client)
    ids, kv = sequence(rng, 32)
    hashes = client.put_sequence(MODEL, ids, kv)
    assert client.pin_spans(hashes, ttl_s=60)[0][1] == "OK"
    assert client.unpin_spans(hashes)[0][1] == "OK"
    assert client.unpin_spans(hashes)[0][1] == "FAILED_PRECONDITION"
    config = client.get_config()
    assert config.api_version == "kvrecall.v1"
    client.check_compatibility()
    names = {m.model_id for m in client.list_models()}
    assert MODEL in names
    methods = {r.method for r in client.stats().rpcs}
    assert "kvrecall.v1.KvStore/PutSpans" in methods


def test_unavailable_daemon_raises_after_retries():
    c = kvrecall.Client("127.0.0.1:1", deadline_s=2, max_attempts=2, initial_backoff_s=0.01)
    with pytest.raises(errors.UnavailableError):
        c.list_models()


def test_tenants_need_tokens_and_are_isolated(auth_daemon):
    from conftest import TENANTS
    rng = np.random.default_rng(SEED + 6)
    with pytest.raises(errors.UnauthenticatedError):
        kvrecall.Client(auth_daemon.address).list_models()
    with pytest.raises(errors.UnauthenticatedError):
        kvrecall.Client(auth_daemon.address, token="token-unknown-0123456789").list_models()
    alpha = kvrecall.Client(auth_daemon.address, token=TENANTS["alpha"])
    beta = kvrecall.Client(auth_daemon.address, token=TENANTS["beta"])
    geometry(alpha)
    ids, kv = sequence(rng, 32)
    hashes = alpha.put_sequence(MODEL, ids, kv)
    # beta shares no trust group with alpha: the miss does not reveal alpha's span
    assert beta.get_spans(MODEL, hashes)[0].miss_reason == "never_stored"
    np.testing.assert_array_equal(alpha.get_sequence(MODEL, hashes), kv)
