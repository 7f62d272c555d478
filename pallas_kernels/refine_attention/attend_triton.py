"""Pallas kernel (Triton lowering) of the refine's attend pass: exact DIPR attention from the scored candidates.

Grid (B, Hkv, P + 1). Every program first takes the exact max M = max(M_sw, the score pass's P maxes) of
its group's rows (the scan's M_sw: see ``code_scan.arithmetic`` for why the refine never rescores it), so
the weights p = exp((s − M)·scale) need no running max and no rescaling, and the P + 1 partial sums add
up without a log-sum-exp merge. Programs p < P walk the same chunks of slots as the score pass (program p:
chunks p, p + P, ...), read the stored positions, scores and ‖k‖∞ (no key is read again), attend a
candidate when s + σ·‖q‖₁·‖k‖∞ >= M − β, gather V only for the rows some head of the group attends
(a masked gather: the other rows are not read) and accumulate oᵀ += Vᵀ·p by one MMA ([D, R] x [R, Gr]);
Σp and the count attended are kept elementwise ([R, Gr]) and reduced once after the loop. Program P
attends the forced positions (sink and window, always attended; scored here, their V gathered by index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.code_scan.kernel_triton import (
    dot_tn, forced_scores_tile, forced_size, gather_rows, query_tile, row_vector, store_rows, store_transposed,
)
from pallas_kernels.common import compiler_params
from pallas_kernels.refine_attention.score_triton import chunk_slots


def _attend_kernel(len_ref, sink_ref, win_ref, cnt_ref, idx_ref, s_ref, kinf_ref, mx_ref, msw_ref, beta_ref, q_ref,
                   k_ref, v_ref, *refs, g: int, rows: int, forced_rows: int, chunk: int, programs: int,
                   sm_scale: float, rounding_slack: float, block_size: int = 0):
    tail = block_size > 0
    if tail:
        est_ref, vm_ref, o_ref, l_ref, n_ref, m_ref, to_ref, tl_ref = refs
    else:
        o_ref, l_ref, n_ref, m_ref = refs
    gi, d = q_ref.shape
    sl = idx_ref.shape[0]
    length, sink, window = len_ref[0], sink_ref[0], win_ref[0]  # the row's own forced counts
    live = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < g
    m = jnp.maximum(row_vector(msw_ref, rows, g, -jnp.inf), jnp.max(mx_ref[...], axis=0))  # [Gr] exact M
    m = jnp.where(live, m, -jnp.inf)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    thr = m - row_vector(beta_ref, rows, g, 0.0)
    q = query_tile(q_ref, rows, g)  # [Gr, D] score dtype
    qsl = jnp.float32(rounding_slack) * jnp.sum(jnp.abs(q.astype(jnp.float32)), axis=1)
    total, p, mine = chunk_slots(cnt_ref, chunk, programs)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)

    def forced():
        pos, ok, s = forced_scores_tile(q, k_ref, length, sink=sink, window=window, size=forced_rows)
        att = ok[:, None] & live[None, :]
        w = jnp.where(att, jnp.exp((s - m_safe[None, :]) * sm_scale), 0.0)
        v = gather_rows(v_ref, pos, mask=ok)  # [F, D]
        out = (dot_tn(v, w), jnp.sum(w, axis=0), jnp.sum(att.astype(jnp.int32), axis=0))
        if tail:  # the forced positions are always attended: no tail here
            out += (jnp.zeros((d, rows), jnp.float32), jnp.zeros((rows,), jnp.float32))
        return out

    def listed():
        def body(k, carry):
            ot, ls, ns_ = carry[:3]
            slots = (p + k * programs) * chunk + lanes
            valid = slots < total
            at = jnp.minimum(slots, sl - 1)
            idx = plgpu.load(idx_ref.at[at], mask=valid, other=-1)
            valid = valid & (idx >= 0)  # -1: dropped by a filter
            kinf = plgpu.load(kinf_ref.at[at], mask=valid, other=0.0)
            s = plgpu.load(s_ref.at[at[:, None], jnp.minimum(cols, gi - 1)], mask=valid[:, None] & (cols < gi),
                           other=0.0)  # [R, Gr]
            att = valid[:, None] & live[None, :] & (s + kinf[:, None] * qsl[None, :] >= thr[None, :])
            w = jnp.where(att, jnp.exp((s - m_safe[None, :]) * sm_scale), 0.0)
            keep = jnp.max(att.astype(jnp.int32), axis=1) > 0  # rows of V some head attends
            v = gather_rows(v_ref, jnp.where(keep, idx, 0), mask=keep)  # [R, D]
            out = (ot + dot_tn(v, w), ls + w, ns_ + att.astype(jnp.int32))
            if not tail:
                return out
            # the candidates this head rejects are part of the rest: weighed by the scan's estimate
            rej = valid[:, None] & live[None, :] & ~att
            pos = jnp.where(valid, idx, 0)
            e = plgpu.load(est_ref.at[pos[:, None], jnp.minimum(cols, gi - 1)], mask=rej & (cols < gi), other=0.0)
            wt = jnp.where(rej, jnp.exp((e - m_safe[None, :]) * sm_scale), 0.0)
            some = jnp.max(rej.astype(jnp.int32), axis=1) > 0
            vb = gather_rows(vm_ref, jnp.where(some, pos // block_size, 0), mask=some)  # [R, D] block means
            vb = vb.astype(v_ref.dtype)  # in the values' dtype, like the exact part's MMA
            return out + (carry[3] + dot_tn(vb, wt), carry[4] + jnp.sum(wt, axis=0))

        init = (jnp.zeros((d, rows), jnp.float32), jnp.zeros((chunk, rows), jnp.float32),
                jnp.zeros((chunk, rows), jnp.int32))
        if tail:
            init += (jnp.zeros((d, rows), jnp.float32), jnp.zeros((rows,), jnp.float32))
        res = jax.lax.fori_loop(0, mine, body, init)
        return (res[0], jnp.sum(res[1], axis=0), jnp.sum(res[2], axis=0), *res[3:])

    res = jax.lax.cond(p == programs, forced, listed)
    ot, l, n = res[:3]
    store_transposed(o_ref, ot, g)  # oᵀ [D, Gr] -> o [Gi, D]
    store_rows(l_ref, l, g)
    store_rows(n_ref, n, g)
    store_rows(m_ref, m, g)
    if tail:
        store_transposed(to_ref, res[3], g)
        store_rows(tl_ref, res[4], g)


def attend_pallas(lengths, sinks, windows, counts, idx, s, kinf, mx, m_sw, beta, q, keys, values, *, g: int,
                  sink: int, window: int, chunk: int, sm_scale: float, rounding_slack: float, interpret: bool,
                  num_warps: int = 4, num_stages: int = 2, est=None, value_means=None, block_size: int = 0):
    """lengths, sinks, windows [B] (each row's forced counts, <= the static sink / window); counts [B, Hkv, NS];
    idx, s, kinf, mx: the score pass's outputs (P = mx.shape[2]);
    m_sw, beta f32 [B, Hkv, Gi]; q [B, Hkv, Gi, D] (score dtype); keys, values [B, Hkv, S, D] ->
    (o f32 [B, Hkv, P + 1, Gi, D] = Σ p·v, l f32 [B, Hkv, P + 1, Gi] = Σ p, n i32 [B, Hkv, P + 1, Gi]
    keys attended, M f32 [B, Hkv, Gi]), p = exp((s − M)·sm_scale); rows >= G unwritten.

    ``block_size`` > 0 (a static switch; 0 compiles the pass without the tail) with the scan's est f32
    [B, Hkv, S, Gi] and value_means [B, Hkv, S / block_size, D]: also the tail over the candidates
    rejected, appended: o_tail f32 [B, Hkv, P + 1, Gi, D] = Σ w·V̄_block, l_tail f32 [B, Hkv, P + 1, Gi] = Σ w,
    w = exp((ŝ − M)·sm_scale)."""
    b, hkv, ns = counts.shape
    programs, rows = mx.shape[2], mx.shape[3]
    gi, d = q.shape[2], q.shape[3]
    s_cap, sl = keys.shape[2], idx.shape[2]
    tail = block_size > 0
    kernel = functools.partial(_attend_kernel, g=g, rows=rows, forced_rows=forced_size(sink, window), chunk=chunk,
                               programs=programs, sm_scale=float(sm_scale), rounding_slack=float(rounding_slack),
                               **({"block_size": int(block_size)} if tail else {}))
    whole = lambda i, h, j: (i, h, 0)  # noqa: E731
    mat = lambda i, h, j: (i, h, 0, 0)  # noqa: E731
    part = lambda i, h, j: (i, h, j, 0)  # noqa: E731
    per_row = pl.BlockSpec((1,), lambda i, h, j: (i,))
    in_specs = [per_row, per_row, per_row,
                pl.BlockSpec((None, None, ns), whole),
                pl.BlockSpec((None, None, sl), whole),
                pl.BlockSpec((None, None, sl, gi), mat),
                pl.BlockSpec((None, None, sl), whole),
                pl.BlockSpec((None, None, programs, rows), mat),
                pl.BlockSpec((None, None, gi), whole),
                pl.BlockSpec((None, None, gi), whole),
                pl.BlockSpec((None, None, gi, d), mat),
                pl.BlockSpec((None, None, s_cap, d), mat),
                pl.BlockSpec((None, None, s_cap, d), mat)]
    out_specs = [pl.BlockSpec((None, None, None, gi, d), lambda i, h, j: (i, h, j, 0, 0)),
                 pl.BlockSpec((None, None, None, gi), part),
                 pl.BlockSpec((None, None, None, gi), part),
                 pl.BlockSpec((None, None, gi), whole)]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, programs + 1, gi, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, programs + 1, gi), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, programs + 1, gi), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv, gi), jnp.float32)]
    operands = [lengths, sinks, windows, counts, idx, s, kinf, mx, m_sw, beta, q, keys, values]
    if tail:
        in_specs += [pl.BlockSpec((None, None, s_cap, gi), mat),
                     pl.BlockSpec((None, None, value_means.shape[2], d), mat)]
        operands += [est, value_means]
        out_specs += out_specs[:2]
        out_shape += out_shape[:2]
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, programs + 1),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="refine_attend_tail" if tail else "refine_attend",
    )(*operands)
