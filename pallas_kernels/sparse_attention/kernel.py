"""Pallas kernel: split-K sparse decode attention over listed key blocks.

Grid (B, Hkv, S). Program (b, h, s) owns slots [s*Cs, s*Cs + n) of KV head h's
block list; it loads each K/V block once for the whole GQA group (q rows padded
to Gp >= 16 for tl.dot), scores in f32 (IEEE dot: no TF32), applies the token
rule (valid & (s + rounding_slack·‖q‖₁·‖k‖∞ >= thr | sink | window)), runs an
online softmax and writes the normalised partial output and its log-sum-exp. Padding past a length may be NaN:
scores are masked with `where` and values zeroed. Partials are merged by the LSE
merge (op 4) in the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import balanced_slots, compiler_params, split_counts
from pallas_kernels.range_mask.kernel import _scores

_HI = jax.lax.Precision.HIGHEST


def _key_inf_norm(k):
    """k [Bk, D] -> f32 [1, Bk]: max_d |k_d| per key (NaN padding stays NaN; callers mask it)."""
    return jnp.max(jnp.abs(k.astype(jnp.float32)), axis=1)[None, :]


def _kernel(
    len_ref,  # [1] int32
    nhere_ref,  # [1] int32: listed slots in this split
    bidx_ref,  # [Cs] int32
    thr_ref,  # [Gp] f32
    qsl_ref,  # [Gp] f32: rounding_slack·‖q‖₁ per query row
    q_ref,  # [Gp, D] f32, or the key dtype when exact
    k_ref,  # [NB, Bk, D]
    v_ref,  # [NB, Bk, D]
    o_ref,  # [Gp, D] f32 (out, normalised partial)
    lse_ref,  # [Gp] f32 (out)
    *,
    sink: int,
    window: int,
    sm_scale: float,
):
    gp, d = q_ref.shape
    bk = k_ref.shape[1]
    length = len_ref[0]
    n = nhere_ref[0]
    q = q_ref[...]
    thr = thr_ref[...][:, None]  # [Gp, 1]
    qsl = qsl_ref[...][:, None]  # [Gp, 1]
    offs_r = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    offs_c = jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    f32_values = v_ref.dtype == jnp.float32

    def body(i, carry):
        o, m, l = carry
        blk = bidx_ref[i]
        k = k_ref[blk]
        s = _scores(q, k)  # [Gp, Bk] f32, same arithmetic as the range mask
        pos = blk * bk + offs_r
        valid = pos < length
        keep = (pos < sink) | (pos >= length - window)
        att = valid & ((s + qsl * _key_inf_norm(k) >= thr) | keep)
        logits = jnp.where(att, s * sm_scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        corr = jnp.exp(m - m_safe)
        p = jnp.exp(logits - m_safe[:, None])  # 0 where not attended
        l = l * corr + jnp.sum(p, axis=1)
        v = v_ref[blk]
        v = jnp.where(blk * bk + offs_c < length, v, jnp.zeros_like(v))  # NaN padding -> 0
        if f32_values:
            pv = jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=(_HI, _HI),
                                     preferred_element_type=jnp.float32)
        else:  # bf16/f16 values: low-precision P, f32 accumulation (tensor cores)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        o = o * corr[:, None] + pv
        return o, m_new, l

    init = (
        jnp.zeros((gp, d), jnp.float32),
        jnp.full((gp,), -jnp.inf, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    o, m, l = jax.lax.fori_loop(0, n, body, init)
    has = l > 0
    l1 = jnp.where(has, l, 1.0)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    o_ref[...] = jnp.where(has[:, None], o / l1[:, None], 0.0)
    lse_ref[...] = jnp.where(has, m_safe + jnp.log(l1), -jnp.inf)


def sparse_attention_partials_pallas(
    q: jax.Array,  # [B, Hkv, Gp, Dp] f32
    keys: jax.Array,  # [B, Hkv, NB, Bk, Dp]
    values: jax.Array,  # [B, Hkv, NB, Bk, Dp]
    block_idx: jax.Array,  # [B, Hkv, S*Cs] int32
    lengths: jax.Array,  # [B] int32
    threshold: jax.Array,  # [B, Hkv, Gp] f32
    qslack: jax.Array,  # [B, Hkv, Gp] f32
    *,
    num_splits: int,
    sink: int,
    window: int,
    sm_scale: float,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Returns (outs [S, B, Hkv, Gp, Dp] f32, lses [S, B, Hkv, Gp] f32)."""
    b, hkv, gp, dp = q.shape
    _, _, nb, bk, _ = keys.shape
    cp = block_idx.shape[-1]
    cs, nhere = split_counts(block_idx, num_splits)  # nhere [B, Hkv, S]
    kernel = functools.partial(_kernel, sink=int(sink), window=int(window),
                               sm_scale=float(sm_scale))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, s: (i,)),
            pl.BlockSpec((None, None, 1), lambda i, h, s: (i, h, s)),
            pl.BlockSpec((None, None, cs), lambda i, h, s: (i, h, s)),
            pl.BlockSpec((None, None, gp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp, dp), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dp), lambda i, h, s: (s, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (s, i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, b, hkv, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, hkv, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="sparse_decode_attention",
    )(lengths, nhere, block_idx, threshold, qslack, q, keys, values)


def _balanced_kernel(
    len_ref,  # [1] int32
    n_ref,  # [1] int32: listed slots of this KV head (whole list)
    bidx_ref,  # [Cp] int32: the whole list of this KV head (-1 padded)
    thr_ref,  # [Gp] f32
    qsl_ref,  # [Gp] f32: rounding_slack·‖q‖₁ per query row
    q_ref,  # [Gp, D]
    k_ref,  # [NB, Bk, D]
    v_ref,  # [NB, Bk, D]
    o_ref,  # [Gp, D] f32 (out, normalised partial)
    lse_ref,  # [Gp] f32 (out)
    mx_ref,  # [Gp] f32 (out): max raw score over the valid tokens of this split's blocks
    *,
    num_splits: int,
    unroll: int,
    sink: int,
    window: int,
    sm_scale: float,
):
    """Split s of the list gets slots [s*n//S, (s+1)*n//S) (balanced on the real count n);
    each loop step issues the loads of ``unroll`` blocks before using any of them."""
    gp, d = q_ref.shape
    bk = k_ref.shape[1]
    length = len_ref[0]
    start, end = balanced_slots(n_ref[0], num_splits, pl.program_id(2))
    q = q_ref[...]
    thr = thr_ref[...][:, None]
    qsl = qsl_ref[...][:, None]
    offs_r = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    offs_c = jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    f32_values = v_ref.dtype == jnp.float32
    steps = (end - start + unroll - 1) // unroll

    def body(i, carry):
        o, m, l, mx = carry
        base = start + i * unroll
        blks, oks = [], []
        for u in range(unroll):
            slot = base + u
            ok = slot < end
            blk = jnp.where(ok, bidx_ref[jnp.minimum(slot, bidx_ref.shape[0] - 1)], 0)
            blk = jnp.maximum(blk, 0)
            blks.append(blk)
            oks.append(ok)
        ks = [k_ref[blk] for blk in blks]  # all loads issued first
        vs = [v_ref[blk] for blk in blks]
        logits_l, valid_l, s_l = [], [], []
        m_new = m
        for u in range(unroll):
            s = _scores(q, ks[u])  # [Gp, Bk] f32, same arithmetic as the range mask
            pos = blks[u] * bk + offs_r
            valid = (pos < length) & oks[u]
            keep = (pos < sink) | (pos >= length - window)
            att = valid & ((s + qsl * _key_inf_norm(ks[u]) >= thr) | keep)
            logits = jnp.where(att, s * sm_scale, -jnp.inf)
            mx = jnp.maximum(mx, jnp.max(jnp.where(valid, s, -jnp.inf), axis=1))
            m_new = jnp.maximum(m_new, jnp.max(logits, axis=1))
            logits_l.append(logits)
            valid_l.append(valid)
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        corr = jnp.exp(m - m_safe)
        o = o * corr[:, None]
        l = l * corr
        for u in range(unroll):
            p = jnp.exp(logits_l[u] - m_safe[:, None])
            l = l + jnp.sum(p, axis=1)
            v = vs[u]
            v = jnp.where((blks[u] * bk + offs_c < length) & oks[u], v, jnp.zeros_like(v))
            if f32_values:
                pv = jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=(_HI, _HI),
                                         preferred_element_type=jnp.float32)
            else:
                pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            o = o + pv
        return o, m_new, l, mx

    init = (
        jnp.zeros((gp, d), jnp.float32),
        jnp.full((gp,), -jnp.inf, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        jnp.full((gp,), -jnp.inf, jnp.float32),
    )
    o, m, l, mx = jax.lax.fori_loop(0, steps, body, init)
    has = l > 0
    l1 = jnp.where(has, l, 1.0)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    o_ref[...] = jnp.where(has[:, None], o / l1[:, None], 0.0)
    lse_ref[...] = jnp.where(has, m_safe + jnp.log(l1), -jnp.inf)
    mx_ref[...] = mx


def sparse_attention_balanced_pallas(
    q: jax.Array,  # [B, Hkv, Gp, Dp]
    keys: jax.Array,  # [B, Hkv, NB, Bk, Dp]
    values: jax.Array,
    block_idx: jax.Array,  # [B, Hkv, Cp] int32, listed first then -1
    lengths: jax.Array,  # [B]
    threshold: jax.Array,  # [B, Hkv, Gp] f32
    qslack: jax.Array,  # [B, Hkv, Gp] f32
    *,
    num_splits: int,
    unroll: int,
    sink: int,
    window: int,
    sm_scale: float,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 1,
):
    """Returns (outs [S,B,Hkv,Gp,Dp] f32, lses [S,B,Hkv,Gp] f32, maxes [S,B,Hkv,Gp] f32)."""
    b, hkv, gp, dp = q.shape
    _, _, nb, bk, _ = keys.shape
    cp = block_idx.shape[-1]
    nlisted = jnp.sum(block_idx >= 0, axis=-1).astype(jnp.int32)[..., None]  # [B, Hkv, 1]
    kernel = functools.partial(_balanced_kernel, num_splits=int(num_splits), unroll=int(unroll),
                               sink=int(sink), window=int(window), sm_scale=float(sm_scale))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, s: (i,)),
            pl.BlockSpec((None, None, 1), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, cp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp), lambda i, h, s: (i, h, 0)),
            pl.BlockSpec((None, None, gp, dp), lambda i, h, s: (i, h, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
            pl.BlockSpec((None, None, nb, bk, dp), lambda i, h, s: (i, h, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dp), lambda i, h, s: (s, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (s, i, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, s: (s, i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, b, hkv, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, hkv, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="sparse_decode_attention_balanced",
    )(lengths, nlisted, block_idx, threshold, qslack, q, keys, values)
