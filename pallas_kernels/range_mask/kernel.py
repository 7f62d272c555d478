"""Pallas kernel for the DIPR range mask.

Grid (B, Hkv, S): program (b, h, s) walks slots [s*Cs, s*Cs + n) of the KV head's
block list (n = listed slots in its share), loads each K block once for the whole
GQA group, computes f32 scores with an IEEE f32 dot (precision HIGHEST, no TF32),
writes them (−inf where invalid or unlisted) and the running max. The wrapper
reduces the S partial maxima and forms the mask valid & (s >= max - beta); the
token-level compare stays in f32 on the kernel's own scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import balanced_slots, compiler_params, split_counts

_HI = jax.lax.Precision.HIGHEST


def _scores(q, k):
    """q [Gp, D], k [Bk, D] -> f32 [Gp, Bk].

    f32 q: both upcast, IEEE f32 dot (precision HIGHEST: no TF32). q and k both
    16-bit (the wrapper passes q in the key dtype only when that is exact): a
    16-bit MMA with f32 accumulation — the products are exact in f32, only the
    summation order differs from the f32 dot.
    """
    if q.dtype == jnp.float32:
        return jax.lax.dot_general(
            q, k.astype(jnp.float32), (((1,), (1,)), ((), ())),
            precision=(_HI, _HI), preferred_element_type=jnp.float32,
        )
    return jax.lax.dot_general(
        q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _listed_scores(q, k_ref, blk, length, offs):
    """f32 [Gp, Bk]: raw scores of block ``blk``, -inf at positions >= length."""
    s = _scores(q, k_ref[blk])
    return jnp.where(blk * k_ref.shape[1] + offs < length, s, -jnp.inf)


def _kernel(
    len_ref,  # [1] int32
    nhere_ref,  # [1] int32: listed slots in this split
    bidx_ref,  # [Cs] int32
    q_ref,  # [Gp, D] f32
    k_ref,  # [NB, Bk, D]
    s_ref,  # [Cs, Gp, Bk] f32 (out): scores of the listed blocks, -inf after them
    m_ref,  # [Gp] f32 (out): partial max
):
    gp = q_ref.shape[0]
    bk = k_ref.shape[1]
    cs = bidx_ref.shape[0]
    length = len_ref[0]
    n = nhere_ref[0]
    q = q_ref[...]
    offs = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)

    def body(i, m):
        s = _listed_scores(q, k_ref, bidx_ref[i], length, offs)
        s_ref[i] = s
        return jnp.maximum(m, jnp.max(s, axis=1))

    m_ref[...] = jax.lax.fori_loop(0, n, body, jnp.full((gp,), -jnp.inf, jnp.float32))

    def fill(i, c):
        s_ref[i] = jnp.full((gp, bk), -jnp.inf, jnp.float32)
        return c

    jax.lax.fori_loop(n, cs, fill, 0)


def listed_scores_pallas(
    q: jax.Array,  # [B, Hkv, Gp, Dp] f32, or the key dtype when exact (padded)
    keys: jax.Array,  # [B, Hkv, NB, Bk, Dp]
    block_idx: jax.Array,  # [B, Hkv, S*Cs] int32
    lengths: jax.Array,  # [B] int32
    *,
    num_splits: int,
    with_scores: bool,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Returns (scores [B, Hkv, S*Cs, Gp, Bk] or None, partial max [B, Hkv, S, Gp]).

    Scores: the list is cut into S chunks of Cs slots. Max only (``with_scores=False``):
    the S splits share the real count of the (prefix-packed) list evenly instead."""
    b, hkv, gp, dp = q.shape
    _, _, nb, bk, _ = keys.shape
    cp = block_idx.shape[-1]
    if not with_scores:
        return None, _listed_max_balanced(q, keys, block_idx, lengths, num_splits=num_splits, interpret=interpret,
                                          num_warps=num_warps, num_stages=num_stages)
    cs, nhere = split_counts(block_idx, num_splits)  # nhere [B, Hkv, S]
    scores, pmax = pl.pallas_call(
        _kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, s: (i,)),
            pl.BlockSpec((None, None, 1), lambda i, h, s: (i, h, s)),
            pl.BlockSpec((None, None, cs), lambda i, h, s: (i, h, s)),
            pl.BlockSpec((None, None, gp, dp), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, cs, gp, bk), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, cp, gp, bk), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="dipr_range_scores",
    )(lengths, nhere, block_idx, q, keys)
    return scores, pmax


def _max_balanced_kernel(
    len_ref,  # [1] int32
    n_ref,  # [1] int32: listed slots of this KV head (whole list)
    bidx_ref,  # [Cp] int32: the whole list of this KV head, listed first then -1
    q_ref,  # [Gp, D]
    k_ref,  # [NB, Bk, D]
    m_ref,  # [Gp] f32 (out): partial max of this split
    *,
    num_splits: int,
):
    """Split s takes slots [s*n//S, (s+1)*n//S): balanced on the real count n, whatever the capacity."""
    length = len_ref[0]
    start, end = balanced_slots(n_ref[0], num_splits, pl.program_id(2))
    q = q_ref[...]
    offs = jax.lax.broadcasted_iota(jnp.int32, (1, k_ref.shape[1]), 1)

    def body(i, m):
        return jnp.maximum(m, jnp.max(_listed_scores(q, k_ref, bidx_ref[i], length, offs), axis=1))

    m_ref[...] = jax.lax.fori_loop(start, end, body, jnp.full((q.shape[0],), -jnp.inf, jnp.float32))


def _listed_max_balanced(q, keys, block_idx, lengths, *, num_splits: int, interpret: bool, num_warps: int,
                         num_stages: int):
    """Partial max [B, Hkv, S, Gp] over a prefix-packed list [B, Hkv, Cp] split by its real count."""
    b, hkv, gp, dp = q.shape
    _, _, nb, bk, _ = keys.shape
    cp = block_idx.shape[-1]
    nlisted = jnp.sum(block_idx >= 0, axis=-1).astype(jnp.int32)[..., None]  # [B, Hkv, 1]
    return pl.pallas_call(
        functools.partial(_max_balanced_kernel, num_splits=int(num_splits)),
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, s: (i,)),
            pl.BlockSpec((None, None, 1), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, cp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp, dp), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="dipr_range_max_balanced",
    )(lengths, nlisted, block_idx, q, keys)
