"""Rotary position embedding (rotate-half convention) with optional Llama-3 scaling."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, *, theta: float, scaling=None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = np.where(wl > low_wl, inv / scaling.factor, inv)
    mid = (wl <= low_wl) & (wl >= high_wl)
    scaled = np.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling=None) -> jax.Array:
    """x [B,T,H,D], positions [B,T] → rotated x (angles in f32)."""
    d = x.shape[-1]
    inv = jnp.asarray(inv_frequencies(d, theta=theta, scaling=scaling))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B,T,D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
