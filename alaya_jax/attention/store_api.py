"""The functional store API: a KV store and exact attention over it for any JAX model.

A model hands the store its new keys and values and asks it for the attention result; the
store holds no model and the functions hold no state (every call returns new values, and
all of them trace under ``jax.jit``)::

    store = new_store(batch=B, num_kv_heads=Hkv, head_dim=D, capacity=S)    # one per layer
    store = append(store, k, v, layout="bhtd")       # the T new tokens' keys/values; codes built
    out, stats = attend(q, store, attention=AttentionConfig(method="dipr", beta=32.0), layout="bhtd")

Shapes (``layout`` names the caller's axis order; the output comes back in it):

- ``"bthd"``: q [B, T, Hq, D], k/v [B, T, Hkv, D] (tokens before heads: Llama, Gemma, MaxText);
- ``"bhtd"``: q [B, Hq, T, D], k/v [B, Hkv, T, D] (heads before tokens: GPT-2's split heads).

Heads: ``Hq`` must be a multiple of the store's ``Hkv`` (MHA: equal; GQA/MQA: grouped), and query
head ``h`` reads KV head ``h // (Hq / Hkv)`` — consecutive query heads share a KV head, as in
Llama's ``repeat_kv``. A model whose groups interleave (head ``h`` reads ``h % Hkv``) must
reorder its query heads first. ``D``: a power of two (>= 16 for DIPR's kernels). Softmax is
over ``q·k / √D``: a model with another scale multiplies q by ``scale·√D`` first. Keys carry
whatever position encoding the model applies (RoPE, none with learned positions): the store
never changes them. Other shapes raise ``ValueError`` naming what is wrong.

Rows: ``attend`` with T == 1 is a decode query and runs ``attention.method`` through the method
registry (:mod:`alaya_jax.attention.registry`; ``full``, ``dipr``, ``topk``, ...); with T > 1 it
is a prefill chunk and runs dense causal attention (every method), row ``t`` at position
``query_positions[b, t]`` (default: the last T stored positions, i.e. the rows just appended).

Filtered queries: ``positions`` restricts a query to part of the stored context — a boolean mask
over the stored positions or token ranges ``[start, end)``. Positions outside it are treated as
padding: DIPR is exact within the filter (its max, its range and the attended keys are those of
the filtered keys). The sink and window positions of ``attention`` stay visible (every method
alike); ``AttentionConfig(sink=0, window=0)`` attends to the filter alone.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from alaya_jax.attention import registry
from alaya_jax.attention.config import AttentionConfig
from alaya_jax.attention.dense import DENSE_IMPLEMENTATIONS
from alaya_jax.attention.dense_sharded import sharded_attention
from alaya_jax.attention.masked import full_softmax, group_size, raw_scores
from alaya_jax.store import kv_store, sharding
from alaya_jax.store.kv_store import KVStore

#: Head layouts a caller's q, k, v may come in: name → axis order.
LAYOUTS = {"bthd": "[B, T, H, D] (tokens before heads)", "bhtd": "[B, H, T, D] (heads before tokens)"}

FULL = AttentionConfig(method="full")


def check_layout(layout: str) -> None:
    """``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown head layout {layout!r}; choose one of "
                         + ", ".join(f"{k!r} {v}" for k, v in LAYOUTS.items()))


def num_tokens(x: jax.Array, layout: str, name: str) -> int:
    """T of q, k or v ``x`` in ``layout`` (``ValueError`` naming ``name`` unless it has 4 dims)."""
    check_layout(layout)
    if x.ndim != 4:
        raise ValueError(f"{name} must be {LAYOUTS[layout]} for layout {layout!r}, got shape {tuple(x.shape)}")
    return x.shape[1] if layout == "bthd" else x.shape[2]


def _tokens_major(x: jax.Array, layout: str, name: str) -> jax.Array:
    """``x`` in the caller's ``layout`` → [B, T, H, D]."""
    num_tokens(x, layout, name)
    return x if layout == "bthd" else jnp.swapaxes(x, 1, 2)


def _from_tokens_major(x: jax.Array, layout: str) -> jax.Array:
    return x if layout == "bthd" else jnp.swapaxes(x, 1, 2)


def new_store(*, batch: int, num_kv_heads: int, head_dim: int, capacity: int, block_size: int = 64,
              dtype=jnp.float32, code_seed: int = kv_store.DEFAULT_CODE_SEED,
              placement: str = "device") -> KVStore:
    """An empty store of one layer: ``batch`` sequences of up to ``capacity`` positions (rounded up
    to blocks of ``block_size``), ``num_kv_heads`` KV heads of ``head_dim``; keys and values kept in
    ``dtype``. Capacity is static: make it as large as the longest context plus generation.
    ``placement``: "device", "values-on-host" or "keys-and-values-on-host" (pinned host memory for a
    context larger than the GPU holds; :mod:`alaya_jax.store.placement`)."""
    return kv_store.empty(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity,
                          block_size=block_size, dtype=dtype, code_seed=code_seed, placement=placement)


def append(store: KVStore, k: jax.Array, v: jax.Array, *, layout: str = "bthd",
           num_new: Optional[jax.Array] = None, mesh: Optional[Mesh] = None) -> KVStore:
    """The store with T new positions per sequence: k, v [B, T, Hkv, D] ("bthd") or [B, Hkv, T, D]
    ("bhtd"); ``num_new`` int [B] (default T): sequence b takes its first ``num_new[b]`` rows (ragged
    batches). The new keys' codes are built, so the store is searchable at once. Past the capacity:
    ``ValueError`` with concrete lengths; under ``jit`` check capacity up front (see
    :func:`alaya_jax.store.kv_store.append`). ``mesh``: the store is sharded along the sequence over it
    (:func:`alaya_jax.store.sharding.append`; None or one device: unsharded)."""
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have equal shapes {LAYOUTS.get(layout, '')}, got k{tuple(k.shape)} "
                         f"and v{tuple(v.shape)}")
    k, v = _tokens_major(k, layout, "k"), _tokens_major(v, layout, "v")
    if sharding.num_shards(mesh) > 1:
        return sharding.append(store, k, v, num_new, mesh=mesh)
    return kv_store.append(store, k, v, num_new)


def filter_mask(positions, store: KVStore) -> jax.Array:
    """bool [B, S=capacity] of a filter over the stored positions:

    - a boolean mask [N] or [B, N] (N <= capacity; positions >= N are outside the filter);
    - token ranges, integers [R, 2] or [B, R, 2]: the union of ``start <= p < end`` (an ``end``
      past the capacity is fine, e.g. ``(n, 2**31 - 1)`` for "from n on").

    A leading axis of 1 (or none) applies to every sequence. Traceable (the values may be traced;
    R and N are static)."""
    b, s = store.batch, store.capacity
    p = jnp.asarray(positions)
    if p.dtype == jnp.bool_:
        if p.ndim == 1:
            p = p[None]
        if p.ndim != 2 or p.shape[0] not in (1, b) or p.shape[1] > s:
            raise ValueError(f"a positions mask must be bool [N] or [B={b}, N] with N <= capacity {s}, "
                             f"got shape {tuple(p.shape)}")
        p = jnp.pad(p, ((0, 0), (0, s - p.shape[1])))
        return jnp.broadcast_to(p, (b, s))
    if jnp.issubdtype(p.dtype, jnp.integer):
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[0] not in (1, b) or p.shape[2] != 2:
            raise ValueError(f"positions ranges must be integers [R, 2] or [B={b}, R, 2] of [start, end), "
                             f"got shape {tuple(p.shape)}")
        if not isinstance(p, jax.core.Tracer):
            r = np.asarray(p)
            if (r[..., 0] < 0).any() or (r[..., 1] < r[..., 0]).any():
                raise ValueError(f"positions ranges need 0 <= start <= end, got {r.reshape(-1, 2).tolist()[:4]}")
        pos = jnp.arange(s, dtype=p.dtype)
        inside = (pos >= p[..., 0:1]) & (pos < p[..., 1:2])  # [B', R, S]
        return jnp.broadcast_to(jnp.any(inside, axis=1), (b, s))
    raise TypeError(f"positions must be a boolean mask or integer [start, end) ranges, got dtype {p.dtype}")


def decode_attention(q: jax.Array, store: KVStore, cfg: AttentionConfig, *, dense: bool = False,
                     beta=None, top_p=None, key_mask: Optional[jax.Array] = None, mesh: Optional[Mesh] = None):
    """One decode query per head over a store, through the method registry
    (:mod:`alaya_jax.attention.registry`). q [B,Hq,D] → (out [B,Hq,D], stats dict).

    ``beta`` / ``top_p`` (optional, may be traced; ``beta`` may be a β per query head,
    broadcastable to [B, Hq]) override ``cfg.beta`` / ``cfg.top_p`` so that sweeping them
    does not recompile. Calibrated DIPR takes its β from ``store.dipr_beta``. ``key_mask``
    bool [B,S]: a filter (:func:`filter_mask`; None: every stored position).

    Stats (when ``cfg.collect_stats``): ``keys_attended`` [B,Hq] and ``recall``
    [B,Hq] (share of the full softmax mass, over the keys the filter lets the query see, on the
    attended keys); DIPR adds ``candidates`` [B,Hkv].
    """
    method = registry.get("full" if dense else cfg.registry_name)
    beta = cfg.beta if beta is None else beta
    top_p = cfg.top_p if top_p is None else top_p
    out, mask, stats = method.attend(q, store, cfg, beta=beta, top_p=top_p, with_mask=cfg.collect_stats,
                                     key_mask=key_mask, mesh=mesh if sharding.num_shards(mesh) > 1 else None)
    if cfg.collect_stats:
        visible = registry.visible_keys(store, cfg, key_mask)  # [B,S]
        probs = full_softmax(raw_scores(q, store.dense_keys()), visible, q.shape[-1])
        stats = dict(stats, keys_attended=jnp.sum(mask, axis=-1).astype(jnp.float32),
                     recall=jnp.sum(jnp.where(mask, probs, 0.0), axis=-1))
    return out, stats


def attend(q: jax.Array, store: KVStore, *, attention: AttentionConfig = FULL, layout: str = "bthd",
           layer: Optional[int] = None, positions=None, query_positions: Optional[jax.Array] = None,
           beta=None, top_p=None, mesh: Optional[Mesh] = None) -> tuple[jax.Array, dict]:
    """One layer's attention of T query rows over a store (append the rows' keys first).

    Args:
      q: [B, T, Hq, D] ("bthd") or [B, Hq, T, D] ("bhtd"); B and D those of the store, Hq a
        multiple of its Hkv (see the module docstring).
      store: this layer's :class:`~alaya_jax.store.kv_store.KVStore`.
      attention: the method and its range (a frozen, hashable config: pass it as a static
        argument under ``jit``); method ``auto`` must be resolved first
        (``AttentionConfig.resolve``).
      layout: "bthd" or "bhtd", the layout of q and of the output.
      layer: this layer's index; a layer in ``attention.dense_layers`` attends densely.
      positions: a filter over the stored positions (:func:`filter_mask`: bool [N] / [B, N] or
        integer ranges [R, 2] / [B, R, 2]); None: the whole store.
      query_positions: int [B, T], the position of each row for the causal mask of a T > 1 chunk
        (default: ``lengths - T + t``, the rows just appended).
      beta, top_p: traced overrides of ``attention.beta`` / ``attention.top_p`` (a β per query
        head broadcasts to [B, Hq]).
      mesh: the store is sharded along the sequence over this mesh (docs/design.md §10): DIPR and dense
        attention run shard by shard (``filter_refine``, ``dense_sharded``); the other methods are plain jnp
        that XLA partitions. None or one device: unsharded.

    Returns:
      ``(out, stats)``: out in q's layout, shape and dtype; stats a dict of arrays (empty for a
      T > 1 chunk and for ``full`` without ``collect_stats``; see :func:`decode_attention`).
    """
    if not isinstance(store, KVStore):
        raise TypeError(f"store must be a KVStore (alaya_jax.new_store), got {type(store).__name__}")
    qt = _tokens_major(q, layout, "q")
    b, t, hq, d = qt.shape
    if (b, d) != (store.batch, store.head_dim):
        raise ValueError(f"q {LAYOUTS[layout]}={tuple(q.shape)} does not match the store "
                         f"(B={store.batch}, D={store.head_dim})")
    group_size(hq, store.num_kv_heads)
    if attention.method == "auto":
        raise ValueError("resolve method 'auto' with AttentionConfig.resolve(context_length) first")
    key_mask = None if positions is None else filter_mask(positions, store)
    if t > 1 or (attention.method == "full" and not attention.collect_stats):
        if query_positions is None:
            query_positions = store.lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
        elif tuple(query_positions.shape) != (b, t):
            raise ValueError(f"query_positions must be [B, T]={(b, t)}, got {tuple(query_positions.shape)}")
        visible = None if key_mask is None else registry.visible_keys(store, attention, key_mask)
        backend = attention.kernel.prefill_attention
        if sharding.num_shards(mesh) > 1:
            out = sharded_attention(qt, store, query_positions, implementation=backend, mesh=mesh, key_mask=visible)
        else:
            out = DENSE_IMPLEMENTATIONS[backend](qt, store, query_positions, key_mask=visible)
        return _from_tokens_major(out, layout), {}
    dense = attention.method == "full" or (layer is not None and layer in attention.dense_layers)
    out, stats = decode_attention(qt[:, 0], store, attention, dense=dense, beta=beta, top_p=top_p,
                                  key_mask=key_mask, mesh=mesh)
    return _from_tokens_major(out[:, None], layout), stats


__all__ = ["LAYOUTS", "new_store", "append", "attend", "check_layout", "decode_attention", "filter_mask",
           "num_tokens"]
