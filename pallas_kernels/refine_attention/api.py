"""Public wrapper: refine_attention(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, *, ...).

``IMPLEMENTATIONS`` maps each backend name (``implementation=``) to the function that runs it on validated
arguments; it is the one list of the op's backends.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan.api import check_scan_args, row_forced
from pallas_kernels.common import (
    check_implementation, group_rows, next_pow2, pad_axis, resolve_interpret, resolve_rounding_slack,
    score_operand_dtype, ungroup_rows,
)
from pallas_kernels.code_scan.reference import ScanTail
from pallas_kernels.refine_attention.reference import normalise, refine_attention_reference, scan_tail_at

DEFAULT_CHUNK = 64  # candidate slots per refine step


def default_programs(batch: int, num_kv_heads: int) -> int:
    """Refine programs per (batch row, KV head): a power of two giving at least 1024 programs (each
    takes every P-th chunk of the candidates, so their number only sets how finely they are dealt)."""
    return max(1, next_pow2(-(-1024 // max(1, int(batch) * int(num_kv_heads)))))


def refine_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    cand_idx: jax.Array,
    cand_count: jax.Array,
    m_sw: jax.Array,
    lengths: jax.Array,
    beta,
    *,
    sink: int,
    window: int,
    sm_scale: Optional[float] = None,
    rounding_slack: Optional[float] = None,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    programs: Optional[int] = None,
    chunk: int = DEFAULT_CHUNK,
    num_warps: int = 4,
    num_stages: int = 2,
    forced: Optional[tuple[jax.Array, jax.Array]] = None,
    max_reduce: Optional[Callable[[jax.Array], jax.Array]] = None,
    partials: bool = False,
    tail: Optional[ScanTail] = None,
    value_means: Optional[jax.Array] = None,
    block_size: Optional[int] = None,
):
    """Refine and attend: exact DIPR ∪ sink ∪ window attention from the code scan's candidate lists.

    Args:
      q: [B, Hq, D]; keys, values: [B, Hkv, S, D] (garbage/NaN past each length).
      cand_idx: i32 [B, Hkv, NS, L], cand_count: i32 [B, Hkv, NS] (``code_scan``'s lists: the first
        count slots of each split, distinct, valid, searched positions; a slot set to -1 is skipped: a
        filter's way to drop a candidate); m_sw: f32 [B, Hq], the scan's max over the forced positions.
      lengths: [B] int32; beta: f32 [B, Hq] (or broadcastable), >= 0, may be +inf.
      A candidate is attended when s + rounding_slack·‖q‖₁·‖k‖∞ >= M − β (None: 2·D·2^-24), with
      M = max(m_sw, the candidates' exact scores); the forced positions are always attended.
      programs: refine programs per (b, KV head) (Pallas; a power of two; None: ``default_programs``);
      chunk: candidate slots per step (a power of two >= 16).
      forced: each row's own ``(sinks [B], windows [B])`` forced counts (``code_scan``'s; None: sink and
        window for every row).
      max_reduce: applied to M f32 [B, Hq] between the score pass and the attend pass (a shard of a
        sequence-sharded store: ``lax.pmax`` over the devices, so that every shard attends with the one
        global M; None: the identity).
      partials: return the attend pass's sums instead of the normalised output (see below).
      tail: the scan's ``ScanTail`` (``code_scan(..., value_means=...)``) or None (a static switch: None runs
        the kernels without the tail, exactly as before); with value_means [B, Hkv, S / block_size, D] (the
        same the scan took; any float dtype): the estimated tail over every searched key not attended is added
        to the softmax — out = (Σ_att e^{s·c} v + Σ_b w_b V̄_b) / (Σ_att e^{s·c} + Σ_b w_b), w_b = Σ_{rest ∩ b} e^{ŝ·c}
        (c = sm_scale; rest = the scan's non-candidates and the candidates rejected here). Not with
        ``max_reduce`` (refused: a shard's scan tail is relative to its own forced maximum).
    Returns:
      out [B, Hq, D] (q dtype), M f32 [B, Hq] (the exact max when the lists hold every candidate of the
      scan: -inf if nothing is forced or listed), n_attended i32 [B, Hq] (forced included). With
      ``partials``: ``(o f32 [B, Hq, D] = Σ p·v, l f32 [B, Hq] = Σ p, n_attended, M)``, p = exp((s − M)·sm_scale),
      which add up over shards that share M (:func:`normalise` makes ``out``); with a tail, its sums included.
    """
    op = "refine_attention"
    check_implementation(implementation, op, IMPLEMENTATIONS)
    check_scan_args(op, q, keys, lengths, sink=sink, window=window)
    b, hq, d = q.shape
    hkv = keys.shape[1]
    if values.shape != keys.shape:
        raise ValueError(f"{op}: values{tuple(values.shape)} must match keys{tuple(keys.shape)}")
    if cand_idx.ndim != 4 or tuple(cand_idx.shape[:2]) != (b, hkv):
        raise ValueError(f"{op}: cand_idx must be [B, Hkv, NS, L] with B, Hkv = {(b, hkv)}, got "
                         f"{tuple(cand_idx.shape)}")
    if tuple(cand_count.shape) != tuple(cand_idx.shape[:3]):
        raise ValueError(f"{op}: cand_count must be [B, Hkv, NS]={tuple(cand_idx.shape[:3])}, got "
                         f"{tuple(cand_count.shape)}")
    if tuple(m_sw.shape) != (b, hq):
        raise ValueError(f"{op}: m_sw must be [B, Hq]={(b, hq)}, got {tuple(m_sw.shape)}")
    r = int(chunk)
    if r < 16 or r & (r - 1):
        raise ValueError(f"{op}: chunk must be a power of two >= 16, got {chunk}")
    p = default_programs(b, hkv) if programs is None else int(programs)
    if p < 1 or p & (p - 1):
        raise ValueError(f"{op}: programs must be a power of two >= 1, got {programs}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    slack = resolve_rounding_slack(rounding_slack, d, op)
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, hq))
    tail_kw = {}
    if tail is not None:
        if max_reduce is not None:
            raise ValueError(f"{op}: a tail with max_reduce is not supported: the scan's tail sums are relative to "
                             "each shard's own forced maximum M_sw, which a shard may not have (the estimated tail "
                             "is not supported on a sharded store yet)")
        s_cap, g = keys.shape[2], hq // hkv
        bk = 0 if block_size is None else int(block_size)
        if value_means is None or bk < 1 or s_cap % bk or tuple(value_means.shape) != (b, hkv, s_cap // bk, d):
            got = None if value_means is None else tuple(value_means.shape)
            raise ValueError(f"{op}: a tail needs value_means [B, Hkv, S / block_size, D] with block_size >= 1 "
                             f"dividing S={s_cap}; got value_means {got}, block_size={block_size}")
        ns = cand_idx.shape[2]
        if (tail.est.shape[:3] != (b, hkv, s_cap) or tail.est.shape[3] < g or tail.o.shape[:3] != (b, hkv, ns)
                or tail.l.shape[:3] != (b, hkv, ns)):
            raise ValueError(f"{op}: tail arrays est{tuple(tail.est.shape)}, o{tuple(tail.o.shape)}, "
                             f"l{tuple(tail.l.shape)} do not match B, Hkv, S, NS = {(b, hkv, s_cap, ns)} and G = {g}")
        tail_kw = dict(tail=tail, value_means=value_means, block_size=bk)
    o, l, n, m = IMPLEMENTATIONS[implementation](
        q, keys, values, jnp.asarray(cand_idx, jnp.int32), jnp.asarray(cand_count, jnp.int32),
        jnp.asarray(m_sw, jnp.float32), jnp.asarray(lengths, jnp.int32), beta, sink=int(sink), window=int(window),
        sm_scale=sm_scale, rounding_slack=slack, interpret=interpret, programs=p, chunk=r, num_warps=num_warps,
        num_stages=num_stages, forced=row_forced(forced, b, sink=sink, window=window, op=op), max_reduce=max_reduce,
        **tail_kw)
    if partials:
        return o, l, n, m
    return normalise(o, l).astype(q.dtype), m, n


def _refine_reference(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, *, interpret, programs, chunk,
                      num_warps, num_stages, **kw):
    del interpret, programs, chunk, num_warps, num_stages  # Pallas knobs
    return refine_attention_reference(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, **kw)


def _refine_pallas(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, *, sink, window, sm_scale,
                   rounding_slack, interpret, programs, chunk, num_warps, num_stages, forced, max_reduce, tail=None,
                   value_means=None, block_size=0):
    interpret = resolve_interpret(interpret, "refine_attention")
    from pallas_kernels.refine_attention.attend_triton import attend_pallas
    from pallas_kernels.refine_attention.score_triton import score_pallas

    hkv = keys.shape[1]
    g = q.shape[1] // hkv
    qg = group_rows(q.astype(score_operand_dtype(q.dtype, keys.dtype, "auto")), hkv)
    knobs = dict(chunk=chunk, interpret=interpret, num_warps=int(num_warps), num_stages=int(num_stages))
    idx, s, kinf, mx = score_pallas(cand_count, cand_idx, qg, keys, g=g, programs=programs, **knobs)
    if max_reduce is not None:  # the attend kernel takes max(m_sw, the P maxima): give it the reduced M as m_sw
        m_local = jnp.maximum(m_sw, ungroup_rows(jnp.max(mx, axis=2), g))
        m_sw = max_reduce(m_local)
    msw_g = group_rows(m_sw, hkv, value=-jnp.inf)
    gi = qg.shape[2]
    tail_kw = {} if tail is None else dict(est=rows_to(tail.est, 3, gi), value_means=value_means,
                                           block_size=block_size)
    o, l, n, m, *rej = attend_pallas(lengths, *forced, cand_count, idx, s, kinf, mx, msw_g, group_rows(beta, hkv),
                                     qg, keys, values, g=g, sink=sink, window=window, sm_scale=sm_scale,
                                     rounding_slack=rounding_slack, **knobs, **tail_kw)
    if tail is None:
        return sum_partials(o, l, n, m, g=g)
    num, den = jnp.sum(o, axis=2)[:, :, :g] + jnp.sum(rej[0], axis=2)[:, :, :g], \
        jnp.sum(l, axis=2)[:, :, :g] + jnp.sum(rej[1], axis=2)[:, :, :g]
    o_s, l_s = scan_tail_at(tail, msw_g[:, :, :g], m[:, :, :g], g=g, sm_scale=sm_scale)
    return (ungroup_rows(num + o_s, g), ungroup_rows(den + l_s, g), ungroup_rows(jnp.sum(n, axis=2)[:, :, :g], g),
            ungroup_rows(m[:, :, :g], g))


def rows_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x with ``axis`` cut or zero-padded to ``size`` rows (the kernels' padded group rows)."""
    if x.shape[axis] >= size:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    return pad_axis(x, axis, size)


def sum_partials(o, l, n, m, *, g: int):
    """The attend pass's P + 1 partials (one exact max M for all of them: plain sums) -> (o f32 [B, Hq, D],
    l f32 [B, Hq], n_attended i32 [B, Hq], M f32 [B, Hq])."""
    return (ungroup_rows(jnp.sum(o, axis=2), g), ungroup_rows(jnp.sum(l, axis=2), g),
            ungroup_rows(jnp.sum(n, axis=2), g), ungroup_rows(m, g))


#: The backends of ``refine_attention`` by name: "reference" (plain jnp), "pallas" (the two Triton-lowered
#: kernels, score pass and attend pass; interpret mode on the CPU).
IMPLEMENTATIONS = MappingProxyType({"reference": _refine_reference, "pallas": _refine_pallas})
