"""kvrecall.worker: the decode worker's C ABI through ctypes, on the CPU
backend, against a numpy float64 attention reference; and an offloaded
session through a real kvrecalld."""

import json

import numpy as np
import pytest

import kvrecall
from kvrecall.worker import Session, WorkerError, validate_policy

L, HQ, HKV, D = 3, 4, 2, 64
SINKS, WINDOW, K = 2, 6, 8


def policy(select="exact", where="local"):
    layers = [{"role": "full", "k": K}, {"role": "reuse", "source": 0},
              {"role": "select", "where": where, "kind": select, "k": K}]
    return {"format": "kvrecall.layer_policy.v1", "name": "pytest", "num_layers": L,
            "sinks": SINKS, "window": WINDOW, "layers": layers}


def attention(q, k, v, positions):
    """float64 attention of q [d] over rows `positions` of k, v [T, d]."""
    kk = k[positions].astype(np.float64)
    logits = kk @ q.astype(np.float64) / np.sqrt(D)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return w @ v[positions].astype(np.float64)


def random_kv(rng, layers, t):
    """bf16 bit patterns [layers, 2, HKV, t, D] and their float32 values."""
    bits = kvrecall.float32_to_bf16(rng.standard_normal((layers, 2, HKV, t, D)).astype(np.float32))
    return bits, kvrecall.bf16_to_float32(bits)


def test_policy_validation_names_the_layer():
    assert "reuse" in validate_policy(policy())
    bad = policy()
    bad["layers"][1]["source"] = 2
    with pytest.raises(WorkerError) as e:
        validate_policy(bad)
    assert e.value.code == 3 and "layer 1" in e.value.message


def test_resident_session_matches_reference():
    rng = np.random.default_rng(11)
    t0 = 40
    bits, vals = random_kv(rng, L, t0)
    s = Session(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, policy=policy(),
                capacity_tokens=64, backend="cpu")
    s.start_prefix([t0])
    for layer in range(L):
        s.load_prefix_layer(layer, bits[layer, 0][None], bits[layer, 1][None])
    keys = [vals[layer, 0] for layer in range(L)]    # [HKV, T, D] float32 per layer
    values = [vals[layer, 1] for layer in range(L)]
    for step in range(4):
        t = t0 + step + 1
        selection = None
        for layer in range(L):
            q = (2 * rng.standard_normal((1, HQ, D))).astype(np.float32)
            kb, kv_ = random_kv(rng, 1, 1)
            keys[layer] = np.concatenate([keys[layer], kv_[0, 0]], axis=1)
            values[layer] = np.concatenate([values[layer], kv_[0, 1]], axis=1)
            out = s.attend_layer(layer, q, np.ascontiguousarray(kb[0, 0, :, 0]),
                                 np.ascontiguousarray(kb[0, 1, :, 0]))
            assert out.shape == (1, HQ, D) and out.dtype == np.float32
            local = list(range(SINKS)) + list(range(t - WINDOW, t))
            for h in range(HQ):
                g = h // (HQ // HKV)
                if layer == 0:
                    positions = list(range(t))
                    chosen = s.selection(0, 0, h)
                    # The exact top-K of the candidates [SINKS, t - WINDOW).
                    cand = np.arange(SINKS, t - WINDOW)
                    scores = keys[0][g][cand] @ q[0, h].astype(np.float64)
                    assert sorted(chosen) == sorted(cand[np.argsort(-scores)[:K]].tolist())
                elif layer == 1:
                    positions = local + s.selection(0, 0, h)
                else:
                    positions = local + s.selection(2, 0, h)
                ref = attention(q[0, h], keys[layer][g], values[layer][g], positions)
                err = np.linalg.norm(out[0, h] - ref) / np.linalg.norm(ref)
                assert err < 1e-5, (step, layer, h, err)
    assert s.seq_len() == t0 + 4
    assert s.stats()["steps"] == 4
    with pytest.raises(WorkerError) as e:
        s.attend_layer(2, q, np.zeros((1, HKV, D), np.uint16), np.zeros((1, HKV, D), np.uint16))
    assert e.value.code == 9 and "expected layer 0" in e.value.message
    s.close()


def test_offloaded_session_agrees_with_resident(daemon):
    rng = np.random.default_rng(12)
    t0 = 70
    client = kvrecall.Client(daemon.address)
    model = "worker-pytest"
    client.register_model(model, num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          dtype="bf16", block_tokens=32)
    bits, _ = random_kv(rng, L, t0)
    tokens = rng.integers(0, 256, t0).tolist()
    hashes = client.put_sequence(model, tokens, bits)

    resident = Session(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                       policy=policy(), capacity_tokens=96, backend="cpu")
    offloaded = Session(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                        policy=policy("all", "remote"), capacity_tokens=96, backend="cpu",
                        mode="offloaded", target=daemon.address, model_id=model)
    resident.start_prefix([t0])
    offloaded.start_prefix([t0], [hashes])
    for s in (resident, offloaded):
        for layer in range(L):
            s.load_prefix_layer(layer, bits[layer, 0][None], bits[layer, 1][None])
    for step in range(10):
        for layer in range(L):
            q = rng.standard_normal((1, HQ, D)).astype(np.float32)
            kb, _ = random_kv(rng, 1, 1)
            k_new = np.ascontiguousarray(kb[0, 0, :, 0][None])
            v_new = np.ascontiguousarray(kb[0, 1, :, 0][None])
            a = resident.attend_layer(layer, q, k_new, v_new)
            b = offloaded.attend_layer(layer, q, k_new, v_new)
            assert np.max(np.abs(a - b)) < 1e-4 * max(1.0, np.max(np.abs(a))), (step, layer)
    stats = offloaded.stats()
    assert stats["remote_calls"] >= 10 * L and stats["append_us"] > 0
    resident.close()
    offloaded.close()
