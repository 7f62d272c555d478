"""merge_attention: splitting a softmax into parts and merging equals the whole."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import merge_attention


def _attend(s, v):
    m = s.max()
    w = np.exp(s - m)
    return (w @ v) / w.sum(), m + np.log(w.sum())


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_equals_whole(impl, dtype):
    rng = np.random.default_rng(0)
    b, hq, d, n, p = 2, 3, 64, 200, 5
    s = rng.standard_normal((b, hq, n)) * 4
    v = rng.standard_normal((b, hq, n, d))
    cuts = np.sort(rng.choice(np.arange(1, n), p - 2, replace=False))
    bounds = [0, *cuts, n, n]  # last part empty
    outs = np.full((p, b, hq, d), np.nan)  # empty parts: NaN out, -inf lse
    lses = np.full((p, b, hq), -np.inf)
    whole_o = np.zeros((b, hq, d))
    whole_l = np.zeros((b, hq))
    for i in range(b):
        for h in range(hq):
            whole_o[i, h], whole_l[i, h] = _attend(s[i, h], v[i, h])
            for j in range(p):
                lo, hi = bounds[j], bounds[j + 1]
                if hi > lo:
                    outs[j, i, h], lses[j, i, h] = _attend(s[i, h, lo:hi], v[i, h, lo:hi])
    o, l = merge_attention(jnp.asarray(outs, dtype), jnp.asarray(lses, jnp.float32), implementation=impl)
    assert o.dtype == dtype and l.dtype == jnp.float32 and o.shape == (b, hq, d)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(l), whole_l, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o.astype(jnp.float32)), whole_o, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_merge_all_empty(impl):
    outs = jnp.full((3, 1, 2, 64), jnp.nan)
    lses = jnp.full((3, 1, 2), -jnp.inf)
    o, l = merge_attention(outs, lses, implementation=impl)
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(l)))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_merge_single_and_extreme(impl):
    rng = np.random.default_rng(1)
    outs = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
    lses = jnp.asarray([[[1e4, -1e4, 0.0, -jnp.inf]], [[-jnp.inf, 5.0, 0.0, -jnp.inf]]], jnp.float32)
    o, l = merge_attention(outs, lses, implementation=impl)
    o, l = np.asarray(o), np.asarray(l)
    np.testing.assert_allclose(o[0, 0], np.asarray(outs)[0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(o[0, 1], np.asarray(outs)[1, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(o[0, 2], (np.asarray(outs)[0, 0, 2] + np.asarray(outs)[1, 0, 2]) / 2, rtol=1e-5)
    np.testing.assert_allclose(l[0, :3], [1e4, 5.0, np.log(2.0)], rtol=1e-6)
    assert o[0, 3].tolist() == [0.0] * 32 and np.isneginf(l[0, 3])
