"""DIPR: brute-force jnp against NumPy, and the filter–refine store path against brute force.

Exactness is asserted as identical masks (zero false negatives, zero false
positives), never as a tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention.dipr.brute_force import dipr_attention, dipr_mask
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
from alaya_jax.store import kv_store
from pallas_kernels import default_rounding_slack
from tests.support.dipr_cases import make_case, np_attention, np_dipr_mask, store_case

RAGGED = [1, 3, 513, 1023, 4097]

# One compilation per (shapes, knobs); beta is traced, so a sweep of beta reuses it.
_run = jax.jit(dipr_store_attention, static_argnames=("sink", "window", "with_mask", "implementation", "interpret",
                                                      "num_splits", "refine_programs", "rounding_slack"))


def run(q, st, beta, **kw):
    return _run(jnp.asarray(q), st, beta=jnp.float32(beta), **kw)


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


@pytest.mark.parametrize(
    "lengths,hq,hkv,d,bk",
    [
        (RAGGED, 4, 4, 64, 64),
        ([1, 3, 513, 1023], 6, 2, 64, 32),
        ([3, 200, 777], 8, 2, 128, 16),
    ],
)
def test_store_path_equals_brute_force(lengths, hq, hkv, d, bk):
    q, k, v, ln, st = store_case(lengths, hq, hkv, d, bk, seed=len(lengths) + hq)
    for beta in (0.0, 2.0, 30.0, math.inf):
        out, stats, mask = run(q, st, beta, sink=4, window=16, with_mask=True)
        want = np_dipr_mask(q, k, beta, ln)
        got = np.asarray(mask)[:, :, : k.shape[1]]
        assert not (want & ~got).any(), f"false negatives at beta={beta}"
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(stats.keys_in_range), want.sum(-1))
        # the attention widens the compare by its rounding slack (superset, never fewer keys)
        ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta, lengths=jnp.asarray(ln),
                             sink=4, window=16, rounding_slack=default_rounding_slack(d))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adversarial", ["hidden_high", "all_equal", "large_norm"])
@pytest.mark.parametrize("hq,hkv", [(3, 1), (8, 2)])
def test_store_path_adversarial(adversarial, hq, hkv):
    q, k, v, ln, st = store_case([1, 130, 1000], hq, hkv, 64, 32, seed=3, adversarial=adversarial)
    for beta in (0.0, 1.0, 40.0):
        _, stats, mask = run(q, st, beta, sink=0, window=0, with_mask=True)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_store_path_exact_ties_integer_keys():
    q, k, v, ln, st = store_case([257, 1025], 4, 2, 64, 32, seed=5, int_valued=True)
    for beta in (0.0, 1.0, 5.0, 12.0):
        _, _, mask = run(q, st, beta, sink=0, window=0, with_mask=True)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_store_path_bf16():
    q, k, v, ln, st = store_case([100, 513], 8, 2, 64, 32, seed=9, dtype=jnp.bfloat16)
    qb = jnp.asarray(q, jnp.bfloat16)
    out, _, mask = run(qb, st, 10.0, sink=4, window=16, with_mask=True)
    qf = np.asarray(qb.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(qf, k, 10.0, ln))
    ref = dipr_attention(qb.astype(jnp.float32), jnp.asarray(k), jnp.asarray(v), beta=10.0,
                         lengths=jnp.asarray(ln), sink=4, window=16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_every_key_a_candidate_fits_its_list():
    q, k, v, ln, st = store_case([600, 900], 4, 2, 32, 16, seed=11)
    beta = 1000.0  # every searched key is a candidate: each split's list holds all of its keys
    out, stats, mask = run(q, st, beta, sink=0, window=0, with_mask=True, num_splits=2)
    np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))
    np.testing.assert_array_equal(np.asarray(stats.candidates), np.array([[600, 600], [900, 900]]))
    ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta, lengths=jnp.asarray(ln),
                         sink=0, window=0, rounding_slack=default_rounding_slack(32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_store_path_refines_few_keys_when_scores_are_peaked():
    # Keys pointing away from the query except one: the codes' intervals must rule out most keys.
    rng = np.random.default_rng(2)
    d, s = 64, 4096
    q = rng.normal(size=(1, 2, d)).astype(np.float32)
    k = rng.normal(size=(1, s, 1, d)).astype(np.float32) * 0.1 - 0.3 * np.sign(q[0, 0])
    v = rng.normal(size=(1, s, 1, d)).astype(np.float32)
    # The peak in the recent window: the scan's threshold (sink/window max - beta) is tight.
    k_in = k.copy()
    k_in[0, s - 5, 0] = q[0, 0] * 2
    st = kv_store.from_dense(jnp.asarray(k_in), jnp.asarray(v), block_size=64)
    _, stats, mask = run(q, st, 5.0, sink=4, window=64, with_mask=True)
    np.testing.assert_array_equal(np.asarray(mask), np_dipr_mask(q, k_in, 5.0, [s]))
    assert int(stats.candidates[0, 0]) <= 40, int(stats.candidates[0, 0])
    # The peak far from the window: the threshold from sink and window alone is loose and admits many
    # keys, every one of which the lists hold; the result is exact all the same.
    k_far = k.copy()
    k_far[0, 3000, 0] = q[0, 0] * 2
    st = kv_store.from_dense(jnp.asarray(k_far), jnp.asarray(v), block_size=64)
    _, stats, mask = run(q, st, 5.0, sink=4, window=64, with_mask=True)
    np.testing.assert_array_equal(np.asarray(mask), np_dipr_mask(q, k_far, 5.0, [s]))
    assert int(stats.candidates[0, 0]) >= 1


def test_argmax_outside_the_window_is_found_by_the_score_pass_and_exact():
    rng = np.random.default_rng(8)
    d, s = 64, 2048
    q = rng.normal(size=(1, 2, d)).astype(np.float32)
    k = rng.normal(size=(1, s, 2, d)).astype(np.float32)
    v = rng.normal(size=(1, s, 2, d)).astype(np.float32)
    # Every head's arg-max in the window, or head 0's far from sink and window: the score pass finds the
    # exact M among the candidates, so the attend pass uses the exact threshold M - beta.
    k_in = k.copy()
    k_in[0, s - 10] = q[0]
    k_out = k.copy()
    k_out[0, 700, 0] = q[0, 0]
    for kk in (k_in, k_out):
        st = kv_store.from_dense(jnp.asarray(kk), jnp.asarray(v), block_size=64)
        out, stats, mask = run(q, st, 3.0, sink=4, window=64, with_mask=True)
        m_np = np.einsum("shd,hd->hs", kk[0].astype(np.float64), q[0].astype(np.float64)).max(-1)
        np.testing.assert_allclose(np.asarray(stats.max_score)[0], m_np, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask), np_dipr_mask(q, kk, 3.0, [s]))
        ref = dipr_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), beta=3.0, sink=4, window=64,
                             rounding_slack=default_rounding_slack(d))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_beta_per_query_head():
    q, k, v, ln, st = store_case([300, 1000], 6, 2, 64, 32, seed=6)
    betas = np.array([0.0, 1.0, 4.0, 10.0, 25.0, np.inf], np.float32)
    _, _, mask = run(q, st, betas, sink=0, window=0, with_mask=True)
    got = np.asarray(mask)[:, :, : k.shape[1]]
    for h, bt in enumerate(betas):
        np.testing.assert_array_equal(got[:, h], np_dipr_mask(q, k, float(bt), ln)[:, h], err_msg=f"head {h}")
    with pytest.raises(ValueError, match="beta"):
        dipr_store_attention(jnp.asarray(q), st, beta=jnp.asarray(betas[:4]))
    with pytest.raises(ValueError, match="beta"):
        dipr_store_attention(jnp.asarray(q), st, beta=-betas - 1)


def test_pallas_implementation_matches_brute_force():
    q, k, v, ln, st = store_case([3, 513, 700], 8, 2, 64, 32, seed=12)
    for beta in (0.0, 8.0):
        out, stats, mask = run(q, st, beta, sink=4, window=16, with_mask=True, implementation="pallas",
                               num_splits=2, refine_programs=2)
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))
        ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta, lengths=jnp.asarray(ln),
                             sink=4, window=16, rounding_slack=default_rounding_slack(64))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_jit_and_traced_beta():
    q, k, v, ln, st = store_case([50, 300], 4, 2, 32, 16, seed=4)
    f = jax.jit(lambda q, st, beta: dipr_store_attention(q, st, beta=beta, with_mask=True))
    for beta in (0.5, 3.0, 100.0):
        _, _, mask = f(jnp.asarray(q), st, jnp.float32(beta))
        np.testing.assert_array_equal(np.asarray(mask)[:, :, : k.shape[1]], np_dipr_mask(q, k, beta, ln))


def test_bad_input_errors():
    q, k, v, ln, st = store_case([10], 4, 2, 16, 8)
    with pytest.raises(ValueError, match="beta"):
        dipr_mask(jnp.asarray(q), jnp.asarray(k), beta=-1.0)
    with pytest.raises(ValueError, match="multiple"):
        dipr_mask(jnp.asarray(q[:, :3]), jnp.asarray(k), beta=1.0)
    with pytest.raises(ValueError, match=r"q \[B,Hq,D\]"):
        dipr_store_attention(jnp.asarray(q[..., :8]), st, beta=1.0)
