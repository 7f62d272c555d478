"""Single-pass exact DIPR (optimistic threshold M_lb − β, refined when M ≠ M_lb),
the balanced sparse-attention kernel with a max-score output, and 16-bit summaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax import kv_store
from alaya_jax.dipr import dipr_attention
from alaya_jax.dipr_store import dipr_store_attention
from pallas_kernels import default_rounding_slack
from pallas_kernels.block_bounds import block_bounds
from pallas_kernels.sparse_attention import sparse_decode_attention
from tests.test_dipr import RAGGED, _store_case


def _run(q, st, impl, **kw):
    return dipr_store_attention(jnp.asarray(q), st, implementation=impl,
                                interpret=True if impl == "pallas" else None, **kw)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("beta", [0.0, 3.0, 30.0, math.inf])
@pytest.mark.parametrize("adversarial", [None, "hidden_high"])
def test_single_pass_equals_two_pass_and_brute_force(impl, beta, adversarial):
    q, k, v, ln, st = _store_case(RAGGED, 6, 2, 64, 32, seed=3, adversarial=adversarial)
    kw = dict(beta=beta, sink=4, window=16, top_r=1, num_splits=3)
    out1, s1, _ = _run(q, st, impl, single_pass=True, **kw)
    out2, s2, _ = _run(q, st, impl, single_pass=False, **kw)
    np.testing.assert_array_equal(np.asarray(s1.max_score), np.asarray(s2.max_score))
    np.testing.assert_array_equal(np.asarray(s1.blocks_kept), np.asarray(s2.blocks_kept))
    ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta, lengths=jnp.asarray(ln),
                         sink=4, window=16, rounding_slack=default_rounding_slack(64))
    np.testing.assert_allclose(np.asarray(out1), np.asarray(ref), rtol=1e-5, atol=1e-5)
    if impl == "reference" or int(s1.refined) == 0:
        # same kernel, same threshold value: bit for bit
        np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))


def test_single_pass_refines_when_argmax_not_in_probe():
    # Block 0..: a decoy block with a huge min/max box (largest bound) but low scores; the
    # arg-max sits elsewhere, so with top_r=1 the probe misses it: M' > M_lb -> refined.
    rng = np.random.default_rng(0)
    b, s, hkv, hq, d, bk = 1, 256, 1, 2, 16, 32
    q = np.abs(rng.normal(size=(b, hq, d))).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32) * 0.1
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    k[0, 64:96:2, 0, :8] = 6.0  # decoy block 2: rows (+6,-6) / (-6,+6) by half: box [-6, 6]
    k[0, 64:96:2, 0, 8:] = -6.0  # everywhere (largest bound), scores only 6·(Σq[:8] − Σq[8:])
    k[0, 65:96:2, 0, :8] = -6.0
    k[0, 65:96:2, 0, 8:] = 6.0
    k[0, 150] = 2.5  # the true arg-max (block 4), its bound is below the decoy's
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray([s], jnp.int32), block_size=bk)
    for impl in ("reference", "pallas"):
        for beta in (1.0, 10.0):
            out, stats, _ = _run(q, st, impl, beta=beta, sink=0, window=0, top_r=1, single_pass=True)
            assert int(stats.refined) == 1
            ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=beta,
                                 lengths=jnp.asarray([s], jnp.int32), sink=0, window=0)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
            scores = np.einsum("bhd,bsd->bhs", q, k[:, :, 0])
            np.testing.assert_allclose(np.asarray(stats.max_score), scores.max(-1), rtol=1e-6)


def test_single_pass_overflow_takes_dense_path():
    q, k, v, ln, st = _store_case(RAGGED, 4, 2, 32, 16, seed=5)
    out, stats, _ = _run(q, st, "pallas", beta=math.inf, sink=4, window=16, max_kept_blocks=2)
    assert int(stats.overflow) == 1
    ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=math.inf, lengths=jnp.asarray(ln),
                         sink=4, window=16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits,unroll", [(1, 1), (3, 2), (8, 4), (2, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_balanced_kernel_matches_reference(splits, unroll, dtype):
    rng = np.random.default_rng(splits * 10 + unroll)
    b, hq, hkv, nb, bk, d = 2, 8, 2, 16, 16, 32
    q = jnp.asarray(rng.normal(size=(b, hq, d)), dtype)
    k = np.asarray(rng.normal(size=(b, hkv, nb, bk, d)), np.float32)
    v = np.asarray(rng.normal(size=(b, hkv, nb, bk, d)), np.float32)
    lengths = np.array([nb * bk - 5, 100], np.int32)
    for i, n in enumerate(lengths):  # NaN past the length
        k.reshape(b, hkv, nb * bk, d)[i, :, n:] = np.nan
        v.reshape(b, hkv, nb * bk, d)[i, :, n:] = np.nan
    idx = np.full((b, hkv, 12), -1, np.int32)
    for i in range(b):
        for h in range(hkv):
            n = [0, 11, 5, 1][i * hkv + h]
            idx[i, h, :n] = np.sort(rng.choice(nb, n, replace=False))
    thr = jnp.asarray(rng.normal(size=(b, hq)) * 3, jnp.float32)
    args = (q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(idx), jnp.asarray(lengths), thr)
    r = sparse_decode_attention(*args, sink=4, window=20, return_max=True)
    p = sparse_decode_attention(*args, sink=4, window=20, num_splits=splits, return_max=True,
                                blocks_per_step=unroll, implementation="pallas", interpret=True)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    o_r, o_p = np.asarray(r[0], np.float32), np.asarray(p[0], np.float32)
    assert not np.isnan(o_p).any()
    np.testing.assert_allclose(o_p, o_r, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.isinf(np.asarray(r[1])), np.isinf(np.asarray(p[1])))
    np.testing.assert_array_equal(np.isinf(np.asarray(r[2])), np.isinf(np.asarray(p[2])))
    fin = np.isfinite(np.asarray(r[2]))
    np.testing.assert_allclose(np.asarray(p[2])[fin], np.asarray(r[2])[fin], rtol=1e-5, atol=1e-4)
    # without return_max the pair is returned, as before
    assert len(sparse_decode_attention(*args, implementation="pallas", interpret=True, blocks_per_step=unroll)) == 2


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_bf16_summaries_rounded_outward_stay_bounds(impl):
    # f32 keys, bf16 summaries: rounding outward must keep every bound >= every score.
    rng = np.random.default_rng(7)
    b, s, hkv, hq, d, bk = 2, 256, 2, 4, 64, 32
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32) * 3 + 0.37
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    q = rng.normal(size=(b, hq, d)).astype(np.float32) * 4
    ln = jnp.asarray([s, 150], jnp.int32)
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), ln, block_size=bk)
    st16 = kv_store.with_summary_dtype(st, jnp.bfloat16)
    assert st16.kmin.dtype == jnp.bfloat16
    assert bool(jnp.all(st16.kmin.astype(jnp.float32) <= st.kmin)) and bool(jnp.all(st16.kmax.astype(jnp.float32) >= st.kmax))
    nvb = (ln + bk - 1) // bk
    ub = np.asarray(block_bounds(jnp.asarray(q), st16.kmin, st16.kmax, nvb, rel_slack=0.0, implementation=impl,
                                 interpret=True if impl == "pallas" else None))
    g = hq // hkv
    for i in range(b):
        n = int(ln[i])
        sc = np.einsum("hgd,shd->hgs", q[i].reshape(hkv, g, d).astype(np.float64), k[i, :n].astype(np.float64))
        blk = np.arange(n) // bk
        for hb in range(nvb[i]):
            assert (ub[i].reshape(hkv, g, -1)[:, :, hb] >= sc[:, :, blk == hb].max(-1)).all()
    # bf16 keys: bf16 summaries are the f32 summaries exactly
    st_b = kv_store.from_dense(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), ln, block_size=bk)
    st_b16 = kv_store.with_summary_dtype(st_b, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(st_b16.kmin, np.float32), np.asarray(st_b.kmin))
    np.testing.assert_array_equal(np.asarray(st_b16.kmax, np.float32), np.asarray(st_b.kmax))
    out, stats, _ = dipr_store_attention(jnp.asarray(q), st16, beta=5.0, implementation=impl,
                                         interpret=True if impl == "pallas" else None)
    ref = dipr_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=5.0, lengths=ln, sink=4, window=64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
