"""Dense causal attention over a store: the prefill path (T > 1 rows) and method ``full``.

:func:`causal_attention` is our jnp code (f32 scores over the whole capacity);
:func:`fused_causal_attention` goes through ``jax.nn.dot_product_attention`` (XLA or cuDNN).
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

from alaya_jax.attention.masked import group_size
from alaya_jax.store.kv_store import KVStore


def _key_mask(store: KVStore, positions: jax.Array, key_mask) -> jax.Array:
    """bool [B,T,S]: key position <= the query's position, < the length, and in ``key_mask`` [B,S] (None: all)."""
    kpos = jnp.arange(store.capacity)
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    return mask if key_mask is None else mask & key_mask[:, None, :]


def causal_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, key_mask=None) -> jax.Array:
    """Dense causal attention: q [B,T,Hq,D] at absolute ``positions`` [B,T] over the store → [B,T,Hq,D].
    ``key_mask`` bool [B,S=capacity] (None: every position): the keys a query may see at all."""
    b, t, hq, d = q.shape
    k, v = store.dense_keys(), store.dense_values()  # [B,Hkv,S,D]
    hkv, s = k.shape[1], k.shape[2]
    g = group_size(hq, hkv)
    if q.dtype == jnp.float32:
        qg, kk, prec = q.reshape(b, t, hkv, g, d), k.astype(jnp.float32), jax.lax.Precision.HIGHEST
    else:  # 16-bit operands, f32 accumulation: products are exact, only the summation order differs
        qg, kk, prec = q.reshape(b, t, hkv, g, d), k.astype(q.dtype), None
    sc = jnp.einsum("bthgd,bhsd->bhgts", qg, kk, precision=prec, preferred_element_type=jnp.float32)
    kpos = jnp.arange(s)
    mask = _key_mask(store, positions, key_mask)[:, None, None]  # [B,1,1,T,S]
    z = jnp.where(mask, sc / jnp.sqrt(jnp.float32(d)), -jnp.inf)
    p = jax.nn.softmax(z, axis=-1, where=mask)
    p = jnp.where(mask, p, 0.0)
    vv = jnp.where((kpos[None, :] < store.lengths[:, None])[:, None, :, None], v, jnp.zeros((), v.dtype))
    if v.dtype != jnp.float32:
        p = p.astype(v.dtype)
    o = jnp.einsum("bhgts,bhsd->bthgd", p, vv, precision=prec, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def fused_causal_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, implementation: str,
                           key_mask=None) -> jax.Array:
    """Same contract as :func:`causal_attention` through ``jax.nn.dot_product_attention``
    (``implementation`` "xla" or "cudnn"); the mask is passed as a boolean [B,1,T,S]."""
    k = jnp.swapaxes(store.dense_keys(), 1, 2).astype(q.dtype)  # [B,S,Hkv,D]
    v = jnp.swapaxes(store.dense_values(), 1, 2).astype(q.dtype)
    mask = _key_mask(store, positions, key_mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


#: Dense attention's backends by name (``KernelConfig.prefill_attention``): each is
#: ``fn(q [B,T,Hq,D], store, positions [B,T], *, key_mask=None) -> [B,T,Hq,D]``.
DENSE_IMPLEMENTATIONS = MappingProxyType({
    "reference": causal_attention,
    "xla": functools.partial(fused_causal_attention, implementation="xla"),
    "cudnn": functools.partial(fused_causal_attention, implementation="cudnn"),
})
