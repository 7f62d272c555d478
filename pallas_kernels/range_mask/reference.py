"""Plain-jnp reference for the DIPR range mask over listed blocks.

s = q·k in f32 (both upcast, HIGHEST precision, raw: no 1/sqrt(D)).
max_score[b, h] = max over valid positions (pos < lengths[b]) of listed blocks (-inf if none).
mask[b, h, c, j] = valid & (s >= max_score - beta).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_blocks(x: jax.Array, block_idx: jax.Array) -> jax.Array:
    """x [B, Hkv, NB, Bk, D], block_idx [B, Hkv, C] (-1 = empty) -> [B, Hkv, C, Bk, D]."""
    idx = jnp.maximum(block_idx, 0)
    return jnp.take_along_axis(x, idx[:, :, :, None, None], axis=2)


def listed_valid(block_idx: jax.Array, lengths: jax.Array, block_size: int) -> jax.Array:
    """[B, Hkv, C, Bk] bool: slot is listed and the position is below the length."""
    pos = block_idx[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return (block_idx[..., None] >= 0) & (pos < lengths[:, None, None, None])


def listed_scores(q, keys, block_idx, lengths):
    """Raw f32 scores [B, Hq, C, Bk] (-inf where invalid) and the valid mask [B, Hq, C, Bk]."""
    b, hq, d = q.shape
    _, hkv, nb, bk, _ = keys.shape
    g = hq // hkv
    kg = gather_blocks(keys, block_idx).astype(jnp.float32)  # [B, Hkv, C, Bk, D]
    q32 = q.astype(jnp.float32).reshape(b, hkv, g, d)
    s = jnp.einsum("bhgd,bhcjd->bhgcj", q32, kg, precision=jax.lax.Precision.HIGHEST)
    valid = listed_valid(block_idx, lengths, bk)[:, :, None]  # [B, Hkv, 1, C, Bk]
    s = jnp.where(valid, s, -jnp.inf)
    c = block_idx.shape[-1]
    valid = jnp.broadcast_to(valid, s.shape)
    return s.reshape(b, hq, c, bk), valid.reshape(b, hq, c, bk)


def dipr_range_mask_reference(q, keys, block_idx, lengths, *, beta, return_mask=True):
    s, valid = listed_scores(q, keys, block_idx, lengths)
    max_score = jnp.max(s, axis=(2, 3))  # [B, Hq]
    if not return_mask:
        return None, max_score
    thr = max_score - jnp.asarray(beta, jnp.float32)
    mask = valid & (s >= thr[:, :, None, None])
    return mask, max_score
