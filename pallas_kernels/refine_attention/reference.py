"""Plain-jnp reference of the refine (the refine step of filter-refine DIPR).

Query head g of KV head h takes the exact max M = max(M_sw, the exact scores of every listed candidate),
attends the forced positions (always) and the listed candidates with ``s + rounding_slack·‖q‖₁·‖k‖∞ >=
M − β``, softmax over s·sm_scale (weights exp((s − M)·sm_scale), as the kernels compute them).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.code_scan.reference import exact_scores, forced_scores
from pallas_kernels.common import query_slack


def listed_candidates(cand_idx, cand_count):
    """(idx int32 [B, Hkv, N] clamped to >= 0, listed bool [B, Hkv, N]) with N = NS·L: the first count
    slots of each split's list."""
    b, hkv, ns, cap = cand_idx.shape
    slot = jnp.arange(cap, dtype=jnp.int32)
    listed = (slot < jnp.minimum(cand_count, cap)[..., None]) & (cand_idx >= 0)
    return jnp.maximum(cand_idx, 0).reshape(b, hkv, ns * cap), listed.reshape(b, hkv, ns * cap)


def candidate_scores(q, keys, cand_idx, cand_count):
    """(idx [B, Hkv, N], listed [B, Hkv, N], s f32 [B, Hkv, G, N] (-inf where not listed), ‖k‖∞ [B, Hkv, N])."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    idx, listed = listed_candidates(cand_idx, cand_count)
    kc = jnp.take_along_axis(keys, idx[..., None], axis=2)  # [B, Hkv, N, D]
    kc = jnp.where(listed[..., None], kc, jnp.zeros_like(kc))
    s = exact_scores(q.reshape(b, hkv, hq // hkv, d), kc)
    kinf = jnp.max(jnp.abs(kc.astype(jnp.float32)), axis=-1)
    return idx, listed, jnp.where(listed[:, :, None, :], s, -jnp.inf), kinf


def refine_attention_reference(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, *, sink, window,
                               sm_scale, rounding_slack, forced=None, max_reduce=None):
    """The partial sums ``(o f32 [B, Hq, D] = Σ p·v, l f32 [B, Hq] = Σ p, n_attended i32 [B, Hq], M f32 [B, Hq])``,
    p = exp((s − M)·sm_scale). ``forced``: each row's own (sinks, windows) (``code_scan``'s); ``max_reduce``:
    applied to the candidates' M before the attend (a shard's pmax; None: the identity)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    fpos, fok, s_f = forced_scores(q, keys, lengths, sink=sink, window=window, forced=forced)
    idx, listed, s_c, kinf = candidate_scores(q, keys, cand_idx, cand_count)
    m = jnp.maximum(m_sw.astype(jnp.float32).reshape(b, hkv, g), jnp.max(s_c, axis=-1))  # [B, Hkv, G]
    if max_reduce is not None:
        m = max_reduce(m.reshape(b, hq)).reshape(b, hkv, g)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    tol = query_slack(q, rounding_slack).reshape(b, hkv, g)[..., None] * kinf[:, :, None, :]
    thr = (m - beta.astype(jnp.float32).reshape(b, hkv, g))[..., None]
    att_c = listed[:, :, None, :] & (s_c + tol >= thr)
    att_f = jnp.broadcast_to(fok[:, None, None, :], s_f.shape)
    s = jnp.concatenate([s_f, s_c], axis=-1)
    att = jnp.concatenate([att_f, att_c], axis=-1)  # [B, Hkv, G, F + N]
    pos = jnp.concatenate([jnp.broadcast_to(fpos[:, None], (b, hkv, fpos.shape[-1])), idx], axis=-1)
    v = jnp.take_along_axis(values, pos[..., None], axis=2).astype(jnp.float32)  # [B, Hkv, F + N, D]
    v = jnp.where(jnp.any(att, axis=2)[..., None], v, 0.0)  # rows no head attends: never their NaN
    p = jnp.where(att, jnp.exp((s - m_safe[..., None]) * jnp.float32(sm_scale)), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, v, precision="highest")
    n_att = jnp.sum(att, axis=-1, dtype=jnp.int32)
    return o.reshape(b, hq, d), l.reshape(b, hq), n_att.reshape(b, hq), m.reshape(b, hq)
