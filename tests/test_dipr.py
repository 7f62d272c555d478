"""DIPR: brute-force jnp against NumPy, and the block-pruned store path against brute force.

Exactness is asserted as identical masks (zero false negatives, zero false
positives), never as a tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax import kv_store
from alaya_jax.dipr import dipr_attention, dipr_mask
from alaya_jax.dipr_store import dipr_store_attention
from pallas_kernels import default_rounding_slack

RAGGED = [1, 3, 513, 1023, 4097]


def np_dipr_mask(q, k, beta, lengths):
    """q [B,Hq,D], k [B,S,Hkv,D] → bool [B,Hq,S] in float64 arithmetic on f32-rounded inputs."""
    b, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    out = np.zeros((b, hq, s), bool)
    for i in range(b):
        for h in range(hq):
            # Elementwise product + sum: identical rows give identical scores (BLAS gemv may not).
            sc = np.sum(k[i, : lengths[i], h // g].astype(np.float64) * q[i, h].astype(np.float64), axis=-1)
            out[i, h, : lengths[i]] = sc >= sc.max() - beta
    return out


def np_attention(q, k, v, mask):
    b, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, hq, d))
    for i in range(b):
        for h in range(hq):
            idx = np.nonzero(mask[i, h])[0]
            sc = k[i, idx, h // g].astype(np.float64) @ q[i, h].astype(np.float64) / math.sqrt(d)
            w = np.exp(sc - sc.max())
            out[i, h] = (w / w.sum()) @ v[i, idx, h // g].astype(np.float64)
    return out


def make_case(rng, lengths, hq, hkv, d, *, poison=True, dtype=np.float32, int_valued=False):
    b, s = len(lengths), max(lengths)
    if int_valued:
        q = rng.integers(-3, 4, size=(b, hq, d)).astype(np.float32)
        k = rng.integers(-3, 4, size=(b, s, hkv, d)).astype(np.float32)
    else:
        q = rng.normal(size=(b, hq, d)).astype(np.float32) * 2
        k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    if poison:
        for i, ln in enumerate(lengths):
            k[i, ln:] = np.nan
            v[i, ln:] = np.nan
    q, k, v = (np.array(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    return q, k, v, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("beta", [0.0, 3.0, 50.0, 1000.0, math.inf])
def test_dipr_mask_matches_numpy(hq, hkv, beta):
    rng = np.random.default_rng(hq * 7 + hkv)
    q, k, _, ln = make_case(rng, RAGGED, hq, hkv, 64, int_valued=True)
    got = np.asarray(dipr_mask(jnp.asarray(q), jnp.asarray(k), beta=beta, lengths=jnp.asarray(ln)))
    np.testing.assert_array_equal(got, np_dipr_mask(q, k, beta, ln))


def test_dipr_mask_exact_ties_at_max_minus_beta():
    # Integer scores are exact in f32: keys tied at exactly max - beta must be in, max - beta - 1 out.
    d, s = 4, 300
    q = np.zeros((1, 1, d), np.float32)
    q[0, 0, 0] = 1.0
    k = np.zeros((1, s, 1, d), np.float32)
    k[0, :, 0, 0] = 10.0  # many keys tied at exactly max - beta
    k[0, 17, 0, 0] = 30.0  # the max
    k[0, 200:210, 0, 0] = 9.0  # just below
    m = np.asarray(dipr_mask(jnp.asarray(q), jnp.asarray(k), beta=20.0))[0, 0]
    assert m.sum() == s - 10 and not m[200:210].any() and m[17]


def test_dipr_attention_matches_numpy_with_sink_window():
    rng = np.random.default_rng(1)
    q, k, v, ln = make_case(rng, [5, 70, 301], 6, 2, 16)
    beta, sink, window = 4.0, 2, 8
    got = np.asarray(dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta,
                                    lengths=jnp.asarray(ln), sink=sink, window=window))
    mask = np_dipr_mask(q, k, beta, ln)
    for i, n in enumerate(ln):
        mask[i, :, : min(sink, n)] = True
        mask[i, :, max(0, n - window): n] = True
    np.testing.assert_allclose(got, np_attention(q, k, v, mask), rtol=2e-5, atol=2e-5)


def _store_case(lengths, hq, hkv, d, bk, *, seed=0, dtype=np.float32, int_valued=False, adversarial=None):
    rng = np.random.default_rng(seed)
    q, k, v, ln = make_case(rng, lengths, hq, hkv, d, dtype=dtype, int_valued=int_valued)
    if adversarial == "hidden_high":
        # One very high key hidden in a block of low keys, for every sequence longer than 2 blocks.
        for i, n in enumerate(ln):
            if n > 2 * bk:
                k[i, : n] = -np.abs(k[i, : n])
                pos = bk + 7
                k[i, pos] = 0
                k[i, pos, :, :] = np.sign(q[i, :: hq // hkv]) * 5
    elif adversarial == "all_equal":
        for i, n in enumerate(ln):
            k[i, :n] = k[i, 0]
    elif adversarial == "large_norm":
        k = k * 1e3
        q = q * 1e2
    st = kv_store.from_dense(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(ln), block_size=bk)
    return q, k, v, ln, st


@pytest.mark.parametrize(
    "lengths,hq,hkv,d,bk",
    [
        (RAGGED, 4, 4, 64, 64),
        (RAGGED, 6, 2, 64, 32),
        ([3, 200, 777], 8, 2, 128, 16),
    ],
)
@pytest.mark.parametrize("beta", [0.0, 2.0, 30.0, math.inf])
def test_store_path_equals_brute_force(lengths, hq, hkv, d, bk, beta):
    q, k, v, ln, st = _store_case(lengths, hq, hkv, d, bk, seed=len(lengths) + hq)
    out, stats, mask = dipr_store_attention(jnp.asarray(q), st, beta=beta, sink=4, window=16, with_mask=True)
    want = np_dipr_mask(q, k, beta, ln)
    got = np.asarray(mask)[:, :, : k.shape[1]]
    assert not (want & ~got).any(), "false negatives"
    np.testing.assert_array_equal(got, want)
    assert int(stats.overflow) == 0
    # the store path's attention widens the compare by its rounding slack (superset, never fewer keys)
    ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta, lengths=jnp.asarray(ln),
                         sink=4, window=16, rounding_slack=default_rounding_slack(d))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adversarial", ["hidden_high", "all_equal", "large_norm"])
@pytest.mark.parametrize("hq,hkv,top_r", [(3, 1, 4), (8, 2, 4), (8, 2, 0)])
def test_store_path_adversarial(adversarial, hq, hkv, top_r):
    q, k, v, ln, st = _store_case([1, 130, 1000], hq, hkv, 64, 32, seed=3, adversarial=adversarial)
    for beta in (0.0, 1.0, 40.0):
        _, stats, mask = dipr_store_attention(jnp.asarray(q), st, beta=beta, sink=0, window=0, with_mask=True,
                                              top_r=top_r)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_store_path_exact_ties_integer_keys():
    q, k, v, ln, st = _store_case([257, 1025], 4, 2, 64, 32, seed=5, int_valued=True)
    for beta in (0.0, 1.0, 5.0, 12.0):
        _, _, mask = dipr_store_attention(jnp.asarray(q), st, beta=beta, sink=0, window=0, with_mask=True)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_store_path_bf16():
    q, k, v, ln, st = _store_case([100, 513], 8, 2, 64, 32, seed=9, dtype=jnp.bfloat16)
    qb = jnp.asarray(q, jnp.bfloat16)
    out, _, mask = dipr_store_attention(qb, st, beta=10.0, sink=4, window=16, with_mask=True)
    qf = np.asarray(qb.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(qf, k, 10.0, ln))
    ref = dipr_attention(qb.astype(jnp.float32), jnp.asarray(k), jnp.asarray(v), beta=10.0,
                         lengths=jnp.asarray(ln), sink=4, window=16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_overflow_takes_exact_dense_path_and_is_counted():
    q, k, v, ln, st = _store_case([600, 900], 4, 2, 32, 16, seed=11)
    beta = 1000.0  # every block qualifies: far more than the 3 slots
    out, stats, mask = dipr_store_attention(jnp.asarray(q), st, beta=beta, sink=0, window=0,
                                            max_kept_blocks=3, with_mask=True)
    assert int(stats.overflow) == 1
    np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))
    np.testing.assert_array_equal(np.asarray(stats.blocks_kept), np.array([[38, 38], [57, 57]]))
    # A capacity that holds every block: no overflow, still exact.
    _, stats2, mask2 = dipr_store_attention(jnp.asarray(q), st, beta=0.0, sink=0, window=0,
                                            max_kept_blocks=57, with_mask=True)
    assert int(stats2.overflow) == 0
    np.testing.assert_array_equal(np.asarray(mask2)[:, :, : k.shape[1]], np_dipr_mask(q, k, 0.0, ln))


def test_store_path_reads_few_blocks_when_scores_are_peaked():
    # Keys clustered away from the query except a few: the pruned path must keep few blocks.
    rng = np.random.default_rng(2)
    d, s, bk = 64, 4096, 64
    q = rng.normal(size=(1, 2, d)).astype(np.float32)
    k = rng.normal(size=(1, s, 1, d)).astype(np.float32) * 0.1 - 0.3 * np.sign(q[0, 0])
    k[0, 3000, 0] = q[0, 0] * 2
    v = rng.normal(size=(1, s, 1, d)).astype(np.float32)
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), block_size=bk)
    _, stats, mask = dipr_store_attention(jnp.asarray(q), st, beta=5.0, sink=4, window=64, with_mask=True)
    np.testing.assert_array_equal(np.asarray(mask), np_dipr_mask(q, k, 5.0, [s]))
    assert int(stats.blocks_kept[0, 0]) <= 4  # sink block, window block, the block holding the peak


@pytest.mark.parametrize("top_r", [0, 1])
def test_probe_covers_every_query_head_of_a_group(top_r):
    # The 4 query heads of one KV head each point at a different planted block; the group's top-1 by
    # bound holds only one of them. Each head's own best block is probed, so every head gets M_lb = M and
    # only the planted blocks (plus sink/window) are kept.
    rng = np.random.default_rng(7)
    d, s, bk, g = 64, 4096, 64, 4
    centres = rng.normal(size=(s // bk, d)).astype(np.float32)
    k = (np.repeat(centres, bk, axis=0) + 0.01 * rng.normal(size=(s, d))).astype(np.float32)[None, :, None, :]
    v = rng.normal(size=(1, s, 1, d)).astype(np.float32)
    planted = [5, 17, 29, 41]
    q = np.stack([centres[b] / np.linalg.norm(centres[b]) * (20 + i) for i, b in enumerate(planted)])[None]
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), block_size=bk)
    _, stats, mask = dipr_store_attention(jnp.asarray(q), st, beta=1.0, sink=4, window=64, top_r=top_r,
                                          with_mask=True)
    np.testing.assert_array_equal(np.asarray(mask), np_dipr_mask(q, k, 1.0, [s]))
    assert int(stats.blocks_kept[0, 0]) <= len(planted) + 3, int(stats.blocks_kept[0, 0])


def test_jit_and_traced_beta():
    q, k, v, ln, st = _store_case([50, 300], 4, 2, 32, 16, seed=4)
    f = jax.jit(lambda q, st, beta: dipr_store_attention(q, st, beta=beta, with_mask=True, max_kept_blocks=6))
    for beta in (0.5, 3.0, 100.0):
        _, _, mask = f(jnp.asarray(q), st, jnp.float32(beta))
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_bad_input_errors():
    q, k, v, ln, st = _store_case([10], 4, 2, 16, 8)
    with pytest.raises(ValueError, match="beta"):
        dipr_mask(jnp.asarray(q), jnp.asarray(k), beta=-1.0)
    with pytest.raises(ValueError, match="multiple"):
        dipr_mask(jnp.asarray(q[:, :3]), jnp.asarray(k), beta=1.0)
    with pytest.raises(ValueError, match=r"q \[B,Hq,D\]"):
        dipr_store_attention(jnp.asarray(q[..., :8]), st, beta=1.0)
