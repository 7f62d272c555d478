"""Scores and softmax attention over an explicit token mask (plain jnp).

These are the reference semantics every sparse method reduces to: a query head
attends exactly to the keys its mask keeps, with softmax(q·k/√D) weights.

Shapes: q [B, Hq, D]; k, v [B, Hkv, S, D] (store layout) — query head h reads
KV head ``h // (Hq // Hkv)``; masks [B, Hq, S] bool.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def group_size(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def raw_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Raw inner products q·k in f32 (no 1/√D): q [B,Hq,D], k [B,Hkv,S,D] → [B,Hq,S]."""
    b, hq, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q [B,Hq,D]={tuple(q.shape)} and k [B,Hkv,S,D]={tuple(k.shape)} do not match")
    hkv = k.shape[1]
    g = group_size(hq, hkv)
    qg = q.astype(jnp.float32).reshape(b, hkv, g, d)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return s.reshape(b, hq, -1)


def valid_positions(lengths: jax.Array, num_positions: int) -> jax.Array:
    """bool [B, S]: position < length."""
    return jnp.arange(num_positions)[None, :] < lengths[:, None]


def sink_window_mask(lengths: jax.Array, num_positions: int, *, sink: int, window: int) -> jax.Array:
    """bool [B, S]: the first ``sink`` and the last ``window`` positions below each length."""
    pos = jnp.arange(num_positions)[None, :]
    ln = lengths[:, None]
    return (pos < ln) & ((pos < sink) | (pos >= ln - window))


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scores: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of each query head over the keys its mask keeps.

    q [B,Hq,D], k/v [B,Hkv,S,D], mask [B,Hq,S] → (out [B,Hq,D] in q.dtype, lse f32 [B,Hq]).
    Positions outside the mask may hold anything (NaN too). A row with an empty
    mask gives out 0 and lse -inf.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = group_size(hq, hkv)
    s = raw_scores(q, k) if scores is None else scores
    z = jnp.where(mask, s * (1.0 / jnp.sqrt(jnp.float32(d))), -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(z - m_safe), 0.0)
    l = jnp.sum(p, axis=-1)
    vv = v.astype(jnp.float32)
    # Zero values outside every mask of the group so NaN padding cannot leak (NaN * 0 = NaN).
    any_mask = jnp.any(mask.reshape(b, hkv, g, -1), axis=2)[..., None]
    vv = jnp.where(any_mask, vv, 0.0)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.reshape(b, hkv, g, -1), vv, precision=jax.lax.Precision.HIGHEST)
    o = o.reshape(b, hq, d) / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m_safe[..., 0], -jnp.inf)
    return o.astype(q.dtype), lse


def full_softmax(scores: jax.Array, valid: jax.Array, head_dim: int) -> jax.Array:
    """Full-attention probabilities f32 [B,Hq,S] from raw scores and a validity mask [B,S] or [B,Hq,S]."""
    if valid.ndim == 2:
        valid = valid[:, None, :]
    z = jnp.where(valid, scores / jnp.sqrt(jnp.float32(head_dim)), -jnp.inf)
    return jax.nn.softmax(z, axis=-1, where=valid)
