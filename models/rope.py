"""Rotary position embedding (rotate-half convention) with optional Llama-3 scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _base_and_regions(head_dim: int, theta: float, scaling):
    """Unscaled inverse frequencies [D/2] (f64), and Llama-3's regions: (low-frequency mask, middle mask,
    smooth [D/2])."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    return inv, wl > low_wl, (wl <= low_wl) & (wl >= high_wl), smooth


def inv_frequencies(head_dim: int, *, theta: float, scaling=None) -> np.ndarray:
    """RoPE inverse frequencies [D/2] f32, Llama-3-scaled when ``scaling`` is a ``RopeScaling``."""
    if scaling is None:
        return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))).astype(np.float32)
    inv, low, mid, smooth = _base_and_regions(head_dim, theta, scaling)
    scaled = np.where(low, inv / scaling.factor, inv)
    scaled = np.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def llama3_rope_factors(head_dim: int, *, theta: float, scaling) -> np.ndarray:
    """What llama.cpp stores as ``rope_freqs.weight`` [D/2] f64: the divisor of each inverse frequency
    (1 for high frequencies, ``factor`` for low ones, ``1 / ((1 - s) / factor + s)`` between)."""
    _, low, mid, smooth = _base_and_regions(head_dim, theta, scaling)
    return np.where(mid, 1.0 / ((1 - smooth) / scaling.factor + smooth), np.where(low, scaling.factor, 1.0))


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling=None) -> jax.Array:
    """x [B,T,H,D], positions [B,T] → rotated x (angles in f32)."""
    d = x.shape[-1]
    inv = jnp.asarray(inv_frequencies(d, theta=theta, scaling=scaling))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B,T,D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
