"""The attention function the model calls: the public store API (append, then attend) for one layer.

The model (``models.Llama``) gets its attention as a function argument::

    attention_fn(layer, q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache: KVStore, positions [B,T])
        -> (out [B,T,Hq,D], new_cache, aux)

:func:`make_attention_fn` builds it for an :class:`~alaya_jax.attention.config.AttentionConfig`
from :func:`~alaya_jax.attention.store_api.append` and :func:`~alaya_jax.attention.store_api.attend`,
the same two calls any other model makes (one path): prefill chunks (T > 1) run dense causal
attention, decode steps (T == 1) the configured method. ``aux`` is a dict of per-layer
statistics (or ``{}``).
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh

from alaya_jax.attention import store_api
from alaya_jax.attention.config import AttentionConfig
from alaya_jax.store.kv_store import KVStore


def make_attention_fn(cfg: AttentionConfig, num_new: Optional[jax.Array] = None, *, beta=None, top_p=None,
                      positions=None, mesh: Optional[Mesh] = None):
    """The model's attention function for one forward call.

    ``num_new`` [B]: how many of the T new rows of each sequence are real (ragged
    prefill; 0 or 1 for a decode step of the device loop, whose finished rows append
    nothing); default all T. ``beta`` / ``top_p``: traced overrides; ``positions``: a filter over
    the stored positions (see :func:`alaya_jax.attention.store_api.attend`); ``mesh``: the caches are
    sharded along the sequence over it (docs/design.md §10; None: one device).
    """
    if cfg.method == "auto":
        raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")

    def attention_fn(layer: int, q, k, v, cache: KVStore, query_positions):
        cache = store_api.append(cache, k, v, num_new=num_new, mesh=mesh)
        out, stats = store_api.attend(q, cache, attention=cfg, layer=layer, positions=positions,
                                      query_positions=query_positions, beta=beta, top_p=top_p, mesh=mesh)
        return out, cache, stats

    # It depends on the layer only through dense_layers: the model traces one layer of each kind.
    attention_fn.layer_class = lambda layer: layer in cfg.dense_layers
    return attention_fn


__all__ = ["make_attention_fn"]
