"""Plain-jnp reference for the block upper bound.

ub[b, h, n] = Σ_d max(q_d·kmax_d, q_d·kmin_d) + rel_slack · Σ_d |q_d|·max(|kmin_d|, |kmax_d|)
in f32, -inf for n >= num_valid_blocks[b]; query head h reads KV head h // G.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_bounds_reference(
    q: jax.Array,  # [B, Hq, D] any float
    kmin: jax.Array,  # [B, Hkv, NB, D] f32
    kmax: jax.Array,  # [B, Hkv, NB, D] f32
    num_valid_blocks: jax.Array,  # [B] int32
    *,
    rel_slack: float,
) -> jax.Array:  # [B, Hq, NB] f32
    b, hq, d = q.shape
    _, hkv, nb, _ = kmin.shape
    g = hq // hkv
    q32 = q.astype(jnp.float32).reshape(b, hkv, g, 1, d)
    lo = kmin.astype(jnp.float32)[:, :, None]  # [B, Hkv, 1, NB, D]
    hi = kmax.astype(jnp.float32)[:, :, None]
    ub = jnp.sum(jnp.maximum(q32 * hi, q32 * lo), axis=-1)
    mag = jnp.sum(jnp.abs(q32) * jnp.maximum(jnp.abs(lo), jnp.abs(hi)), axis=-1)
    ub = ub + jnp.float32(rel_slack) * mag  # [B, Hkv, G, NB]
    valid = jnp.arange(nb, dtype=jnp.int32)[None, :] < num_valid_blocks.astype(jnp.int32)[:, None]
    ub = jnp.where(valid[:, None, None, :], ub, -jnp.inf)
    return ub.reshape(b, hq, nb)
