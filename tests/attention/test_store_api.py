"""The functional store API (new_store / append / attend) and filtered queries.

A filtered DIPR query must equal DIPR run by brute force on the filtered keys alone (gathered into
a store of their own): identical masks, zero false negatives, on ragged lengths, a GQA ratio
other than 1 and NaN-poisoned padding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alaya_jax
from alaya_jax import AttentionConfig
from alaya_jax.attention import registry
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
from alaya_jax.attention.store_api import filter_mask
from tests.support.dipr_cases import np_attention, np_dipr_mask, store_case

_dipr = jax.jit(dipr_store_attention, static_argnames=("sink", "window", "with_mask", "implementation",
                                                        "num_splits", "refine_programs"))
# Jitted: one compilation per shape is far cheaper on the CPU than running the ops one by one.
_attend = jax.jit(alaya_jax.attend, static_argnames=("attention", "layout", "layer"))
_append = jax.jit(alaya_jax.append, static_argnames=("layout",))


def sw_mask(ln, s, sink, window):
    pos = np.arange(s)[None]
    return (pos < ln[:, None]) & ((pos < sink) | (pos >= ln[:, None] - window))


def np_filtered_dipr(q, k, beta, ln, filt, sink, window):
    """bool [B,Hq,S]: DIPR over the visible keys (valid, in the filter or sink/window) computed on
    those keys alone — gathered into a compact array and given to the NumPy brute force."""
    b, s = filt.shape
    vis = (np.arange(s)[None] < ln[:, None]) & (filt | sw_mask(ln, s, sink, window))
    out = np.zeros((b, q.shape[1], s), bool)
    for i in range(b):
        if vis[i].any():  # the filtered keys alone, as a sequence of their own
            out[i][:, vis[i]] = np_dipr_mask(q[i: i + 1], k[i: i + 1, vis[i]], beta, [int(vis[i].sum())])[0]
    return out, vis


RANGES = np.array([[[0, 0], [0, 0]], [[40, 90], [200, 260]], [[0, 500], [600, 601]]], np.int32)  # [B, R, 2]


@pytest.mark.parametrize("sink,window", [(4, 16), (0, 0)])
def test_filtered_dipr_equals_brute_force_on_the_filtered_keys(sink, window):
    lengths = [3, 300, 700]
    q, k, v, ln, st = store_case(lengths, 6, 2, 32, 32, seed=21)
    filt = np.asarray(filter_mask(RANGES, st))[:, : k.shape[1]]
    for beta in (0.0, 2.0, 30.0, math.inf):
        out, stats, mask = _dipr(jnp.asarray(q), st, beta=jnp.float32(beta), sink=sink, window=window,
                                 with_mask=True, key_mask=filter_mask(RANGES, st))
        want, vis = np_filtered_dipr(q, k, beta, ln, filt, sink, window)
        got = np.asarray(mask)[:, :, : k.shape[1]]
        assert not (want & ~got).any(), f"false negatives at beta={beta}"
        np.testing.assert_array_equal(got, want)
        # never a candidate outside what the query may see
        assert (np.asarray(stats.candidates) <= vis.sum(1)[:, None]).all()
        attended = want | sw_mask(ln, k.shape[1], sink, window)[:, None]
        np.testing.assert_allclose(np.asarray(out)[1:], np_attention(q[1:], k[1:], v[1:], attended[1:]),
                                   rtol=2e-5, atol=2e-5)
        if not attended[0].any():  # sequence 0 sees nothing: output 0, never NaN
            np.testing.assert_array_equal(np.asarray(out)[0], 0.0)


def test_filtered_pallas_and_every_candidate_paths_are_exact():
    q, k, v, ln, st = store_case([5, 200], 4, 2, 32, 32, seed=22)
    ranges = np.array([[60, 120], [190, 10**6]], np.int32)
    filt = np.asarray(filter_mask(ranges, st))[:, : k.shape[1]]
    # pallas: chunks of the dropped (-1) slots dealt over two refine programs; β = 1000: every key a candidate
    for beta, kw in ((4.0, dict(implementation="pallas", num_splits=2, refine_programs=2)),
                     (1000.0, dict(implementation="pallas", num_splits=2, refine_programs=2)),
                     (1000.0, dict(num_splits=2))):
        out, stats, mask = _dipr(jnp.asarray(q), st, beta=jnp.float32(beta), sink=2, window=8, with_mask=True,
                                 key_mask=filter_mask(ranges, st), **kw)
        want, _ = np_filtered_dipr(q, k, beta, ln, filt, 2, 8)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], want)
        attended = want | sw_mask(ln, k.shape[1], 2, 8)[:, None]
        np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, attended), rtol=2e-5, atol=2e-5)
        if beta == 1000.0:  # every searched key in the filter is a candidate, none outside
            vis = filt & ~sw_mask(ln, k.shape[1], 2, 8) & (np.arange(k.shape[1])[None] < ln[:, None])
            np.testing.assert_array_equal(np.asarray(stats.candidates), np.repeat(vis.sum(1)[:, None], 2, 1))


def _layouts(q, k, v):
    """q [B,Hq,D], k/v [B,S,Hkv,D] → a store built by append in layout bhtd, and q [B,Hq,1,D]."""
    b, s, hkv, d = k.shape
    st = alaya_jax.new_store(batch=b, num_kv_heads=hkv, head_dim=d, capacity=s + 7, block_size=16)
    st = _append(st, jnp.swapaxes(jnp.asarray(k), 1, 2), jnp.swapaxes(jnp.asarray(v), 1, 2), layout="bhtd")
    return st, jnp.asarray(q)[:, :, None, :]


def test_attend_filter_forms_layouts_and_methods():
    q, k, v, ln, _ = store_case([150, 150], 8, 2, 16, 16, seed=23)  # no padding: finite keys
    st, qh = _layouts(q, k, v)
    ranges = np.array([[10, 40], [100, 120]], np.int32)
    bool_mask = np.zeros(130, bool)
    bool_mask[10:40] = bool_mask[100:120] = True
    # one filter, three ways to say it: ranges, a mask shorter than the capacity, a [B, S] mask
    forms = [np.asarray(filter_mask(p, st)) for p in (ranges, bool_mask, np.stack([bool_mask] * 2), ranges[None])]
    for f in forms[1:]:
        np.testing.assert_array_equal(f, forms[0])
    vis = forms[0][:, :150]
    want = np_attention(q, k, v, np.broadcast_to(vis[:, None], (2, 8, 150)))
    for method in ("full", "dipr"):
        cfg = AttentionConfig(method=method, beta=math.inf, sink=0, window=0)
        out = np.asarray(_attend(qh, st, attention=cfg, layout="bhtd", positions=jnp.asarray(ranges))[0])
        np.testing.assert_allclose(out[:, :, 0], want, rtol=2e-5, atol=2e-5)
    # the same store and query in the other layout give the same output
    o_bthd, _ = _attend(jnp.swapaxes(qh, 1, 2), st, attention=cfg, positions=jnp.asarray(ranges))
    np.testing.assert_allclose(np.asarray(o_bthd)[:, 0], out[:, :, 0], rtol=1e-6, atol=1e-6)
    # a selection method keeps to the filter too; sink and window stay visible
    cfg = AttentionConfig(method="topk", budget=8, sink=2, window=4)
    _, mask, _ = registry.get("topk").attend(jnp.asarray(q), st, cfg, beta=0.0, top_p=1.0, with_mask=True,
                                             key_mask=filter_mask(ranges, st))
    mask = np.asarray(mask)[:, :, :150]
    sw = sw_mask(ln, 150, 2, 4)
    assert not (mask & ~(vis | sw)[:, None]).any() and (mask & vis[:, None]).sum(-1).min() >= 8 - 6


def test_prefill_chunk_with_a_filter_is_causal_within_it():
    rng = np.random.default_rng(24)
    b, t0, t, h, d = 1, 60, 5, 2, 16
    k, v, q = (rng.normal(size=(b, t0 + t, h, d)).astype(np.float32) for _ in range(3))
    st = alaya_jax.new_store(batch=b, num_kv_heads=h, head_dim=d, capacity=80, block_size=16)
    st = _append(st, jnp.asarray(k), jnp.asarray(v))
    cfg = AttentionConfig(method="dipr", sink=0, window=0)
    out, stats = _attend(jnp.asarray(q[:, t0:]), st, attention=cfg, positions=jnp.array([(20, 30), (t0, 10**6)]))
    assert stats == {}
    for r in range(t):
        vis = np.zeros((1, t0 + t), bool)
        vis[0, 20:30] = True
        vis[0, t0: t0 + r + 1] = True  # the chunk's own rows, causally
        want = np_attention(q[:, t0 + r], k, v, np.broadcast_to(vis[:, None], (1, h, t0 + t)))
        np.testing.assert_allclose(np.asarray(out)[:, r], want, rtol=2e-5, atol=2e-5)


def test_bad_input_errors():
    st = alaya_jax.new_store(batch=1, num_kv_heads=2, head_dim=16, capacity=32, block_size=16)
    q = jnp.zeros((1, 4, 16))
    k = jnp.zeros((1, 3, 2, 16))
    q4 = q[:, None]
    with pytest.raises(ValueError, match="head layout"):
        alaya_jax.attend(q4, st, layout="tbhd")
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\]"):
        alaya_jax.attend(q, st)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        alaya_jax.attend(q4[:, :, :3], st)
    with pytest.raises(ValueError, match="does not match the store"):
        alaya_jax.attend(q4[..., :8], st)
    with pytest.raises(ValueError, match="resolve"):
        alaya_jax.attend(q4, st, attention=AttentionConfig(method="auto"))
    with pytest.raises(ValueError, match="positions mask"):
        alaya_jax.attend(q4, st, positions=np.ones(st.capacity + 1, bool))
    with pytest.raises(ValueError, match="ranges"):
        alaya_jax.attend(q4, st, positions=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="start <= end"):
        alaya_jax.attend(q4, st, positions=[(5, 2)])
    with pytest.raises(TypeError, match="boolean mask or integer"):
        alaya_jax.attend(q4, st, positions=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="equal shapes"):
        alaya_jax.append(st, k, k[:, :2])
    with pytest.raises(ValueError, match="key_mask"):
        dipr_store_attention(q, st, beta=1.0, key_mask=jnp.ones((1, 3), bool))
