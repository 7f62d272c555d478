"""Baseline selections against NumPy: top-k, top-p, Quest pages, InfLLM blocks, sink/window."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention import baselines
from alaya_jax.attention.masked import masked_attention, raw_scores, sink_window_mask, valid_positions
from alaya_jax.store import kv_store


def _case(lengths=(5, 77, 130), hq=6, hkv=2, d=16, bk=8, seed=0):
    rng = np.random.default_rng(seed)
    b, s = len(lengths), max(lengths)
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    for i, n in enumerate(lengths):
        k[i, n:] = np.nan
        v[i, n:] = np.nan
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), block_size=bk)
    scores = raw_scores(jnp.asarray(q), st.dense_keys())
    valid = valid_positions(st.lengths, st.capacity)
    return q, k, v, np.asarray(lengths), st, scores, valid


def _np_scores(q, k, i, h, n):
    g = q.shape[1] // k.shape[2]
    return np.sum(k[i, :n, h // g].astype(np.float64) * q[i, h], axis=-1)


def test_topk_keeps_the_k_best():
    q, k, _, ln, st, scores, valid = _case()
    m = np.asarray(baselines.topk_mask(scores, valid, k=10))
    for i, n in enumerate(ln):
        for h in range(q.shape[1]):
            want = set(np.argsort(-_np_scores(q, k, i, h, n))[: min(10, n)])
            assert set(np.nonzero(m[i, h])[0]) == want


def test_topp_is_smallest_set_with_mass_p():
    q, k, _, ln, st, scores, valid = _case(seed=1)
    for p in (0.5, 0.9, 1.0):
        m = np.asarray(baselines.topp_mask(scores, valid, p=p, head_dim=16))
        for i, n in enumerate(ln):
            for h in range(q.shape[1]):
                sc = _np_scores(q, k, i, h, n) / 4.0
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                order = np.argsort(-pr)
                need = int(np.searchsorted(np.cumsum(pr[order]), p - 1e-6) + 1)
                got = np.nonzero(m[i, h])[0]
                assert abs(len(got) - min(need, n)) <= 1  # f32 vs f64 cumulative sums at the boundary
                assert pr[got].sum() >= p - 1e-4


def test_quest_pages_by_min_max_bound():
    q, k, _, ln, st, scores, valid = _case(seed=2)
    kmin, kmax = kv_store.block_summaries(st.keys, st.lengths)
    m = np.asarray(baselines.quest_mask(jnp.asarray(q), kmin, kmax, valid, num_blocks=3))
    bk, g = 8, 3
    for i, n in enumerate(ln):
        nb = -(-n // bk)
        for h in range(q.shape[1]):
            kb = [k[i, j * bk: min(n, (j + 1) * bk), h // g] for j in range(nb)]
            ub = [np.sum(np.maximum(q[i, h] * x.max(0), q[i, h] * x.min(0))) for x in kb]
            keep = np.argsort(-np.array(ub))[: min(3, nb)]
            want = np.zeros(st.capacity, bool)
            for j in keep:
                want[j * bk: min(n, (j + 1) * bk)] = True
            np.testing.assert_array_equal(m[i, h], want)


def test_infllm_blocks_by_mean_key():
    q, k, _, ln, st, scores, valid = _case(seed=3)
    m = np.asarray(baselines.infllm_mask(jnp.asarray(q), st.keys, valid, num_blocks=2))
    bk, g = 8, 3
    for i, n in enumerate(ln):
        nb = -(-n // bk)
        for h in range(q.shape[1]):
            rep = [k[i, j * bk: min(n, (j + 1) * bk), h // g].mean(0) @ q[i, h] for j in range(nb)]
            keep = np.argsort(-np.array(rep))[: min(2, nb)]
            want = np.zeros(st.capacity, bool)
            for j in keep:
                want[j * bk: min(n, (j + 1) * bk)] = True
            np.testing.assert_array_equal(m[i, h], want)


def test_sink_window_and_masked_attention_ignore_nan_padding():
    q, k, v, ln, st, scores, valid = _case(seed=4)
    sw = sink_window_mask(st.lengths, st.capacity, sink=2, window=5)
    for i, n in enumerate(ln):
        want = np.zeros(st.capacity, bool)
        want[: min(2, n)] = True
        want[max(0, n - 5): n] = True
        np.testing.assert_array_equal(np.asarray(sw[i]), want)
    mask = jnp.broadcast_to(sw[:, None, :], scores.shape)
    out, lse = masked_attention(jnp.asarray(q), st.dense_keys(), st.dense_values(), mask)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    i, h = 1, 4
    idx = np.nonzero(np.asarray(sw[i]))[0]
    sc = np.sum(k[i, idx, h // 3].astype(np.float64) * q[i, h], -1) / math.sqrt(16)
    w = np.exp(sc - sc.max())
    np.testing.assert_allclose(np.asarray(out[i, h]), (w / w.sum()) @ v[i, idx, h // 3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(lse[i, h]), sc.max() + np.log(w.sum()), rtol=1e-5)


@pytest.mark.parametrize("fn,kw", [(baselines.topk_mask, dict(k=0))])
def test_budget_zero_is_an_error(fn, kw):
    _, _, _, _, _, scores, valid = _case()
    with pytest.raises(ValueError, match="budget"):
        fn(scores, valid, **kw)
