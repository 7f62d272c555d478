"""sparse_decode_attention: reference vs brute-force NumPy, Pallas (interpret) vs reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import default_rounding_slack, dipr_range_mask, sparse_decode_attention
from pallas_kernels.testing import make_case, make_lists, np_sparse_attention

COMBOS = [(1, 64, jnp.float32), (3, 128, jnp.bfloat16), (4, 64, jnp.bfloat16), (4, 128, jnp.float32)]
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}  # relative (norm) error of the output


def _inputs(kind, g, d, dtype, seed=0, frac=0.4):
    c = make_case(kind, g=g, hkv=2, d=d, seed=seed)
    q = jnp.asarray(c["q"]).astype(dtype)
    keys = jnp.asarray(c["keys"]).astype(dtype)
    values = jnp.asarray(c["values"]).astype(dtype)
    lists = make_lists(c["lengths"], 2, c["nb"], c["bk"], seed=seed, frac=frac)
    return c, q, keys, values, jnp.asarray(lists), jnp.asarray(c["lengths"])


@functools.lru_cache(maxsize=None)
def _fn(impl, num_splits, sink, window):
    return jax.jit(functools.partial(sparse_decode_attention, implementation=impl,
                                     num_splits=num_splits, sink=sink, window=window))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _check(out, lse, out_ref, lse_ref, dtype):
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[fin], lse_ref[fin], rtol=2e-5, atol=2e-5)
    assert _rel(out, out_ref) <= OUT_TOL[dtype]
    assert np.all(out[~fin] == 0)


@pytest.mark.parametrize("g,d,dtype", COMBOS)
@pytest.mark.parametrize("kind", ["gauss", "grid", "high"])
def test_sparse_attention(kind, g, d, dtype):
    c, q, keys, values, lists, lengths = _inputs(kind, g, d, dtype)
    np_in = [np.asarray(x.astype(jnp.float32)) for x in (q, keys, values)]
    scale = 1.0 / math.sqrt(d)
    for beta, sink, window in ((0.0, 0, 0), (4.0, 4, 64), (1000.0, 0, 0), (float("inf"), 0, 0),
                               (2.0, 0, 100)):
        # each implementation takes its threshold from its own range-mask max (same arithmetic)
        thr = {impl: dipr_range_mask(q, keys, lists, lengths, beta=0.0, return_mask=False,
                                     implementation=impl)[1] - beta
               for impl in ("reference", "pallas")}
        from pallas_kernels.testing import np_range_mask
        _, mx_np = np_range_mask(np_in[0], np_in[1], np.asarray(lists), c["lengths"], 0.0, g)
        o_np, l_np = np_sparse_attention(*np_in, np.asarray(lists), c["lengths"], mx_np - beta,
                                         sink=sink, window=window, sm_scale=scale, g=g)
        o_ref, l_ref = _fn("reference", 1, sink, window)(q, keys, values, lists, lengths, thr["reference"])
        assert o_ref.dtype == dtype and l_ref.dtype == jnp.float32 and o_ref.shape == q.shape
        _check(o_ref, l_ref, o_np, l_np, dtype)
        for splits in (1, 3):
            o_pl, l_pl = _fn("pallas", splits, sink, window)(q, keys, values, lists, lengths, thr["pallas"])
            _check(o_pl, l_pl, np.asarray(o_ref.astype(jnp.float32)), np.asarray(l_ref), dtype)


def test_threshold_neg_inf_attends_all_and_no_token_rows():
    c, q, keys, values, lists, lengths = _inputs("gauss", 4, 64, jnp.float32, frac=1.0)
    b, hq = q.shape[:2]
    thr = jnp.full((b, hq), -jnp.inf)
    # -inf threshold with every block listed = dense attention over the valid prefix
    k = np.asarray(keys).reshape(b, 2, -1, 64)
    v = np.asarray(values).reshape(b, 2, -1, 64)
    for impl, splits in (("reference", 1), ("pallas", 2)):
        o, l = sparse_decode_attention(q, keys, values, lists, lengths, thr, num_splits=splits,
                                       implementation=impl)
        for i in (0, 2, 4):
            if i == 1:
                continue
            L = int(c["lengths"][i])
            for h in range(hq):
                if np.all(np.asarray(lists)[i, h // 4] < 0):
                    continue
                s = k[i, h // 4, :L] @ np.asarray(q)[i, h] / 8.0
                w = np.exp(s - s.max())
                np.testing.assert_allclose(np.asarray(l)[i, h], s.max() + np.log(w.sum()), rtol=1e-5)
                np.testing.assert_allclose(np.asarray(o)[i, h], w @ v[i, h // 4, :L] / w.sum(),
                                           rtol=1e-4, atol=1e-5)
    # +inf threshold, no sink/window: nothing attended -> out 0, lse -inf
    for impl in ("reference", "pallas"):
        o, l = sparse_decode_attention(q, keys, values, lists, lengths, jnp.full((b, hq), jnp.inf),
                                       num_splits=2, implementation=impl)
        assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(l)))


@pytest.mark.parametrize("kind", ["large", "equal", "ties"])
def test_sparse_attention_adversarial(kind):
    c, q, keys, values, lists, lengths = _inputs(kind, 3, 64, jnp.float32, seed=2)
    np_in = [np.asarray(x) for x in (q, keys, values)]
    from pallas_kernels.testing import np_range_mask
    _, mx_np = np_range_mask(*np_in[:2], np.asarray(lists), c["lengths"], 0.0, 3)
    for beta in (0.0, 6.0, 1000.0):
        o_np, l_np = np_sparse_attention(*np_in, np.asarray(lists), c["lengths"], mx_np - beta,
                                         sink=4, window=64, sm_scale=0.125, g=3)
        for impl in ("reference", "pallas"):
            _, mx = dipr_range_mask(q, keys, lists, lengths, beta=0.0, return_mask=False,
                                    implementation=impl)
            o, l = _fn(impl, 2, 4, 64)(q, keys, values, lists, lengths, mx - beta)
            lse_ok = np.isfinite(l_np)
            np.testing.assert_array_equal(np.isfinite(np.asarray(l)), lse_ok)
            np.testing.assert_allclose(np.asarray(l)[lse_ok], l_np[lse_ok], rtol=1e-5)
            assert _rel(o, o_np) <= 1e-4


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_rounding_slack_keeps_an_argmax_rounded_below_its_threshold(impl):
    """A beta = 0 threshold computed elsewhere can sit a rounding error above the arg-max's
    score as this kernel computes it (seen on the H100). The plain compare then attends
    nothing; the default slack (2·D·2^-24·‖q‖₁·‖k‖∞) attends the arg-max, and only it."""
    c, q, keys, values, lists, lengths = _inputs("gauss", 3, 64, jnp.float32, seed=4, frac=1.0)
    np_in = [np.asarray(x) for x in (q, keys, values)]
    from pallas_kernels.testing import np_range_mask
    _, mx = np_range_mask(*np_in[:2], np.asarray(lists), c["lengths"], 0.0, 3)
    b, hq, d = q.shape
    has = np.isfinite(mx)
    # the arg-max key of every head, and its rounding bound
    flat = np_in[1].reshape(b, 2, -1, d)
    s_all = np.einsum("bhd,bhsd->bhs", np_in[0].astype(np.float64), np.repeat(flat, 3, axis=1).astype(np.float64))
    pos = np.arange(flat.shape[2])
    s_all = np.where(pos[None, None] < c["lengths"][:, None, None], s_all, -np.inf)
    arg = np.argmax(s_all, axis=-1)
    kstar = np.take_along_axis(np.repeat(flat, 3, axis=1), arg[..., None, None], axis=2)[:, :, 0]
    tol = default_rounding_slack(d) * np.abs(np_in[0]).sum(-1) * np.abs(kstar).max(-1)
    thr = np.where(has, mx + 0.5 * tol, np.inf).astype(np.float32)  # above the arg-max, within the bound
    assert np.all(thr[has] > mx[has])
    run = functools.partial(sparse_decode_attention, q, keys, values, lists, lengths, jnp.asarray(thr),
                            num_splits=2, implementation=impl)
    _, lse0 = run(rounding_slack=0.0)
    assert np.all(np.isneginf(np.asarray(lse0)))  # the plain compare drops every arg-max
    out, lse = run()
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), has)
    want = np.take_along_axis(np.repeat(np_in[2].reshape(b, 2, -1, d), 3, axis=1), arg[..., None, None], axis=2)[:, :, 0]
    np.testing.assert_allclose(np.asarray(out)[has], want[has], rtol=1e-5, atol=1e-6)  # the arg-max alone
    np.testing.assert_allclose(np.asarray(lse)[has], (mx / math.sqrt(d))[has], rtol=1e-5)


def test_sparse_attention_errors():
    q = jnp.zeros((1, 4, 64))
    kv = jnp.zeros((1, 2, 3, 64, 64))
    bi = jnp.zeros((1, 2, 3), jnp.int32)
    L = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="threshold"):
        sparse_decode_attention(q, kv, kv, bi, L, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_attention(q, kv, kv, bi, L, jnp.zeros((1, 4)), num_splits=0)
    with pytest.raises(ValueError, match="rounding_slack"):
        sparse_decode_attention(q, kv, kv, bi, L, jnp.zeros((1, 4)), rounding_slack=-1e-6)
