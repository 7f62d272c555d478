"""Pallas kernel (Triton lowering) of refine-and-attend: exact scores of the listed candidates,
threshold, then attention over V of the keys in range only, online softmax, split-K partials.

Grid (B, Hkv, NS + 1). Program (b, h, j < NS) walks split j's candidate list in chunks of R slots:
gathers the R candidates' exact keys by index (rows of D elements), scores them for the G query
heads of the group at once (rows padded to Gp >= 16, tl.dot), tracks the max score seen, keeps
``s + slack·‖q‖₁·‖k‖∞ >= m_base - β``, gathers V only for the rows some head keeps (a masked
gather: rows nobody keeps are not read) and runs an online softmax. Program (b, h, NS) does the
same for the forced positions (sink + window), all attended, with the scan's forced-score code
(``code_scan.kernel_triton.forced_tile``: identical arithmetic, so m_seen == m_base when the
forced max is the max). Every program also runs the other kind's step fully masked (no memory
traffic), so the kernel has no divergent control flow. The wrapper merges the NS + 1 partials by
log-sum-exp. With ``max_only`` (the max pass) a program only gathers its keys and scores them: the
exact max over forced ∪ listed, so that the attention pass can use the exact threshold M - β.

A Mosaic GPU port (a file beside this one) would need: the same grid; the candidate-row gathers
as per-row async copies (or TMA gather4 on Blackwell-class parts) of K and of the kept V rows
into SMEM, double-buffered; the [Gp, D] x [D, R] and [Gp, R] x [R, D] products as WGMMA (M = 64
minimum: pad the group rows, or transpose to put the R candidates on M); the per-chunk
row-keep mask reduced across the group with warp votes to predicate the V copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.code_scan.kernel_triton import dot_nt, forced_tile, gather_rows
from pallas_kernels.common import compiler_params

_HI = jax.lax.Precision.HIGHEST


def _pv(p, v):
    """p f32 [Gp, R], v [R, D] -> f32 [Gp, D] (16-bit values: 16-bit P, f32 accumulation)."""
    if v.dtype == jnp.float32:
        return jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=(_HI, _HI),
                                   preferred_element_type=jnp.float32)
    return jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _online(carry, s, att, v_ref, pos, sm_scale):
    """One online-softmax step over a chunk: s f32 [Gp, R], att bool [Gp, R], rows ``pos`` [R]."""
    o, m, l, n = carry
    logits = jnp.where(att, s * sm_scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    corr = jnp.exp(m - m_safe)
    p = jnp.exp(logits - m_safe[:, None])  # 0 where not attended
    keep = jnp.max(att.astype(jnp.int32), axis=0) > 0  # [R]: rows some head attends
    v = gather_rows(v_ref, pos, mask=keep)
    o = o * corr[:, None] + _pv(p, v)
    l = l * corr + jnp.sum(p, axis=1)
    return o, m_new, l, n + jnp.sum(att.astype(jnp.int32), axis=1)


def _refine_kernel(
    len_ref,  # [1] int32
    cnt_ref,  # [1] int32: the split's true candidate count
    cidx_ref,  # [Cp] int32: the split's candidate list (-1 padded)
    q_ref,  # [Gp, D] score dtype
    qsl_ref,  # [Gp] f32: rounding_slack·‖q‖₁
    thr_ref,  # [Gp] f32: m_base - β (+inf on padded rows)
    k_ref,  # [S, D]
    v_ref,  # [S, D]
    o_ref,  # [Gp, D] f32 (out): normalised partial
    lse_ref,  # [Gp] f32 (out)
    mx_ref,  # [Gp] f32 (out): max exact score seen
    n_ref,  # [Gp] int32 (out): keys attended
    *,
    g: int,
    sink: int,
    window: int,
    num_splits: int,
    capacity: int,
    chunk: int,
    fsize: int,
    sm_scale: float,
    max_only: bool,
):
    gp, d = q_ref.shape
    length = len_ref[0]
    is_forced = pl.program_id(2) == num_splits
    q = q_ref[...]
    qsl = qsl_ref[...]
    thr = thr_ref[...][:, None]
    rows = jax.lax.broadcasted_iota(jnp.int32, (gp, 1), 0) < g
    lanes = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    n_list = jnp.where(is_forced, 0, jnp.minimum(cnt_ref[0], capacity))

    # the forced positions (all attended), fully masked outside program NS
    fpos, fok, s_f, _ = forced_tile(q, qsl, k_ref, length, sink=sink, window=window, size=fsize)
    fok = fok & is_forced
    mx = jnp.max(jnp.where(fok[None, :], s_f, -jnp.inf), axis=1)

    def chunk_scores(c, mx):
        """Chunk c of the list: (listed [R], pos [R], k [R, D], s f32 [Gp, R], mx updated)."""
        slot = c * chunk + lanes
        idx = cidx_ref[pl.ds(c * chunk, chunk)]
        listed = (slot < n_list) & (idx >= 0)
        pos = jnp.where(listed, idx, 0)
        k = gather_rows(k_ref, pos, mask=listed)
        s = dot_nt(q, k)  # [Gp, R]
        return listed, pos, k, s, jnp.maximum(mx, jnp.max(jnp.where(listed[None, :], s, -jnp.inf), axis=1))

    if max_only:  # the max pass: exact max over forced ∪ listed, no V, no softmax
        def scores_max(c, mx):
            return chunk_scores(c, mx)[-1]

        mx_ref[...] = jax.lax.fori_loop(0, (n_list + chunk - 1) // chunk, scores_max, mx)
        o_ref[...] = jnp.zeros((gp, d), jnp.float32)
        lse_ref[...] = jnp.full((gp,), -jnp.inf, jnp.float32)
        n_ref[...] = jnp.zeros((gp,), jnp.int32)
        return
    att_f = fok[None, :] & rows
    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
            jnp.zeros((gp,), jnp.float32), jnp.zeros((gp,), jnp.int32))
    carry = _online(init, s_f, att_f, v_ref, fpos, sm_scale)

    def body(c, state):
        carry, mx = state
        listed, pos, k, s, mx = chunk_scores(c, mx)
        kinf = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=1)[None, :]
        att = listed[None, :] & (s + qsl[:, None] * kinf >= thr) & rows
        return _online(carry, s, att, v_ref, pos, sm_scale), mx

    (o, m, l, n), mx = jax.lax.fori_loop(0, (n_list + chunk - 1) // chunk, body, (carry, mx))
    has = l > 0
    l1 = jnp.where(has, l, 1.0)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    o_ref[...] = jnp.where(has[:, None], o / l1[:, None], 0.0)
    lse_ref[...] = jnp.where(has, m_safe + jnp.log(l1), -jnp.inf)
    mx_ref[...] = mx
    n_ref[...] = n


def refine_attention_pallas(
    lengths,  # [B] int32
    counts,  # [B, Hkv, NS] int32
    cand_idx,  # [B, Hkv, NS, Cp] int32 (Cp a multiple of chunk)
    q,  # [B, Hkv, Gp, D] score dtype
    qslack,  # [B, Hkv, Gp] f32
    thr,  # [B, Hkv, Gp] f32
    keys,  # [B, Hkv, S, D]
    values,  # [B, Hkv, S, D]
    *,
    g: int,
    sink: int,
    window: int,
    capacity: int,
    chunk: int,
    fsize: int,
    sm_scale: float,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 2,
    max_only: bool = False,
):
    """Returns (outs [NS+1,B,Hkv,Gp,D] f32, lses, maxes [NS+1,B,Hkv,Gp] f32, n [NS+1,B,Hkv,Gp] i32).
    ``max_only``: only the maxes (outs 0, lses -inf, n 0; ``values`` is not read)."""
    b, hkv, gp, d = q.shape
    ns, cp = cand_idx.shape[2], cand_idx.shape[3]
    s_cap = keys.shape[2]
    kernel = functools.partial(_refine_kernel, g=g, sink=sink, window=window, num_splits=ns,
                               capacity=capacity, chunk=chunk, fsize=fsize, sm_scale=float(sm_scale),
                               max_only=bool(max_only))
    row = lambda i, h, j: (i, h, 0)  # noqa: E731
    mat = lambda i, h, j: (i, h, 0, 0)  # noqa: E731
    last = ns - 1
    part = lambda i, h, j: (j, i, h, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, ns + 1),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (i,)),
            pl.BlockSpec((None, None, 1), lambda i, h, j: (i, h, jnp.minimum(j, last))),
            pl.BlockSpec((None, None, None, cp), lambda i, h, j: (i, h, jnp.minimum(j, last), 0)),
            pl.BlockSpec((None, None, gp, d), mat),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, s_cap, d), mat),
            pl.BlockSpec((None, None, s_cap, d), mat),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, j: (j, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), part),
            pl.BlockSpec((None, None, None, gp), part),
            pl.BlockSpec((None, None, None, gp), part),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((ns + 1, b, hkv, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((ns + 1, b, hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((ns + 1, b, hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((ns + 1, b, hkv, gp), jnp.int32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="refine_attention",
    )(lengths, counts, cand_idx, q, qslack, thr, keys, values)
