"""The attention function the model calls, and one decode query through the method registry.

The model (``models.Llama``) gets its attention as a function argument::

    attention_fn(layer, q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache: KVStore, positions [B,T])
        -> (out [B,T,Hq,D], new_cache, aux)

:func:`make_attention_fn` builds it for an :class:`~alaya_jax.attention.config.AttentionConfig`:
it appends the new keys/values to the layer's store, then attends. Prefill chunks (T > 1)
always run dense causal attention; decode steps (T == 1) run the configured method.
``aux`` is a dict of per-layer statistics (or ``{}``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from alaya_jax.attention import registry
from alaya_jax.attention.config import AttentionConfig
from alaya_jax.attention.dense import DENSE_IMPLEMENTATIONS
from alaya_jax.attention.masked import full_softmax, raw_scores
from alaya_jax.store import kv_store
from alaya_jax.store.kv_store import KVStore


def decode_attention(q: jax.Array, store: KVStore, cfg: AttentionConfig, *, dense: bool = False,
                     beta=None, top_p=None):
    """One decode query per head over a store, through the method registry
    (:mod:`alaya_jax.attention.registry`). q [B,Hq,D] → (out [B,Hq,D], stats dict).

    ``beta`` / ``top_p`` (optional, may be traced; ``beta`` may be a β per query head,
    broadcastable to [B, Hq]) override ``cfg.beta`` / ``cfg.top_p`` so that sweeping them
    does not recompile. Calibrated DIPR takes its β from ``store.dipr_beta``.

    Stats (when ``cfg.collect_stats``): ``keys_attended`` [B,Hq] and ``recall``
    [B,Hq] (share of the full softmax mass on the attended keys); DIPR adds
    ``candidates`` [B,Hkv], ``overflow`` [] and ``refined`` [].
    """
    method = registry.get("full" if dense else cfg.registry_name)
    beta = cfg.beta if beta is None else beta
    top_p = cfg.top_p if top_p is None else top_p
    out, mask, stats = method.attend(q, store, cfg, beta=beta, top_p=top_p, with_mask=cfg.collect_stats)
    if cfg.collect_stats:
        valid = kv_store.positions_valid(store)  # [B,S]
        probs = full_softmax(raw_scores(q, store.dense_keys()), valid, q.shape[-1])
        stats = dict(stats, keys_attended=jnp.sum(mask, axis=-1).astype(jnp.float32),
                     recall=jnp.sum(jnp.where(mask, probs, 0.0), axis=-1))
    return out, stats


def make_attention_fn(cfg: AttentionConfig, num_new: Optional[jax.Array] = None, *, beta=None, top_p=None):
    """The model's attention function for one forward call.

    ``num_new`` [B]: how many of the T new rows of each sequence are real (ragged
    prefill; 0 or 1 for a decode step of the device loop, whose finished rows append
    nothing); default all T. ``beta`` / ``top_p``: traced overrides (see
    :func:`decode_attention`).
    """
    if cfg.method == "auto":
        raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")

    def attention_fn(layer: int, q, k, v, cache: KVStore, positions):
        cache = kv_store.append(cache, k, v, num_new)
        t = q.shape[1]
        if t > 1 or cfg.method == "full":
            if t == 1 and cfg.collect_stats:
                out, stats = decode_attention(q[:, 0], cache, cfg, dense=True)
                return out[:, None], cache, stats
            n = jnp.full((q.shape[0],), t, jnp.int32) if num_new is None else num_new
            dense = DENSE_IMPLEMENTATIONS[cfg.kernel.prefill_attention]
            return dense(q, cache, positions, k=k, v=v, num_new=n), cache, {}
        out, stats = decode_attention(q[:, 0], cache, cfg, dense=layer in cfg.dense_layers, beta=beta, top_p=top_p)
        return out[:, None], cache, stats

    # It depends on the layer only through dense_layers: the model traces one layer of each kind.
    attention_fn.layer_class = lambda layer: layer in cfg.dense_layers
    return attention_fn


__all__ = ["decode_attention", "make_attention_fn"]
