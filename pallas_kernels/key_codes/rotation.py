"""The fixed orthogonal rotation of keys and queries: x' = H·(signs ⊙ x)/√D per KV head.

H is the Sylvester Hadamard matrix (D a power of two), ``signs`` a seeded ±1 vector per
KV head. Orthogonal, so q'·k' = q·k up to f32 rounding (bounded in ``int4.bound``); it
spreads outlier channels over all dimensions, which halves the 4-bit code's candidates
on real keys (docs/design.md §3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_dim(head_dim: int, op: str) -> int:
    d = int(head_dim)
    if d < 2 or d & (d - 1):
        raise ValueError(f"{op}: head_dim must be a power of two >= 2, got {head_dim}")
    return d


@functools.lru_cache(maxsize=None)
def hadamard(head_dim: int) -> np.ndarray:
    """Sylvester Hadamard matrix, f32 [D, D] of ±1 (symmetric, H·H = D·I)."""
    d = _check_dim(head_dim, "hadamard")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation_signs(num_kv_heads: int, head_dim: int, *, seed: int) -> np.ndarray:
    """f32 [Hkv, D] of ±1, deterministic in ``seed`` (NumPy PCG64). Record the seed with the store."""
    d = _check_dim(head_dim, "rotation_signs")
    if int(num_kv_heads) < 1:
        raise ValueError(f"rotation_signs: num_kv_heads must be >= 1, got {num_kv_heads}")
    rng = np.random.default_rng(int(seed))
    return np.where(rng.random((int(num_kv_heads), d)) < 0.5, -1.0, 1.0).astype(np.float32)


def rotate(x: jax.Array, signs) -> jax.Array:
    """x [..., Hkv, D] (any float dtype) -> f32 [..., Hkv, D]: x' = H·(signs ⊙ x)/√D.

    Computed in f32 with Precision.HIGHEST (no TF32): the cast and the sign flip are
    exact, each output is one D-term dot with entries ±fl(1/√D).
    """
    signs = jnp.asarray(signs, jnp.float32)
    if signs.ndim != 2 or x.ndim < 2 or tuple(x.shape[-2:]) != tuple(signs.shape):
        raise ValueError(
            f"rotate: x must be [..., Hkv, D] matching signs [Hkv, D]; got x{tuple(x.shape)}, "
            f"signs{tuple(signs.shape)}"
        )
    d = _check_dim(x.shape[-1], "rotate")
    hm = jnp.asarray(hadamard(d) * np.float32(1.0 / np.sqrt(d)), jnp.float32)  # symmetric
    xs = x.astype(jnp.float32) * signs
    return jnp.einsum("...d,de->...e", xs, hm, precision=jax.lax.Precision.HIGHEST)
