"""Plain-jnp reference of the code scan (filter step of filter-refine DIPR), with the kernel's arithmetic.

For query head g of KV head h: the exact scores of the forced positions, their max M_sw and the threshold
M_sw − β; per searched key the estimate from the two int8 query planes and the bound
(``arithmetic``: the same functions the kernel calls on its tiles, so the two differ only in the order of
a few f32 sums); candidates = searched keys with not(est + δ < thr) for some g of the group; per split the
candidates in ascending order and their count.
"""

from __future__ import annotations

from typing import NamedTuple

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


def searched_positions(pos, lengths, *, sink, window):
    """bool [B, S]: the positions ``pos`` [S] the scan searches, sink <= p < length − window (``sink`` /
    ``window``: ints, or each row's own counts broadcastable against [B, S]: see :func:`_row_forced`)."""
    return (pos[None] >= sink) & (pos[None] < searched_end(lengths[:, None], sink=sink, window=window))


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
    searched = searched_positions(pos, lengths, sink=rs, window=rw)  # [B, S]
    return searched[:, None] & jnp.any(hit, axis=-1), m_sw, est, delta, thr


def _row_forced(forced, sink, window):
    """(sinks, windows) broadcastable against [B, S] positions."""
    if forced is None:
        return sink, window
    return forced[0][:, None], forced[1][:, None]


class ScanTail(NamedTuple):
    """The code scan's part of the estimated tail, rows grouped by KV head (G' >= G rows, the first G
    meaningful: G' = G from the reference, the kernel's padded Gi from Pallas).

    est f32 [B, Hkv, S, G']: the scan's estimates ŝ (defined at the candidates at least: the refine weighs
    the candidates it rejects by them); o f32 [B, Hkv, NS, G', D] = Σ_b w_b·V̄_b and l f32 [B, Hkv, NS, G']
    = Σ w over each split's searched keys that are not candidates, w = exp((ŝ − M_sw')·sm_scale) with
    M_sw' = M_sw (0 where M_sw = -inf: then no searched key is a non-candidate)."""
    est: jax.Array
    o: jax.Array
    l: jax.Array


def scan_tail_reference(est, cand, lengths, m_sw, value_means, *, sink, window, num_splits, tile, block_size,
                        sm_scale) -> ScanTail:
    """The scan's tail sums in jnp: est f32 [B, Hkv, S, G] and cand bool [B, Hkv, S] of
    :func:`scan_flags_reference`, m_sw f32 [B, Hkv, G], value_means f32 [B, Hkv, S / block_size, D];
    ``sink`` / ``window``: ints or each row's counts broadcastable against [B, S] (:func:`_row_forced`)."""
    b, hkv, s_cap, g = est.shape
    nb = value_means.shape[2]
    pos = jnp.arange(s_cap, dtype=jnp.int32)
    searched = searched_positions(pos, lengths, sink=sink, window=window)  # [B, S]
    rest = searched[:, None] & ~cand  # [B, Hkv, S]
    ref = jnp.where(m_sw > -jnp.inf, m_sw, 0.0)
    w = jnp.where(rest[..., None], jnp.exp((est - ref[:, :, None, :]) * jnp.float32(sm_scale)), 0.0)
    split = split_of_position(pos[None], lengths[:, None], sink=sink, window=window, tile=tile,
                              num_splits=num_splits)  # [B, S]
    onehot = (split[:, None, :, None] == jnp.arange(num_splits)).astype(jnp.float32)  # [B, 1, S, NS]
    wb = jnp.einsum("bhsg,bhsj->bhsgj", w, jnp.broadcast_to(onehot, (b, hkv, s_cap, num_splits)))
    wb = jnp.sum(wb.reshape(b, hkv, nb, block_size, g, num_splits), axis=3)  # [B, Hkv, NB, G, NS] = w_b
    vm = jnp.where(jnp.any(wb > 0, axis=(3, 4))[..., None], value_means.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhngj,bhnd->bhjgd", wb, vm, precision=_HI)
    return ScanTail(est=est, o=o, l=jnp.sum(wb, axis=2).transpose(0, 1, 3, 2))


def code_scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, sink, window, num_splits, tile,
                        list_size, rounding_slack, forced=None, m_lb=None, value_means=None, block_size=0,
                        sm_scale=0.0):
    """(cand_idx i32 [B, Hkv, NS, list_size] (-1 past the count), cand_count i32 [B, Hkv, NS], m_sw f32
    [B, Hq]), and with ``value_means`` a :class:`ScanTail`."""
    b, hq, _ = q.shape
    _, hkv, s_cap, _ = keys.shape
    cand, m_sw, est, _, _ = scan_flags_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, sink=sink,
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
    if value_means is None:
        return cand_idx, counts, m_sw.reshape(b, hq)
    tail = scan_tail_reference(est, cand, lengths, m_sw, value_means, sink=rs, window=rw,
                               num_splits=num_splits, tile=tile, block_size=block_size, sm_scale=sm_scale)
    return cand_idx, counts, m_sw.reshape(b, hq), tail
