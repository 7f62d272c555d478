"""key_codes: rotation, 4-bit encode/decode round trip, and the bound guarantee est - δ <= s <= est + δ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.key_codes import (
    bound, decode, encode, eps_for_dim, estimate, hadamard, rotate, rotation_signs, unpack_nibbles,
)

_HI = jax.lax.Precision.HIGHEST


def _data(kind, d, dtype, *, hkv=2, n=257, nq=5, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        k, q = rng.standard_normal((hkv, n, d)), rng.standard_normal((hkv, nq, d))
    elif kind == "large":  # very large norms
        k, q = rng.standard_normal((hkv, n, d)) * 3e3, rng.standard_normal((hkv, nq, d)) * 3e3
    elif kind == "outlier":  # a few huge channels, as real keys have (rotation spreads them)
        k = rng.standard_normal((hkv, n, d))
        k[..., 3] *= 40.0
        k[..., 17] -= 25.0
        q = rng.standard_normal((hkv, nq, d))
    elif kind == "axis":  # queries along one rotated axis: the tight case of the rotation bound
        k = rng.standard_normal((hkv, n, d))
        signs = rotation_signs(hkv, d, seed=7)
        hm = hadamard(d) / np.sqrt(d)
        q = np.stack([(hm[rng.integers(0, d, nq)] * signs[h]) * 5.0 for h in range(hkv)])
    elif kind == "mixed":  # keys of very different norms, a zero key, a hidden high key
        k = rng.standard_normal((hkv, n, d)) * np.exp(rng.uniform(-6, 6, (hkv, n, 1)))
        k[:, 0] = 0.0
        k[:, n // 2] = 500.0
        q = rng.standard_normal((hkv, nq, d))
    else:
        raise ValueError(kind)
    return jnp.asarray(q).astype(dtype), jnp.asarray(k).astype(dtype)


def _exact_scores(q, k):
    """The refine's arithmetic: 16-bit operands (or f32 HIGHEST), f32 accumulation -> [Hkv, nq, n]."""
    if q.dtype == jnp.float32:
        return jnp.einsum("hqd,hnd->hqn", q, k.astype(jnp.float32), precision=_HI)
    return jnp.einsum("hqd,hnd->hqn", q, k.astype(q.dtype), preferred_element_type=jnp.float32)


def _est(q_rot, codes, scale):
    """est = scale·(q'[:D/2]·lo + q'[D/2:]·hi) in f32, as the kernels compute it."""
    lo, hi = unpack_nibbles(codes)
    h = q_rot.shape[-1] // 2
    dot = (jnp.einsum("hqd,hnd->hqn", q_rot[..., :h], lo.astype(jnp.float32), precision=_HI)
           + jnp.einsum("hqd,hnd->hqn", q_rot[..., h:], hi.astype(jnp.float32), precision=_HI))
    return scale.astype(jnp.float32)[:, None, :] * dot


def test_rotation_orthogonal_and_deterministic():
    for d in (64, 128):
        h = hadamard(d)
        np.testing.assert_array_equal(h @ h, d * np.eye(d))
        s = rotation_signs(3, d, seed=11)
        np.testing.assert_array_equal(s, rotation_signs(3, d, seed=11))
        assert not np.array_equal(s, rotation_signs(3, d, seed=12))
        assert set(np.unique(s)) == {-1.0, 1.0} and s.dtype == np.float32
        x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, d)), jnp.float32)
        y = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, d)), jnp.float32)
        xr, yr = rotate(x, s), rotate(y, s)
        assert xr.dtype == jnp.float32 and xr.shape == x.shape
        np.testing.assert_allclose(np.sum(np.asarray(xr) * np.asarray(yr), -1),
                                   np.sum(np.asarray(x) * np.asarray(y), -1), atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        rotation_signs(2, 96, seed=0)
    with pytest.raises(ValueError, match="matching signs"):
        rotate(jnp.zeros((2, 3, 64)), rotation_signs(2, 64, seed=0))


@pytest.mark.parametrize("d", [64, 128])
def test_encode_decode_round_trip(d):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 2, d)) * np.array([1e-3, 1.0, 30.0, 3e3, 1e4])[:, None, None],
                    jnp.float32)
    xr = rotate(x, rotation_signs(2, d, seed=1))
    codes, scale, err = encode(xr)
    assert codes.dtype == jnp.uint8 and codes.shape == (5, 2, d // 2)
    assert scale.dtype == jnp.float16 and err.dtype == jnp.float16 and scale.shape == (5, 2)
    lo, hi = unpack_nibbles(codes)
    c = np.concatenate([np.asarray(lo), np.asarray(hi)], -1)
    assert c.min() >= -7 and c.max() <= 7
    assert np.abs(c).max(-1).min() == 7  # the max coordinate uses the full range
    s32 = np.asarray(scale, np.float64)
    xr64 = np.asarray(xr, np.float64)
    assert np.all(s32 * 7 >= np.abs(xr64).max(-1))  # rounded up: nothing clips
    # the codes are the nearest multiples of the scale; dim j in the low nibble, j + D/2 in the high
    np.testing.assert_array_equal(c, np.clip(np.round(xr64 / s32[..., None]), -7, 7))
    kh = np.asarray(decode(codes, scale), np.float64)
    np.testing.assert_array_equal(kh, s32[..., None] * c)
    assert np.all(np.abs(kh - xr64) <= s32[..., None] * 0.5 * (1 + 1e-6))
    assert np.all(np.linalg.norm(kh - xr64, axis=-1) <= np.asarray(err, np.float64))
    # re-encoding the decoded key gives the same codes (a fixed point)
    codes2, scale2, _ = encode(decode(codes, scale))
    np.testing.assert_array_equal(np.asarray(codes2), np.asarray(codes))


def test_zero_key_and_overflowing_scale():
    xr = jnp.zeros((2, 64), jnp.float32).at[1, 5].set(1e7)  # 1e7 / 7 > f16 max
    codes, scale, err = encode(xr)
    assert float(scale[0]) == 0.0 and float(err[0]) == 0.0
    np.testing.assert_array_equal(np.asarray(decode(codes, scale))[0], 0.0)
    assert np.isinf(np.asarray(scale[1], np.float32)) and np.isinf(np.asarray(err[1], np.float32))
    q = jnp.ones((64,), jnp.float32)
    d = np.asarray(bound(q, scale, err))
    assert d[0] == 0.0 and not d[1] < np.inf  # vacuous (inf/NaN): kernels treat it as a candidate


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["gauss", "large", "outlier", "axis", "mixed"])
def test_bound_guarantee(kind, d, dtype):
    q, k = _data(kind, d, dtype, seed=d)
    signs = rotation_signs(q.shape[0], d, seed=7)
    q_rot = rotate(jnp.swapaxes(q, 0, 1), signs).swapaxes(0, 1)  # rotate takes [..., Hkv, D]
    k_rot = rotate(jnp.swapaxes(k, 0, 1), signs).swapaxes(0, 1)
    codes, scale, err = encode(k_rot)
    ests = [np.asarray(_est(q_rot, codes, scale), np.float64),  # q' exact (f32)
            np.asarray(estimate(q_rot, codes, scale), np.float64)]  # the kernels' f16 operand
    delta = np.asarray(bound(q_rot[:, :, None, :], scale[:, None, :], err[:, None, :]), np.float64)
    assert np.all(np.isfinite(delta)) and np.all(delta >= 0)
    s = np.asarray(_exact_scores(q, k), np.float64)
    truth = np.einsum("hqd,hnd->hqn", np.asarray(q.astype(jnp.float32), np.float64),
                      np.asarray(k.astype(jnp.float32), np.float64))
    for est in ests:
        for ref in (s, truth):
            assert np.all(est - delta <= ref) and np.all(ref <= est + delta)
    # and the interval is useful: δ is about the code's own error, not vacuous
    eps_part = eps_for_dim(d) * np.asarray(jnp.sum(jnp.abs(q_rot), -1), np.float64)[..., None] * \
        np.asarray(scale, np.float64)[:, None, :]
    assert np.median(eps_part / np.maximum(delta, 1e-30)) < 0.1


def test_bound_is_nearly_tight_for_adversarial_keys():
    """A key whose quantization error points along q: the error q'·(k' - k̂) reaches most of δ's main term."""
    d = 64
    rng = np.random.default_rng(5)
    q_rot = jnp.asarray(rng.standard_normal(d), jnp.float32)
    scale = 1.0
    c = rng.integers(-6, 7, d).astype(np.float32)
    k_rot = c + 0.49 * np.sign(np.asarray(q_rot))  # every coordinate rounds down by 0.49 toward 0 of q
    k_rot[0] = 7.0 * (1 - 2.0 ** -12)  # pins the scale (rounded up to f16) to 1
    codes, sc, err = encode(jnp.asarray(k_rot, jnp.float32))
    assert float(sc) == scale
    gap = float(jnp.dot(q_rot, jnp.asarray(k_rot) - decode(codes, sc), precision=_HI))
    delta = float(bound(q_rot, sc, err))
    assert abs(gap) <= delta and abs(gap) >= 0.9 * (delta - eps_for_dim(d) * float(jnp.sum(jnp.abs(q_rot))))
