"""Plain-jnp reference of the code scan (filter step of filter-refine DIPR).

For query head g of KV head h: the exact max M_sw over the forced positions, the estimate
est and bound δ of every searched key (key_codes.estimate / key_codes.bound_from_norms),
candidates = searched keys with not(est + δ < M_sw' - β) for some g of the group, where
M_sw' = max over forced f of (s_f - rounding_slack·‖q‖₁·‖k_f‖∞) <= M_sw (so a refine that
sums the forced scores in another order can never sit below the threshold used here), and
per split: the candidates in ascending order (the first ``capacity``), their true count and
max(est - δ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan.layout import forced_positions, searched_end, split_of_position
from pallas_kernels.common import query_slack, score_operand_dtype
from pallas_kernels.key_codes import bound_from_norms, estimate, query_norms

_HI = jax.lax.Precision.HIGHEST


def exact_scores(q, k):
    """q [..., G, D], k [..., N, D] -> f32 [..., G, N], the refine's arithmetic: both in the same
    16-bit dtype -> 16-bit products (exact) with f32 sums; otherwise f32 (HIGHEST)."""
    dt = score_operand_dtype(q.dtype, k.dtype, "auto")
    if dt == jnp.float32:
        return jnp.einsum("...gd,...nd->...gn", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HI)
    return jnp.einsum("...gd,...nd->...gn", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)


def forced_scores(q, keys, lengths, *, sink, window, rounding_slack):
    """Exact scores of the forced positions.

    q [B, Hq, D]; keys [B, Hkv, S, D] -> (pos [B, F], ok [B, F], s f32 [B, Hkv, G, F],
    s_lo f32 [B, Hkv, G, F] = s - rounding_slack·‖q‖₁·‖k‖∞), -inf where not ok.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    f = max(1, sink + window)
    pos, ok = forced_positions(lengths, sink=sink, window=window, size=f)
    kf = jnp.take_along_axis(keys, pos[:, None, :, None], axis=2)  # [B, Hkv, F, D]
    kf = jnp.where(ok[:, None, :, None], kf, jnp.zeros_like(kf))  # NaN padding -> 0
    qg = q.reshape(b, hkv, g, d)
    s = exact_scores(qg, kf)
    kinf = jnp.max(jnp.abs(kf.astype(jnp.float32)), axis=-1)  # [B, Hkv, F]
    s_lo = s - query_slack(qg, rounding_slack)[..., None] * kinf[:, :, None, :]
    okb = ok[:, None, None, :]
    return pos, ok, jnp.where(okb, s, -jnp.inf), jnp.where(okb, s_lo, -jnp.inf)


def code_scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, sink, window, num_splits,
                        capacity, tile_size, rounding_slack):
    b, hq, d = q.shape
    _, hkv, s_cap, _ = keys.shape
    g = hq // hkv
    ns = num_splits
    _, _, s_f, s_lo = forced_scores(q, keys, lengths, sink=sink, window=window, rounding_slack=rounding_slack)
    m_sw = jnp.max(s_f, axis=-1).reshape(b, hq)
    thr = jnp.max(s_lo, axis=-1) - beta.astype(jnp.float32).reshape(b, hkv, g)  # [B, Hkv, G]

    qr = q_rot.astype(jnp.float32).reshape(b, hkv, g, d)
    est = estimate(qr, codes, scales)  # [B, Hkv, G, S]
    l1, l2 = query_norms(qr)
    delta = bound_from_norms(l1[..., None], l2[..., None], scales[:, :, None, :], errs[:, :, None, :], d)

    pos = jnp.arange(s_cap, dtype=jnp.int32)
    L = lengths[:, None]
    searched = (pos[None] >= sink) & (pos[None] < searched_end(L, sink=sink, window=window))  # [B, S]
    hit = ~(est + delta < thr[..., None])  # NaN (vacuous bound) counts as a hit
    cand = searched[:, None] & jnp.any(hit, axis=2)  # [B, Hkv, S]
    lb = est - delta
    lb = jnp.where(searched[:, None, None] & ~jnp.isnan(lb), lb, -jnp.inf)  # [B, Hkv, G, S]

    split = split_of_position(pos[None], L, sink=sink, window=window, tile=tile_size, num_splits=ns)  # [B, S]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hkv)[None, :, None]
    sp = jnp.broadcast_to(split[:, None, :], (b, hkv, s_cap))
    counts = jnp.zeros((b, hkv, ns), jnp.int32).at[bi, hi, sp].add(cand.astype(jnp.int32))
    lb_max = jnp.full((b, hkv, g, ns), -jnp.inf, jnp.float32).at[
        bi[..., None], hi[..., None], jnp.arange(g)[None, None, :, None], sp[:, :, None, :]].max(lb)
    rank = jnp.cumsum(cand.astype(jnp.int32), axis=-1) - 1  # rank among the sequence's candidates
    first = jnp.cumsum(counts, axis=-1) - counts  # rank of each split's first candidate
    slot = rank - jnp.take_along_axis(first, sp, axis=-1)
    slot = jnp.where(cand & (slot < capacity), slot, capacity)  # capacity: dropped (out of bounds)
    cand_idx = jnp.full((b, hkv, ns, capacity), -1, jnp.int32).at[bi, hi, sp, slot].set(
        jnp.broadcast_to(pos, (b, hkv, s_cap)), mode="drop")
    return cand_idx, counts, lb_max.reshape(b, hq, ns), m_sw
