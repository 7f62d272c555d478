"""Baseline key selections behind the same interface as DIPR (plain jnp).

Each returns a token mask bool [B, Hq, S] over the store layout
(q [B,Hq,D]; keys [B,Hkv,S,D]; lengths [B]); attention over it is
:func:`alaya_jax.attention.masked.masked_attention`. The sink and window are
added by the caller, the same way for every method, so comparisons are fair.

- ``topk``: the k highest-scoring keys per query head.
- ``topp``: the smallest set of highest-probability keys holding mass p.
- ``quest``: Quest — top-k pages (blocks) per query head by the min/max upper bound.
- ``infllm``: InfLLM-style — top-k blocks per query head by a representative key
  (here: the block's mean key; InfLLM picks representative tokens by in-block
  attention, a detail we do not reproduce).
- ``streaming``: StreamingLLM — nothing beyond sink + window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alaya_jax.attention.masked import full_softmax, group_size


def _check_budget(name: str, k) -> None:
    if not isinstance(k, jax.core.Tracer) and int(k) < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")


def topk_mask(scores: jax.Array, valid: jax.Array, *, k: int) -> jax.Array:
    """scores f32 [B,Hq,S], valid [B,S] → bool [B,Hq,S] keeping the top k valid keys per head."""
    _check_budget("top-k budget", k)
    s = jnp.where(valid[:, None, :], scores, -jnp.inf)
    k = min(int(k), s.shape[-1])
    _, idx = jax.lax.top_k(s, k)
    mask = jnp.zeros(s.shape, bool).at[
        jnp.arange(s.shape[0])[:, None, None], jnp.arange(s.shape[1])[None, :, None], idx
    ].set(True)
    return mask & valid[:, None, :]


def topp_mask(scores: jax.Array, valid: jax.Array, *, p: float, head_dim: int) -> jax.Array:
    """Smallest set of highest-probability valid keys whose mass reaches p → bool [B,Hq,S]."""
    if not isinstance(p, jax.core.Tracer) and not (0.0 < float(p) <= 1.0):
        raise ValueError(f"top-p must be in (0, 1], got {p}")
    probs = full_softmax(scores, valid, head_dim)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each key
    keep_sorted = before < p
    mask = jnp.zeros_like(keep_sorted).at[
        jnp.arange(probs.shape[0])[:, None, None], jnp.arange(probs.shape[1])[None, :, None], order
    ].set(keep_sorted)
    return mask & valid[:, None, :]


def _expand_blocks(block_keep: jax.Array, block_size: int, valid: jax.Array) -> jax.Array:
    """[B,Hq,NB] → token mask [B,Hq,S]."""
    m = jnp.repeat(block_keep, block_size, axis=-1)[..., : valid.shape[-1]]
    return m & valid[:, None, :]


def _top_blocks(block_scores: jax.Array, k: int) -> jax.Array:
    k = min(int(k), block_scores.shape[-1])
    _, idx = jax.lax.top_k(block_scores, k)
    keep = jnp.zeros(block_scores.shape, bool).at[
        jnp.arange(block_scores.shape[0])[:, None, None], jnp.arange(block_scores.shape[1])[None, :, None], idx
    ].set(True)
    return keep & jnp.isfinite(block_scores)


def quest_mask(q: jax.Array, kmin: jax.Array, kmax: jax.Array, valid: jax.Array, *, num_blocks: int) -> jax.Array:
    """Quest: top ``num_blocks`` pages per query head by Σ_d max(q_d·kmax_d, q_d·kmin_d).

    q [B,Hq,D]; kmin/kmax [B,Hkv,NB,D]; valid [B,S] → bool [B,Hq,S].
    """
    _check_budget("Quest page budget", num_blocks)
    b, hq, d = q.shape
    hkv, nb = kmin.shape[1], kmin.shape[2]
    g = group_size(hq, hkv)
    qg = q.astype(jnp.float32).reshape(b, hkv, g, 1, d)
    ub = jnp.sum(jnp.maximum(qg * kmax[:, :, None], qg * kmin[:, :, None]), axis=-1).reshape(b, hq, nb)
    bk = -(-valid.shape[-1] // nb)
    block_valid = jnp.any(jnp.pad(valid, ((0, 0), (0, nb * bk - valid.shape[-1]))).reshape(b, nb, bk), -1)
    ub = jnp.where(block_valid[:, None, :], ub, -jnp.inf)
    return _expand_blocks(_top_blocks(ub, num_blocks), bk, valid)


def infllm_mask(q: jax.Array, keys: jax.Array, valid: jax.Array, *, num_blocks: int) -> jax.Array:
    """InfLLM-style: top ``num_blocks`` blocks per query head by q·(mean valid key of the block).

    q [B,Hq,D]; keys [B,Hkv,NB,Bk,D]; valid [B,S] → bool [B,Hq,S].
    """
    _check_budget("InfLLM block budget", num_blocks)
    b, hq, d = q.shape
    _, hkv, nb, bk, _ = keys.shape
    g = group_size(hq, hkv)
    vb = valid.reshape(b, 1, nb, bk, 1)
    ksum = jnp.sum(jnp.where(vb, keys.astype(jnp.float32), 0.0), axis=3)
    cnt = jnp.sum(vb, axis=3)
    rep = ksum / jnp.maximum(cnt, 1)  # [B,Hkv,NB,D]
    sc = jnp.einsum("bhgd,bhnd->bhgn", q.astype(jnp.float32).reshape(b, hkv, g, d), rep,
                    precision=jax.lax.Precision.HIGHEST).reshape(b, hq, nb)
    sc = jnp.where(cnt[:, 0, :, 0][:, None, :] > 0, sc, -jnp.inf)
    return _expand_blocks(_top_blocks(sc, num_blocks), bk, valid)
