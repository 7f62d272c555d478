"""Shared test/benchmark data and the brute-force NumPy DIPR oracle for pallas_kernels.

Data kinds (all with NaN-poisoned keys/values past each length):
  "gauss"  : standard normal
  "grid"   : multiples of 1/8 in [-4, 4] (exact in bf16; every f32 dot of them is exact,
             so masks/maxima must match bit for bit in any summation order)
  "high"   : low keys (~1e-2) with one very high key inside a block
  "ties"   : integer q/k where many keys score exactly max - beta_tie
  "equal"  : all keys equal (grid values)
  "large"  : very large norms (~3e3 per element)
"""

from __future__ import annotations

import numpy as np

LENGTHS = (1, 3, 513, 1023, 4097)
TIE_BETA = 6.0
#: β per query head for the kernel tests (cycled over [B, Hq]): zero, small, large, inf and a non-grid value.
CASE_BETAS = (0.0, 3.0, 8.0, 24.0, np.inf, 1.5)


def case_betas(kind, b, hq):
    """f32 [B, Hq]: TIE_BETA everywhere for "ties" (keys at exactly max − β), else CASE_BETAS cycled."""
    if kind == "ties":
        return np.full((b, hq), TIE_BETA, np.float32)
    return np.resize(np.asarray(CASE_BETAS, np.float32), b * hq).reshape(b, hq)


def make_case(kind, *, g, hkv, d, lengths=LENGTHS, bk=64, seed=0):
    """Returns dict of numpy arrays: q [B,Hq,D], keys/values [B,Hkv,NB,Bk,D] f32, lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    b = len(lengths)
    nb = -(-int(lengths.max()) // bk)
    hq = g * hkv
    shape = (b, hkv, nb, bk, d)
    if kind == "gauss":
        k = rng.standard_normal(shape)
        q = rng.standard_normal((b, hq, d))
    elif kind == "grid":
        k = rng.integers(-32, 33, shape) / 8.0
        q = rng.integers(-32, 33, (b, hq, d)) / 8.0
    elif kind == "high":
        k = rng.standard_normal(shape) * 1e-2
        q = rng.standard_normal((b, hq, d))
        for i in range(b):
            n = max(1, int(lengths[i]))
            for h in range(hkv):
                p = rng.integers(0, n)
                k[i, h, p // bk, p % bk] = 50.0 * np.sign(q[i, h * g])  # high for query head h*g
    elif kind == "ties":
        # q = 1 (all d); key j has score = sum(k_j). Max key sums to M; many sum to M - TIE_BETA.
        q = np.ones((b, hq, d))
        k = np.zeros(shape)
        k[..., 0] = rng.integers(-20, 0, shape[:-1])  # base scores in [-20, -1]
        flat = k.reshape(b, hkv, nb * bk, d)
        for i in range(b):
            n = int(lengths[i])
            for h in range(hkv):
                top = rng.integers(0, n)
                flat[i, h, top, 0] = 10.0
                tied = rng.choice(n, size=min(n, max(1, n // 4)), replace=False)
                flat[i, h, tied, 0] = 10.0 - TIE_BETA
                flat[i, h, tied, 1] = 0.0
                flat[i, h, top, 0] = 10.0
        k = flat.reshape(shape)
    elif kind == "equal":
        k = np.broadcast_to(rng.integers(-32, 33, d) / 8.0, shape).copy()  # grid values: exact
        q = rng.integers(-32, 33, (b, hq, d)) / 8.0
    elif kind == "large":
        k = rng.standard_normal(shape) * 3e3
        q = rng.standard_normal((b, hq, d)) * 3e3
    else:
        raise ValueError(kind)
    v = rng.standard_normal(shape)
    pos = np.arange(nb * bk).reshape(nb, bk)
    valid = (pos[None] < lengths[:, None, None])[:, None, :, :, None]
    k = np.where(valid, k, np.nan).astype(np.float32)
    v = np.where(valid, v, np.nan).astype(np.float32)
    return dict(q=q.astype(np.float32), keys=k, values=v, lengths=lengths, bk=bk, nb=nb, g=g)


def make_coded_case(kind, *, g, hkv, d, dtype, lengths=(3, 513, 1023), seed=0, rotation_seed=1,
                    max_in_window=False):
    """A make_case store in the filter-refine layout, with its key codes.

    max_in_window: copy the key that scores highest for query head h·g into the last position
    (a window position), so the exact window max equals the searched max and the candidate
    threshold is tight (real keys look like this: the window holds the arg-max ~98% of the time).

    Returns dict of jnp arrays: q [B,Hq,D] (dtype), q_rot f32, keys/values [B,Hkv,S,D] (dtype; NaN past
    each length), codes uint8 [B,Hkv,S,D/2] (random bytes past each length: the kernels must mask by
    position), scales/errs f16 [B,Hkv,S], lengths [B]; plus numpy f64 q64/keys64 of the rounded inputs.
    """
    import jax.numpy as jnp

    from pallas_kernels.key_codes import encode, rotate, rotation_signs

    c = make_case(kind, g=g, hkv=hkv, d=d, lengths=lengths, seed=seed)
    b, _, nb, bk, _ = c["keys"].shape
    s = nb * bk
    k_np = c["keys"].reshape(b, hkv, s, d).copy()
    if max_in_window:
        for i, L in enumerate(np.asarray(lengths)):
            if L < 2:
                continue
            for h in range(hkv):
                sc = k_np[i, h, :L - 1].astype(np.float64) @ c["q"][i, h * g].astype(np.float64)
                k_np[i, h, L - 1] = k_np[i, h, int(np.argmax(sc))]
    q = jnp.asarray(c["q"]).astype(dtype)
    keys = jnp.asarray(k_np).astype(dtype)
    values = jnp.asarray(c["values"].reshape(b, hkv, s, d)).astype(dtype)
    signs = rotation_signs(hkv, d, seed=rotation_seed)
    k_rot = jnp.swapaxes(rotate(jnp.swapaxes(keys, 1, 2), signs), 1, 2)
    codes, scales, errs = encode(k_rot)
    q_rot = rotate(q.reshape(b, hkv, g, d).swapaxes(1, 2), signs).swapaxes(1, 2).reshape(b, hkv * g, d)
    valid = np.arange(s)[None, :] < np.asarray(lengths)[:, None]  # [B, S]
    junk = np.random.default_rng(seed + 99).integers(0, 256, codes.shape, dtype=np.uint8)
    codes = jnp.asarray(np.where(valid[:, None, :, None], np.asarray(codes), junk))
    return dict(q=q, q_rot=q_rot, keys=keys, values=values, codes=codes, scales=scales, errs=errs,
                lengths=jnp.asarray(np.asarray(lengths, np.int32)), g=g, valid=valid,
                q64=np.asarray(q.astype(jnp.float32), np.float64),
                keys64=np.asarray(keys.astype(jnp.float32), np.float64))


def np_dipr(q64, keys64, lengths, beta, g):
    """Brute force in f64: (scores [B,Hq,S] (-inf past length), M [B,Hq], DIPR mask [B,Hq,S])."""
    b, hq, d = q64.shape
    s = np.einsum("bhd,bhsd->bhs", q64, np.repeat(np.nan_to_num(keys64), g, axis=1))
    valid = np.arange(keys64.shape[2])[None, None, :] < np.asarray(lengths)[:, None, None]
    s = np.where(valid, s, -np.inf)
    m = s.max(-1)
    beta = np.broadcast_to(np.asarray(beta, np.float64), (b, hq))
    return s, m, valid & (s >= (m - beta)[..., None])
