"""DIPR — the dynamic inner-product range query — brute force, in plain jnp.

DIPR(q, β) = { s < length : q·k_s ≥ max_t q·k_t − β } with raw inner products.
These functions read every key; they define the semantics that the block-pruned
store path (:mod:`alaya_jax.attention.dipr.filter_refine`) must reproduce exactly.

Layout here is the *dense* one: q [B, Hq, D], k, v [B, S, Hkv, D].
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention.masked import masked_attention, raw_scores, sink_window_mask, valid_positions
from pallas_kernels.common import query_slack


def _check(q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None) -> None:
    if q.ndim != 3 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[3]:
        raise ValueError(f"expected q [B,Hq,D] and k [B,S,Hkv,D]; got q{tuple(q.shape)}, k{tuple(k.shape)}")
    if q.shape[1] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[2]})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v{tuple(v.shape)} must have the shape of k{tuple(k.shape)}")


def check_beta(beta) -> None:
    """β: a float, a scalar array or an array of β per query head (broadcastable to [B, Hq]); every
    concrete value must be >= 0 (inf allowed)."""
    if isinstance(beta, jax.core.Tracer):
        return
    b = np.asarray(beta, np.float64)
    if not bool(np.all(b >= 0)):
        bad = b if b.ndim == 0 else b[~(b >= 0)].ravel()[:4]
        raise ValueError(f"beta must be >= 0 (inf allowed), got {bad}")


def _lengths(lengths, b: int, s: int) -> jax.Array:
    if lengths is None:
        return jnp.full((b,), s, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B={b}], got {tuple(lengths.shape)}")
    return lengths


def range_mask_from_scores(scores: jax.Array, valid: jax.Array, beta, tol: Optional[jax.Array] = None) -> jax.Array:
    """bool [B,Hq,S]: valid & (score + tol ≥ max over valid − β). scores [B,Hq,S], valid [B,S] or
    [B,Hq,S], tol (None = 0) broadcastable to scores."""
    if valid.ndim == 2:
        valid = valid[:, None, :]
    m = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1, keepdims=True)
    lhs = scores if tol is None else scores + tol
    return valid & (lhs >= m - jnp.float32(beta))


def dipr_mask(q: jax.Array, k: jax.Array, *, beta, lengths: Optional[jax.Array] = None) -> jax.Array:
    """Exact DIPR mask bool [B, Hq, S]; q [B,Hq,D], k [B,S,Hkv,D], lengths [B]."""
    _check(q, k)
    check_beta(beta)
    b, s = k.shape[0], k.shape[1]
    lengths = _lengths(lengths, b, s)
    scores = raw_scores(q, k.transpose(0, 2, 1, 3))
    return range_mask_from_scores(scores, valid_positions(lengths, s), beta)


def dipr_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    beta,
    lengths: Optional[jax.Array] = None,
    sink: int = 4,
    window: int = 64,
    rounding_slack: float = 0.0,
    key_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Attention over DIPR ∪ first ``sink`` ∪ last ``window`` positions → [B, Hq, D].

    ``key_mask`` bool [B, S] (None: every position): a filter — DIPR over the valid keys in the
    filter or among the sink and window positions (the max too is taken over those), ∪ sink ∪ window.

    ``rounding_slack`` > 0 widens the range to ``s + rounding_slack·‖q‖₁·‖k‖∞ ≥ M − β``, the
    rule of the store path's refine kernel (``pallas_kernels.refine_attention``; docs/design.md §4);
    pass the same value to compare against them. 0 (default): the plain DIPR definition."""
    _check(q, k, v)
    check_beta(beta)
    b, s = k.shape[0], k.shape[1]
    lengths = _lengths(lengths, b, s)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = raw_scores(q, kt)
    forced = sink_window_mask(lengths, s, sink=sink, window=window)  # [B, S]
    valid = valid_positions(lengths, s) if key_mask is None else valid_positions(lengths, s) & (key_mask | forced)
    tol = None
    if rounding_slack:
        kinf = jnp.max(jnp.abs(jnp.where(valid[:, None, :, None], kt.astype(jnp.float32), 0.0)), axis=-1)
        g = q.shape[1] // k.shape[2]  # kinf [B, Hkv, S] = ‖k‖∞ per key
        tol = query_slack(q, rounding_slack)[..., None] * jnp.repeat(kinf, g, axis=1)
    mask = range_mask_from_scores(scores, valid, beta, tol)
    mask = mask | forced[:, None, :]
    out, _ = masked_attention(q, kt, vt, mask, scores=scores)
    return out
