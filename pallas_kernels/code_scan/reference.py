"""Plain-jnp reference of the code scan (filter step of filter-refine DIPR), with the kernel's arithmetic.

For query head g of KV head h: the exact scores of the forced positions, their max M_sw and the threshold
M_sw − β; per searched key the estimate from the two int8 query planes and the bound
(``arithmetic``: the same functions the kernel calls on its tiles, so the two differ only in the order of
a few f32 sums); candidates = searched keys with not(est + δ < thr) for some g of the group; per split the
candidates in ascending order and their count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan import arithmetic as ar
from pallas_kernels.code_scan.layout import forced_positions, searched_end, split_of_position
from pallas_kernels.common import score_operand_dtype

_HI = jax.lax.Precision.HIGHEST


def exact_scores(q, k):
    """q [..., G, D], k [..., N, D] -> f32 [..., G, N], the refine's arithmetic: both in the same
    16-bit dtype -> 16-bit products (exact) with f32 sums; otherwise f32 (HIGHEST)."""
    dt = score_operand_dtype(q.dtype, k.dtype, "auto")
    if dt == jnp.float32:
        return jnp.einsum("...gd,...nd->...gn", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HI)
    return jnp.einsum("...gd,...nd->...gn", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)


def forced_scores(q, keys, lengths, *, sink, window, forced=None):
    """Exact scores of the forced positions.

    q [B, Hq, D]; keys [B, Hkv, S, D] -> (pos [B, F], ok [B, F], s f32 [B, Hkv, G, F] (-inf where not ok)).
    ``forced``: None, or each row's own (sinks [B], windows [B]) int32, at most ``sink`` / ``window``
    (which size F).
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    f = max(1, sink + window)
    rs, rw = (sink, window) if forced is None else forced
    pos, ok = forced_positions(lengths, sink=rs, window=rw, size=f)
    pos = jnp.minimum(pos, keys.shape[2] - 1)
    kf = jnp.take_along_axis(keys, pos[:, None, :, None], axis=2)  # [B, Hkv, F, D]
    kf = jnp.where(ok[:, None, :, None], kf, jnp.zeros_like(kf))  # NaN padding -> 0
    s = exact_scores(q.reshape(b, hkv, g, d), kf)
    return pos, ok, jnp.where(ok[:, None, None, :], s, -jnp.inf)


def scan_flags_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, sink, window, rounding_slack,
                         forced=None, m_lb=None):
    """(candidates bool [B, Hkv, S], m_sw f32 [B, Hkv, G], est f32 [B, Hkv, S, G], δ f32 [B, Hkv, S, G],
    thr f32 [B, Hkv, G]): the scan's test for every searched key, and its terms (for tests). ``forced``:
    see :func:`forced_scores`; ``m_lb`` f32 [B, Hq] or None: a lower bound of M known from elsewhere
    (thr = max(M_sw, m_lb) − β)."""
    b, hq, d = q.shape
    _, hkv, s_cap, _ = keys.shape
    g = hq // hkv
    dh = d // 2
    _, _, s_f = forced_scores(q, keys, lengths, sink=sink, window=window, forced=forced)
    m_sw = jnp.max(s_f, axis=-1)  # [B, Hkv, G]
    m_thr = m_sw if m_lb is None else jnp.maximum(m_sw, m_lb.astype(jnp.float32).reshape(b, hkv, g))
    thr = m_thr - beta.astype(jnp.float32).reshape(b, hkv, g)
    q_l1 = jnp.sum(jnp.abs(q.astype(score_operand_dtype(q.dtype, keys.dtype, "auto")).astype(jnp.float32)),
                   axis=-1).reshape(b, hkv, g)
    qr = q_rot.astype(jnp.float32).reshape(b, hkv, g, d)
    parts = [qr[..., :dh], qr[..., dh:]]
    (n1_lo, n1_hi), (n2_lo, n2_hi), s1, s2, dq = ar.split_query(parts, d)
    l1 = jnp.sum(jnp.abs(parts[0]), axis=-1) + jnp.sum(jnp.abs(parts[1]), axis=-1)
    l2 = jnp.sqrt(jnp.sum(parts[0] * parts[0], axis=-1) + jnp.sum(parts[1] * parts[1], axis=-1))
    ca, cb, ce = ar.row_coefficients(l1, l2, dq, q_l1, head_dim=d, rounding_slack=rounding_slack)

    def cols(n1, n2):  # [B, Hkv, G, D/2] x2 -> int8 [B, Hkv, 2G, D/2]: plane 1 rows, then plane 2 rows
        return jnp.concatenate([n1, n2], axis=2).astype(jnp.int8)

    lo, hi = ar.code_operands(codes)  # int8 [B, Hkv, S, D/2]
    a = (16 * jnp.einsum("bhsd,bhcd->bhsc", lo, cols(n1_lo, n2_lo), preferred_element_type=jnp.int32)
         + jnp.einsum("bhsd,bhcd->bhsc", hi, cols(n1_hi, n2_hi), preferred_element_type=jnp.int32))
    sc = scales[..., None]
    est = ar.estimate(a, ar.side_by_side(s1 / 16.0, s2 / 16.0)[:, :, None, :],
                      ar.plane_offset(n1_lo, n2_lo, s1, s2)[:, :, None, :], sc.astype(jnp.float32), rows=g)
    delta = ar.key_bound(ca[:, :, None, :], cb[:, :, None, :], ce[:, :, None, :], sc, errs[..., None])
    hit = ar.is_candidate(est, delta, thr[:, :, None, :])  # [B, Hkv, S, G]
    pos = jnp.arange(s_cap, dtype=jnp.int32)
    rs, rw = _row_forced(forced, sink, window)
    searched = (pos[None] >= rs) & (pos[None] < searched_end(lengths[:, None], sink=rs, window=rw))
    return searched[:, None] & jnp.any(hit, axis=-1), m_sw, est, delta, thr


def _row_forced(forced, sink, window):
    """(sinks, windows) broadcastable against [B, S] positions."""
    if forced is None:
        return sink, window
    return forced[0][:, None], forced[1][:, None]


def code_scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, sink, window, num_splits, tile,
                        list_size, rounding_slack, forced=None, m_lb=None):
    """(cand_idx i32 [B, Hkv, NS, list_size] (-1 past the count), cand_count i32 [B, Hkv, NS], m_sw f32
    [B, Hq])."""
    b, hq, _ = q.shape
    _, hkv, s_cap, _ = keys.shape
    cand, m_sw, _, _, _ = scan_flags_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, sink=sink,
                                               window=window, rounding_slack=rounding_slack, forced=forced,
                                               m_lb=m_lb)
    pos = jnp.arange(s_cap, dtype=jnp.int32)
    rs, rw = _row_forced(forced, sink, window)
    split = split_of_position(pos[None], lengths[:, None], sink=rs, window=rw, tile=tile,
                              num_splits=num_splits)  # [B, S]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hkv)[None, :, None]
    sp = jnp.broadcast_to(split[:, None, :], (b, hkv, s_cap))
    counts = jnp.zeros((b, hkv, num_splits), jnp.int32).at[bi, hi, sp].add(cand.astype(jnp.int32))
    rank = jnp.cumsum(cand.astype(jnp.int32), axis=-1) - 1  # rank among the sequence's candidates
    first = jnp.cumsum(counts, axis=-1) - counts  # rank of each split's first candidate
    slot = jnp.where(cand, rank - jnp.take_along_axis(first, sp, axis=-1), list_size)  # list_size: dropped
    cand_idx = jnp.full((b, hkv, num_splits, list_size), -1, jnp.int32).at[bi, hi, sp, slot].set(
        jnp.broadcast_to(pos, (b, hkv, s_cap)), mode="drop")
    return cand_idx, counts, m_sw.reshape(b, hq)
