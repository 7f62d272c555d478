"""block_bounds: reference vs brute-force NumPy, Pallas (interpret) vs reference, zero violations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BackendUnavailableError, block_bounds
from pallas_kernels.range_mask.reference import listed_scores
from pallas_kernels.testing import make_case, np_block_bounds, np_scores, np_valid

COMBOS = [(1, 64, jnp.float32), (3, 128, jnp.bfloat16), (4, 64, jnp.bfloat16), (4, 128, jnp.float32)]
KINDS = ["gauss", "high", "ties", "equal", "large", "grid"]


def _inputs(kind, g, d, dtype, seed=0):
    c = make_case(kind, g=g, hkv=2, d=d, seed=seed)
    q = jnp.asarray(c["q"]).astype(dtype)
    keys = jnp.asarray(c["keys"]).astype(dtype)
    k32 = np.asarray(keys.astype(jnp.float32))
    valid = np_valid(c["lengths"], c["nb"], c["bk"])[:, None, :, :, None]
    kmin = np.where(valid.any(3), np.where(valid, k32, np.inf).min(3), 0).astype(np.float32)
    kmax = np.where(valid.any(3), np.where(valid, k32, -np.inf).max(3), 0).astype(np.float32)
    nvb = -(-c["lengths"] // c["bk"])
    return c, q, keys, jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(nvb, jnp.int32)


@pytest.mark.parametrize("g,d,dtype", COMBOS)
@pytest.mark.parametrize("kind", KINDS)
def test_block_bounds(kind, g, d, dtype):
    c, q, keys, kmin, kmax, nvb = _inputs(kind, g, d, dtype)
    q_np = np.asarray(q.astype(jnp.float32))
    ub_np = np_block_bounds(q_np, np.asarray(kmin), np.asarray(kmax), np.asarray(nvb), g, 1e-4)
    ub_ref = np.asarray(block_bounds(q, kmin, kmax, nvb))
    ub_pl = np.asarray(block_bounds(q, kmin, kmax, nvb, implementation="pallas"))
    assert ub_ref.dtype == np.float32 and ub_ref.shape == (5, 2 * g, c["nb"])
    scale = np.abs(np.where(np.isfinite(ub_np), ub_np, 0)).max() + 1.0
    np.testing.assert_array_equal(np.isneginf(ub_ref), np.isneginf(ub_np))
    np.testing.assert_array_equal(np.isneginf(ub_pl), np.isneginf(ub_np))
    np.testing.assert_allclose(ub_ref, ub_np, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(ub_pl, ub_ref, rtol=1e-5, atol=1e-6 * scale)
    # zero violations: the bound is >= every valid key's score, in f32 (as the kernels compute
    # it) and exactly (f64).
    nb, bk = c["nb"], c["bk"]
    all_blocks = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (5, 2, nb))
    s32, valid = listed_scores(q, keys, all_blocks, jnp.asarray(c["lengths"]))
    s32 = np.asarray(s32)
    valid = np.asarray(valid)
    s64 = np_scores(q_np, np.asarray(keys.astype(jnp.float32)), g)
    for ub in (ub_ref, ub_pl):
        assert int(np.sum(valid & (s32 > ub[..., None]))) == 0
        with np.errstate(invalid="ignore"):
            assert int(np.sum(valid & (s64 > ub[..., None]))) == 0


def test_block_bounds_tight_for_equal_keys():
    # all keys equal: the bound equals the score up to the slack
    c, q, keys, kmin, kmax, nvb = _inputs("equal", 4, 64, jnp.float32)
    ub = np.asarray(block_bounds(q, kmin, kmax, nvb, rel_slack=0.0))
    s = np_scores(np.asarray(q), np.asarray(keys), 4)[..., 0]
    ok = np.isfinite(ub)
    np.testing.assert_allclose(ub[ok], s[ok], rtol=1e-5, atol=1e-4)


def test_block_bounds_errors():
    q = jnp.zeros((1, 6, 64))
    kmin = jnp.zeros((1, 4, 3, 64))
    with pytest.raises(ValueError, match="multiple"):
        block_bounds(q, kmin, kmin, jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        block_bounds(q[:, :4], kmin, kmin, jnp.ones((1,), jnp.int32), implementation="triton")
    if jax.default_backend() == "cpu":
        with pytest.raises(BackendUnavailableError):
            block_bounds(q[:, :4], kmin, kmin, jnp.ones((1,), jnp.int32), implementation="pallas",
                         interpret=False)
