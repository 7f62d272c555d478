"""Plain-jnp reference for sparse decode attention over listed blocks.

Token at absolute position p of a listed block is attended by query head h iff
p < lengths[b] and (s + tol >= threshold[b, h] or p < sink or p >= lengths[b] - window),
with s = q·k raw f32 (HIGHEST) and tol = rounding_slack·‖q_h‖₁·‖k‖∞ (the dot's rounding
bound, so a threshold computed elsewhere never drops a key it put in range). Softmax
over s * sm_scale. Rows with no token: out 0, lse -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import query_slack
from pallas_kernels.range_mask.reference import gather_blocks, listed_valid


def attended_mask(s, block_idx, lengths, threshold, *, sink, window, block_size, g, tol=None):
    """s [B, Hkv, G, C, Bk] f32 (tol: same shape or broadcastable, None = 0) -> bool attended mask."""
    pos = block_idx[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    valid = listed_valid(block_idx, lengths, block_size)  # [B, Hkv, C, Bk]
    L = lengths[:, None, None, None]
    keep_pos = (pos < sink) | (pos >= L - window)  # [B, Hkv, C, Bk]
    b, hkv = block_idx.shape[:2]
    thr = threshold.astype(jnp.float32).reshape(b, hkv, g, 1, 1)
    lhs = s if tol is None else s + tol
    return valid[:, :, None] & ((lhs >= thr) | keep_pos[:, :, None])


def sparse_decode_attention_reference(
    q, keys, values, block_idx, lengths, threshold, *, sink, window, sm_scale, rounding_slack
):
    b, hq, d = q.shape
    _, hkv, nb, bk, _ = keys.shape
    g = hq // hkv
    c = block_idx.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    kg = gather_blocks(keys, block_idx).astype(jnp.float32)  # [B, Hkv, C, Bk, D]
    vg = gather_blocks(values, block_idx).astype(jnp.float32)
    valid = listed_valid(block_idx, lengths, bk)
    vg = jnp.where(valid[..., None], vg, 0.0)
    q32 = q.astype(jnp.float32).reshape(b, hkv, g, d)
    s = jnp.einsum("bhgd,bhcjd->bhgcj", q32, kg, precision=hi)
    kinf = jnp.max(jnp.abs(jnp.where(valid[..., None], kg, 0.0)), axis=-1)  # [B, Hkv, C, Bk] ‖k‖∞
    tol = query_slack(q32, rounding_slack)[..., None, None] * kinf[:, :, None]  # [B, Hkv, G, C, Bk]
    att = attended_mask(s, block_idx, lengths, threshold, sink=sink, window=window,
                        block_size=bk, g=g, tol=tol)
    logits = jnp.where(att, s * jnp.float32(sm_scale), -jnp.inf).reshape(b, hkv, g, c * bk)
    m = jnp.max(logits, axis=-1)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgn,bhnd->bhgd", p, vg.reshape(b, hkv, c * bk, d), precision=hi)
    has = l > 0
    l1 = jnp.where(has, l, 1.0)
    out = jnp.where(has[..., None], o / l1[..., None], 0.0)
    lse = jnp.where(has, m_safe + jnp.log(l1), -jnp.inf)
    return out.reshape(b, hq, d).astype(q.dtype), lse.reshape(b, hq)
