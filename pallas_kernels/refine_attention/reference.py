"""Plain-jnp reference of refine-and-attend (the refine step of filter-refine DIPR).

Query head g of KV head h attends the forced positions (always) and the listed candidates
(the first min(count, capacity) slots of each split) whose exact score passes
``s + rounding_slack·‖q‖₁·‖k‖∞ >= m_base - β``; softmax over s·sm_scale; m_seen is the max
exact score over the forced positions and ALL listed candidates (attended or not).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.code_scan.reference import exact_scores, forced_scores
from pallas_kernels.common import query_slack


def listed_candidates(cand_idx, cand_count):
    """(idx int32 [B, Hkv, N] clamped to >= 0, listed bool [B, Hkv, N]) with N = NS·capacity."""
    b, hkv, ns, cap = cand_idx.shape
    slot = jnp.arange(cap, dtype=jnp.int32)
    listed = (slot < jnp.minimum(cand_count, cap)[..., None]) & (cand_idx >= 0)
    return jnp.maximum(cand_idx, 0).reshape(b, hkv, ns * cap), listed.reshape(b, hkv, ns * cap)


def _candidate_scores(q, keys, cand_idx, cand_count, m_base, beta, rounding_slack):
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    idx, listed = listed_candidates(cand_idx, cand_count)
    kc = jnp.take_along_axis(keys, idx[..., None], axis=2)  # [B, Hkv, N, D]
    kc = jnp.where(listed[..., None], kc, jnp.zeros_like(kc))
    qg = q.reshape(b, hkv, g, d)
    s = exact_scores(qg, kc)  # [B, Hkv, G, N]
    tol = query_slack(qg, rounding_slack)[..., None] * jnp.max(jnp.abs(kc.astype(jnp.float32)), -1)[:, :, None]
    thr = (m_base.astype(jnp.float32) - beta.astype(jnp.float32)).reshape(b, hkv, g, 1)
    lst = listed[:, :, None, :]
    att = lst & (s + tol >= thr)
    return idx, s, jnp.where(lst, s, -jnp.inf), att


def refine_attention_reference(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, *, sink, window,
                               sm_scale, rounding_slack):
    b, hq, d = q.shape
    hkv = keys.shape[1]
    fpos, fok, s_f, _ = forced_scores(q, keys, lengths, sink=sink, window=window, rounding_slack=rounding_slack)
    idx, s_c, s_seen, att_c = _candidate_scores(q, keys, cand_idx, cand_count, m_base, beta, rounding_slack)
    att_f = jnp.broadcast_to(fok[:, None, None, :], s_f.shape)
    s = jnp.concatenate([s_f, s_c], axis=-1)
    att = jnp.concatenate([att_f, att_c], axis=-1)  # [B, Hkv, G, F + N]
    pos = jnp.concatenate([jnp.broadcast_to(fpos[:, None], (b, hkv, fpos.shape[-1])), idx], axis=-1)
    v = jnp.take_along_axis(values, pos[..., None], axis=2).astype(jnp.float32)  # [B, Hkv, F + N, D]
    v = jnp.where(jnp.any(att, axis=2)[..., None], v, 0.0)  # rows no head attends: never their NaN
    logits = jnp.where(att, s * jnp.float32(sm_scale), -jnp.inf)
    m = jnp.max(logits, axis=-1)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, v, precision="highest")
    has = l > 0
    out = jnp.where(has[..., None], o / jnp.where(has, l, 1.0)[..., None], 0.0)
    m_seen = jnp.maximum(jnp.max(s_f, axis=-1), jnp.max(s_seen, axis=-1))
    n_att = jnp.sum(att, axis=-1, dtype=jnp.int32)
    return out.reshape(b, hq, d).astype(q.dtype), m_seen.reshape(b, hq), n_att.reshape(b, hq)


def refine_mask_reference(q, keys, cand_idx, cand_count, m_base, beta, *, rounding_slack):
    """DIPR mask bool [B, Hq, S]: listed candidates in range (forced positions NOT included)."""
    b, hq, d = q.shape
    hkv, s_cap = keys.shape[1], keys.shape[2]
    g = hq // hkv
    idx, _, _, att = _candidate_scores(q, keys, cand_idx, cand_count, m_base, beta, rounding_slack)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hkv)[None, :, None, None]
    gi = jnp.arange(g)[None, None, :, None]
    mask = jnp.zeros((b, hkv, g, s_cap), bool).at[bi, hi, gi, idx[:, :, None, :]].max(att)
    return mask.reshape(b, hq, s_cap)


def refine_max_reference(q, keys, cand_idx, cand_count, lengths, *, sink, window):
    """f32 [B, Hq]: max exact score over the forced positions and every listed candidate."""
    b, hq, d = q.shape
    _, _, s_f, _ = forced_scores(q, keys, lengths, sink=sink, window=window, rounding_slack=0.0)
    zero = jnp.zeros((b, hq), jnp.float32)
    _, _, s_seen, _ = _candidate_scores(q, keys, cand_idx, cand_count, zero, zero, 0.0)
    return jnp.maximum(jnp.max(s_f, axis=-1), jnp.max(s_seen, axis=-1)).reshape(b, hq)
