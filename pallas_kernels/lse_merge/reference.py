"""Plain-jnp reference: merge P partial softmax-attentions by their log-sum-exp."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_attention_reference(outs: jax.Array, lses: jax.Array):
    """outs [P, ..., D], lses f32 [P, ...] -> (out [..., D] in outs.dtype, lse f32 [...]).

    Partials with lse = -inf contribute nothing (their out may be anything, NaN too);
    when every partial is -inf the result is out 0, lse -inf.
    """
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    live = lses > -jnp.inf
    w = jnp.where(live, jnp.exp(lses - m_safe), 0.0)  # [P, ...]
    denom = jnp.sum(w, axis=0)
    o = jnp.where(live[..., None], outs.astype(jnp.float32), 0.0)
    num = jnp.sum(w[..., None] * o, axis=0)
    has = denom > 0
    out = jnp.where(has[..., None], num / jnp.where(has, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m_safe + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)
    return out.astype(outs.dtype), lse
