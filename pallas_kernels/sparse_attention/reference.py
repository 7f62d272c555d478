"""Plain-jnp reference for sparse decode attention over listed blocks.

Token at absolute position p of a listed block is attended by query head h iff
p < lengths[b] and (s >= threshold[b, h] or p < sink or p >= lengths[b] - window),
with s = q·k raw f32 (HIGHEST). Softmax over s * sm_scale. Rows with no token:
out 0, lse -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.range_mask.reference import gather_blocks, listed_valid


def attended_mask(s, block_idx, lengths, threshold, *, sink, window, block_size, g):
    """s [B, Hkv, G, C, Bk] f32 -> bool attended mask of the same shape."""
    pos = block_idx[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    valid = listed_valid(block_idx, lengths, block_size)  # [B, Hkv, C, Bk]
    L = lengths[:, None, None, None]
    keep_pos = (pos < sink) | (pos >= L - window)  # [B, Hkv, C, Bk]
    b, hkv = block_idx.shape[:2]
    thr = threshold.astype(jnp.float32).reshape(b, hkv, g, 1, 1)
    return valid[:, :, None] & ((s >= thr) | keep_pos[:, :, None])


def sparse_decode_attention_reference(
    q, keys, values, block_idx, lengths, threshold, *, sink, window, sm_scale
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
    att = attended_mask(s, block_idx, lengths, threshold, sink=sink, window=window,
                        block_size=bk, g=g)
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
