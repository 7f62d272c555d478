"""dipr_range_mask: exact masks (identical, no tolerance) vs brute-force NumPy and Pallas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dipr_range_mask
from pallas_kernels.testing import TIE_BETA, make_case, make_lists, np_range_mask

COMBOS = [(1, 64, jnp.float32), (3, 128, jnp.bfloat16), (4, 64, jnp.bfloat16), (4, 128, jnp.float32)]
BETAS = [0.0, 0.5, 3.0, TIE_BETA, 50.0, 1000.0, float("inf")]


def _inputs(kind, g, d, dtype, seed=0):
    c = make_case(kind, g=g, hkv=2, d=d, seed=seed)
    q = jnp.asarray(c["q"]).astype(dtype)
    keys = jnp.asarray(c["keys"]).astype(dtype)
    lists = make_lists(c["lengths"], 2, c["nb"], c["bk"], seed=seed)
    return c, q, keys, jnp.asarray(lists), jnp.asarray(c["lengths"])


@functools.lru_cache(maxsize=None)
def _pallas(num_splits, score_mode):
    return jax.jit(functools.partial(dipr_range_mask, implementation="pallas",
                                     num_splits=num_splits, score_mode=score_mode))


_ref = jax.jit(dipr_range_mask)


@pytest.mark.parametrize("g,d,dtype", COMBOS)
@pytest.mark.parametrize("kind", ["grid", "ties", "equal"])
def test_range_mask_exact(kind, g, d, dtype):
    """Data whose f32 dots are exact: every implementation gives the identical mask and max."""
    c, q, keys, lists, lengths = _inputs(kind, g, d, dtype)
    q_np, k_np = np.asarray(q.astype(jnp.float32)), np.asarray(keys.astype(jnp.float32))
    for beta in BETAS:
        m_np, mx_np = np_range_mask(q_np, k_np, np.asarray(lists), c["lengths"], beta, g)
        b32 = jnp.float32(beta)
        m_ref, mx_ref = _ref(q, keys, lists, lengths, beta=b32)
        np.testing.assert_array_equal(np.asarray(mx_ref), mx_np.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(m_ref), m_np)
        for splits, mode in ((3, "auto"), (1, "f32")):
            m_pl, mx_pl = _pallas(splits, mode)(q, keys, lists, lengths, beta=b32)
            np.testing.assert_array_equal(np.asarray(mx_pl), np.asarray(mx_ref))
            np.testing.assert_array_equal(np.asarray(m_pl), np.asarray(m_ref))
        assert m_ref.dtype == jnp.bool_ and m_ref.shape == (5, 2 * g, lists.shape[-1], 64)
    # empty list -> max -inf, no mask
    assert np.isneginf(np.asarray(mx_ref)[1, -g:]).all()
    assert not np.asarray(m_ref)[1, -g:].any()
    # beta = inf -> every valid listed position
    m_inf, _ = _ref(q, keys, lists, lengths, beta=float("inf"))
    pos = np.asarray(lists)[..., None] * 64 + np.arange(64)
    valid = (np.asarray(lists)[..., None] >= 0) & (pos < c["lengths"][:, None, None, None])
    np.testing.assert_array_equal(np.asarray(m_inf), np.repeat(valid, g, axis=1))


def test_ties_at_max_minus_beta_are_in_range():
    c, q, keys, lists, lengths = _inputs("ties", 4, 64, jnp.float32)
    full = jnp.broadcast_to(jnp.arange(c["nb"], dtype=jnp.int32), (5, 2, c["nb"]))
    for impl in ("reference", "pallas"):
        m, mx = dipr_range_mask(q, keys, full, lengths, beta=TIE_BETA, implementation=impl)
        m0, _ = dipr_range_mask(q, keys, full, lengths, beta=np.nextafter(np.float32(TIE_BETA), np.float32(0)), implementation=impl)
        np.testing.assert_array_equal(np.asarray(mx), 10.0)
        n_tied = int(jnp.sum(m)) - int(jnp.sum(m0))
        assert n_tied > 100  # the many exact ties are inside at beta, outside just below it


@pytest.mark.parametrize("g,d,dtype", COMBOS)
@pytest.mark.parametrize("kind", ["gauss", "high", "large"])
def test_range_mask_float_data(kind, g, d, dtype):
    """General float data: max within rounding; masks identical outside a rounding zone."""
    c, q, keys, lists, lengths = _inputs(kind, g, d, dtype, seed=1)
    q_np, k_np = np.asarray(q.astype(jnp.float32)), np.asarray(keys.astype(jnp.float32))
    from pallas_kernels.testing import np_scores
    s64 = np_scores(q_np, k_np, g)
    for beta in (0.0, 3.0, 50.0, 1000.0):
        m_np, mx_np = np_range_mask(q_np, k_np, np.asarray(lists), c["lengths"], beta, g)
        m_ref, mx_ref = _ref(q, keys, lists, lengths, beta=jnp.float32(beta))
        m_pl, mx_pl = _pallas(4, "auto")(q, keys, lists, lengths, beta=jnp.float32(beta))
        fin = np.isfinite(mx_np)
        tol = 1e-5 * (np.abs(np.where(fin, mx_np, 0)) + np.nanmax(np.abs(s64)) * 1e-2 + 1e-3)
        for mx in (mx_ref, mx_pl):
            mx = np.asarray(mx)
            np.testing.assert_array_equal(np.isneginf(mx), ~fin)
            assert np.all(np.abs(np.where(fin, mx - mx_np, 0)) <= tol)
        # positions far from the threshold must agree exactly
        lst = np.asarray(lists)
        s_l = np.take_along_axis(
            np.repeat(s64, 1, axis=1), np.repeat(np.maximum(lst, 0), g, axis=1)[..., None], axis=2)
        zone = np.abs(s_l - (mx_np - beta)[:, :, None, None]) <= 4 * tol[:, :, None, None]
        with np.errstate(invalid="ignore"):
            for m in (m_ref, m_pl):
                diff = (np.asarray(m) != m_np) & ~zone
                assert int(diff.sum()) == 0
        if kind == "high" and beta == 0.0:
            assert np.asarray(m_ref).sum() >= 1


def test_return_mask_false_and_beta_scalar():
    c, q, keys, lists, lengths = _inputs("grid", 3, 64, jnp.float32)
    for impl in ("reference", "pallas"):
        m, mx = dipr_range_mask(q, keys, lists, lengths, beta=jnp.float32(2.0), return_mask=False,
                                implementation=impl)
        assert m is None and mx.shape == (5, 6) and mx.dtype == jnp.float32
        _, mx2 = dipr_range_mask(q, keys, lists, lengths, beta=2.0, implementation=impl)
        np.testing.assert_array_equal(np.asarray(mx), np.asarray(mx2))


def test_range_mask_shape_errors():
    q = jnp.zeros((1, 4, 64))
    keys = jnp.zeros((1, 2, 3, 64, 32))
    with pytest.raises(ValueError, match="mismatch"):
        dipr_range_mask(q, keys, jnp.zeros((1, 2, 3), jnp.int32), jnp.ones((1,), jnp.int32), beta=1.0)
