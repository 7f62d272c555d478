"""Plain-jnp reference of the refine (the refine step of filter-refine DIPR).

Query head g of KV head h takes the exact max M = max(M_sw, the exact scores of every listed candidate),
attends the forced positions (always) and the listed candidates with ``s + rounding_slack·‖q‖₁·‖k‖∞ >=
M − β``, softmax over s·sm_scale (weights exp((s − M)·sm_scale), as the kernels compute them).

With the estimated tail, every searched key that is not attended — the scan's non-candidates and the
candidates rejected here — adds exp((ŝ − M)·sm_scale) to the denominator and that times its block's mean
value V̄ to the numerator, ŝ the scan's estimate (``code_scan.reference.ScanTail``).
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


def attended_candidates(q, keys, cand_idx, cand_count, m_sw, beta, *, rounding_slack, max_reduce=None):
    """The refine's decision in jnp: (idx [B, Hkv, N], listed [B, Hkv, N], s f32 [B, Hkv, G, N], M f32
    [B, Hkv, G], att bool [B, Hkv, G, N]: the listed candidates with s + slack·‖q‖₁·‖k‖∞ >= M − β);
    ``max_reduce``: applied to M f32 [B, Hq] before the compare (a shard's pmax; None: the identity)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    idx, listed, s_c, kinf = candidate_scores(q, keys, cand_idx, cand_count)
    m = jnp.maximum(m_sw.astype(jnp.float32).reshape(b, hkv, g), jnp.max(s_c, axis=-1))  # [B, Hkv, G]
    if max_reduce is not None:
        m = max_reduce(m.reshape(b, hq)).reshape(b, hkv, g)
    tol = query_slack(q, rounding_slack).reshape(b, hkv, g)[..., None] * kinf[:, :, None, :]
    thr = (m - beta.astype(jnp.float32).reshape(b, hkv, g))[..., None]
    return idx, listed, s_c, m, listed[:, :, None, :] & (s_c + tol >= thr)


def rejected_tail_reference(est, value_means, idx, listed, att, m, *, block_size, sm_scale, value_dtype=jnp.float32):
    """The tail over the candidates the refine rejects (listed, not attended), weighed by the scan's
    estimates est f32 [B, Hkv, S, G' >= G] like every other key of the rest: (o f32 [B, Hkv, G, D] =
    Σ w·V̄_block, l f32 [B, Hkv, G] = Σ w), w = exp((ŝ − M)·sm_scale) (0 where M = -inf: nothing listed);
    the block means rounded to ``value_dtype`` (the values' dtype, as the attend pass multiplies them)."""
    g = att.shape[2]
    e = jnp.take_along_axis(jnp.swapaxes(est[..., :g], 2, 3), jnp.broadcast_to(idx[:, :, None, :], att.shape),
                            axis=3)  # [B, Hkv, G, N]
    rej = listed[:, :, None, :] & ~att
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    w = jnp.where(rej, jnp.exp((e - m_safe[..., None]) * jnp.float32(sm_scale)), 0.0)
    vb = jnp.take_along_axis(value_means.astype(value_dtype).astype(jnp.float32), (idx // block_size)[..., None],
                             axis=2)  # [B, Hkv, N, D]
    vb = jnp.where(jnp.any(rej, axis=2)[..., None], vb, 0.0)
    return jnp.einsum("bhgn,bhnd->bhgd", w, vb, precision="highest"), jnp.sum(w, axis=-1)


def scan_tail_at(tail, m_sw, m, *, g, sm_scale):
    """The scan's tail (a ``ScanTail``, sums relative to M_sw) summed over the splits and moved to the exact
    max M: (o f32 [B, Hkv, G, D], l f32 [B, Hkv, G]); m_sw, m f32 [B, Hkv, G]."""
    f = jnp.where(m_sw > -jnp.inf, jnp.exp((m_sw - jnp.where(m > -jnp.inf, m, 0.0)) * jnp.float32(sm_scale)), 0.0)
    return jnp.sum(tail.o[:, :, :, :g], axis=2) * f[..., None], jnp.sum(tail.l[:, :, :, :g], axis=2) * f


def normalise(o, l):
    """o [..., D], l [...] -> o / l (0 where l = 0)."""
    has = l > 0
    return jnp.where(has[..., None], o / jnp.where(has, l, 1.0)[..., None], 0.0)


def refine_attention_reference(q, keys, values, cand_idx, cand_count, m_sw, lengths, beta, *, sink, window,
                               sm_scale, rounding_slack, forced=None, max_reduce=None, tail=None, value_means=None,
                               block_size=0):
    """The partial sums ``(o f32 [B, Hq, D] = Σ p·v, l f32 [B, Hq] = Σ p, n_attended i32 [B, Hq], M f32 [B, Hq])``,
    p = exp((s − M)·sm_scale). ``forced``: each row's own (sinks, windows) (``code_scan``'s); ``max_reduce``:
    applied to the candidates' M before the attend (a shard's pmax; None: the identity). With ``tail`` (the
    scan's ``ScanTail``) the estimated tail over the rest (the scan's non-candidates and the candidates
    rejected here) is added to o and l (not with ``max_reduce``: the scan's sums are relative to M_sw)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    fpos, fok, s_f = forced_scores(q, keys, lengths, sink=sink, window=window, forced=forced)
    idx, listed, s_c, m, att_c = attended_candidates(q, keys, cand_idx, cand_count, m_sw, beta,
                                                     rounding_slack=rounding_slack, max_reduce=max_reduce)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    att_f = jnp.broadcast_to(fok[:, None, None, :], s_f.shape)
    s = jnp.concatenate([s_f, s_c], axis=-1)
    att = jnp.concatenate([att_f, att_c], axis=-1)  # [B, Hkv, G, F + N]
    pos = jnp.concatenate([jnp.broadcast_to(fpos[:, None], (b, hkv, fpos.shape[-1])), idx], axis=-1)
    v = jnp.take_along_axis(values, pos[..., None], axis=2).astype(jnp.float32)  # [B, Hkv, F + N, D]
    v = jnp.where(jnp.any(att, axis=2)[..., None], v, 0.0)  # rows no head attends: never their NaN
    p = jnp.where(att, jnp.exp((s - m_safe[..., None]) * jnp.float32(sm_scale)), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, v, precision="highest")
    if tail is not None:
        o_r, l_r = rejected_tail_reference(tail.est, value_means, idx, listed, att_c, m, block_size=block_size,
                                           sm_scale=sm_scale, value_dtype=values.dtype)
        o_s, l_s = scan_tail_at(tail, m_sw.astype(jnp.float32).reshape(b, hkv, g), m, g=g, sm_scale=sm_scale)
        o, l = o + o_r + o_s, l + l_r + l_s
    n_att = jnp.sum(att, axis=-1, dtype=jnp.int32)
    return o.reshape(b, hq, d), l.reshape(b, hq), n_att.reshape(b, hq), m.reshape(b, hq)
