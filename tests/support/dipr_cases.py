"""DIPR test cases: ragged batches with NaN-poisoned padding, adversarial keys, and the
float64 NumPy brute force that every DIPR path is checked against."""

import math

import jax.numpy as jnp
import numpy as np

from alaya_jax.store import kv_store


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


def store_case(lengths, hq, hkv, d, bk, *, seed=0, dtype=np.float32, int_valued=False, adversarial=None):
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
