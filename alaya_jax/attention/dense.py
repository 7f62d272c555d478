"""Dense causal attention over a store: the prefill path (T > 1 rows) and method ``full``.

Every backend has the contract of :data:`DENSE_IMPLEMENTATIONS`::

    fn(q [B,T,Hq,D], store, positions [B,T], *, key_mask=None) -> [B,T,Hq,D]

``store`` already holds the chunk (it is appended first): row t of sequence b sits at position
``positions[b, t]`` and attends to every stored position up to its own (and in ``key_mask``
[B,S], a filter, when given).

- ``reference``: :func:`causal_attention`, our jnp code (f32 scores over the whole capacity);
- ``xla``: ``jax.nn.dot_product_attention`` (XLA), the store transposed to [B,S,H,D] and masked;
- ``cudnn``: :func:`cudnn_attention`, cuDNN's fused flash attention in the store's own layout
  (BNSH: ``store.dense_keys()`` is a free reshape, the store is not copied) with sequence lengths
  instead of a mask, so that it reads keys only up to each length. A decode step (T = 1) is one
  call; a prefill chunk is two, merged by log-sum-exp (:func:`merge_prefix_and_chunk`): the
  chunk's queries over the prefix before it, and the chunk causally over itself. It takes the
  rows to be the ones just appended (consecutive positions from ``positions[:, 0]``), and no
  filter.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

from alaya_jax.attention.masked import group_size
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.common import BackendUnavailableError


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
    (``implementation`` "xla"); the mask is passed as a boolean [B,1,T,S] and the store is
    transposed to [B,S,Hkv,D] (a copy of all K/V per call)."""
    k = jnp.swapaxes(store.dense_keys(), 1, 2).astype(q.dtype)  # [B,S,Hkv,D]
    v = jnp.swapaxes(store.dense_values(), 1, 2).astype(q.dtype)
    valid = jnp.arange(store.capacity)[None, :] < store.lengths[:, None]
    v = jnp.where(valid[:, :, None, None], v, jnp.zeros((), v.dtype))  # NaN past a length would give 0·NaN
    mask = _key_mask(store, positions, key_mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


# ----------------------------------------------------------------------------- two-part prefill


def chunk_rows(store: KVStore, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(prior [B], num_new [B])`` of a chunk whose rows were just appended at consecutive positions
    from ``positions[:, 0]``: the positions before it, and its real rows (the rest is padding)."""
    prior = positions[:, 0].astype(jnp.int32)
    return prior, jnp.clip(store.lengths - prior, 0, positions.shape[1])


def chunk_keys(store: KVStore, prior: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
    """The T stored keys and values from ``prior`` on, per sequence: ``[B,Hkv,T,D]`` each (a gather of
    T positions, indices past the capacity clamped: those rows are padding)."""
    idx = jnp.minimum(prior[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], store.capacity - 1)
    idx = idx[:, None, :, None]
    return (jnp.take_along_axis(store.dense_keys(), idx, axis=2),
            jnp.take_along_axis(store.dense_values(), idx, axis=2))


def merge_prefix_and_chunk(prefix: tuple[jax.Array, jax.Array], chunk: tuple[jax.Array, jax.Array],
                           prior: jax.Array, num_new: jax.Array) -> jax.Array:
    """Attention of a chunk over (prefix ∪ itself) from its two parts, each ``(out [B,Hq,T,D],
    lse f32 [B,Hq,T])``: the chunk's queries over the ``prior`` [B] positions before it, and the
    chunk causally over its own ``num_new`` [B] rows; lse = log Σ exp(q·k/√D) (natural log). A
    sequence with no prior positions takes the chunk part alone; rows at or past ``num_new``
    give 0. → [B,T,Hq,D]."""
    (oa, la), (ob, lb) = prefix, chunk
    t = ob.shape[2]
    has_prior = (prior > 0)[:, None, None]  # [B,1,1]
    la = jnp.where(has_prior, la.astype(jnp.float32), -jnp.inf)
    lb = lb.astype(jnp.float32)
    m = jnp.maximum(la, lb)
    wa = jnp.where(has_prior, jnp.exp(la - m), 0.0)  # [B,Hq,T]
    wb = jnp.exp(lb - m)
    oa = jnp.where(has_prior[..., None], oa.astype(jnp.float32), 0.0)
    out = (wa[..., None] * oa + wb[..., None] * ob.astype(jnp.float32)) / (wa + wb)[..., None]
    row_ok = (jnp.arange(t)[None, :] < num_new[:, None])[:, None, :, None]  # [B,1,T,1]
    return jnp.swapaxes(jnp.where(row_ok, out, 0.0), 1, 2).astype(ob.dtype)


def reference_parts(q: jax.Array, store: KVStore, positions: jax.Array):
    """The two parts :func:`merge_prefix_and_chunk` takes and ``(prior, num_new)``, in plain jnp (what
    the cuDNN calls of :func:`cudnn_attention` compute; the tests hold the merge to
    :func:`causal_attention` with these)."""
    prior, num_new = chunk_rows(store, positions)
    b, t, hq, d = q.shape

    kpos = jnp.arange(store.capacity)
    pre_mask = jnp.broadcast_to((kpos[None, :] < prior[:, None])[:, None, :], (b, t, store.capacity))
    tpos = jnp.arange(t)
    self_mask = (tpos[None, None, :] <= tpos[None, :, None]) & (tpos[None, None, :] < num_new[:, None, None])
    ks, vs = chunk_keys(store, prior, t)
    return (masked_part(q, store.dense_keys(), store.dense_values(), pre_mask), masked_part(q, ks, vs, self_mask),
            prior, num_new)


def masked_part(q: jax.Array, kk: jax.Array, vv: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B,T,Hq,D] over kk, vv [B,Hkv,S,D] where ``mask`` [B,T,S], in f32 jnp →
    ``(out [B,Hq,T,D] in q's dtype, lse f32 [B,Hq,T])`` (a row with nothing to attend: out 0, lse −inf)."""
    b, t, hq, d = q.shape
    qb = jnp.swapaxes(q, 1, 2).astype(jnp.float32)  # [B,Hq,T,D]
    g = group_size(hq, kk.shape[1])
    sc = jnp.einsum("bhgtd,bhsd->bhgts", qb.reshape(b, -1, g, t, d), kk.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    mask = mask[:, None, None]
    z = jnp.where(mask, sc, -jnp.inf)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.where(mask, jnp.exp(z - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    vv = jnp.where(jnp.any(mask, axis=(1, 2, 3))[:, None, :, None], vv.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgts,bhsd->bhgtd", p, vv, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, hq, t, d).astype(q.dtype), lse.reshape(b, hq, t)


# ----------------------------------------------------------------------------- cuDNN


def _cudnn():
    """jax's cuDNN fused attention (its BNTH layout and f32 softmax statistics are only offered by
    this module, not by ``jax.nn.dot_product_attention``); a clear error where it cannot run."""
    if jax.default_backend() != "gpu":
        raise BackendUnavailableError(f"prefill_attention 'cudnn' needs an NVIDIA GPU; the backend is "
                                      f"{jax.default_backend()!r} (use 'reference' or 'xla')")
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:  # pragma: no cover - depends on the jax build
        raise BackendUnavailableError(f"prefill_attention 'cudnn': this jax has no cuDNN attention ({e})") from None
    return fa


def cudnn_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, key_mask=None) -> jax.Array:
    """:data:`DENSE_IMPLEMENTATIONS`' contract through cuDNN, with no copy of the store (see the
    module docstring). Raises :class:`BackendUnavailableError` off NVIDIA GPUs, for float32, and
    for a filter (``key_mask``)."""
    fa = _cudnn()
    if q.dtype not in (jnp.bfloat16, jnp.float16) or store.dtype != q.dtype:
        raise BackendUnavailableError(f"prefill_attention 'cudnn' needs bfloat16 or float16 queries and store; "
                                      f"got q {q.dtype}, store {store.dtype} (use 'reference' for float32)")
    if key_mask is not None:
        raise BackendUnavailableError("prefill_attention 'cudnn' attends by sequence lengths and takes no filter "
                                      "(positions=); use 'reference' or 'xla' for filtered queries")
    b, t, hq, d = q.shape
    scale = float(d) ** -0.5
    keys, values = store.dense_keys(), store.dense_values()  # [B,Hkv,S,D]: BNSH, free reshapes
    qb = jnp.swapaxes(q, 1, 2)  # [B,Hq,T,D]
    if t == 1:  # a decode step: one query over every valid position
        out = fa.dot_product_attention(qb, keys, values, q_seqlen=jnp.ones((b,), jnp.int32),
                                       kv_seqlen=jnp.maximum(store.lengths, 1), scale=scale,
                                       mask_type=fa.MaskType.PADDING, qkv_layout="BNTH")
        return jnp.swapaxes(out, 1, 2)
    prior, num_new = chunk_rows(store, positions)
    # The chunk over the prefix before it (kv_seqlen = prior; a sequence without one reads one key,
    # weighted 0 by the merge), then over itself (its T stored rows, causal), both in BNTH.
    full = jnp.full((b,), t, jnp.int32)
    pre = fa.dot_product_attention(qb, keys, values, q_seqlen=full, kv_seqlen=jnp.maximum(prior, 1), scale=scale,
                                   mask_type=fa.MaskType.PADDING, qkv_layout="BNTH", return_residual=True)
    ks, vs = chunk_keys(store, prior, t)
    n = jnp.maximum(num_new, 1)
    own = fa.dot_product_attention(qb, ks, vs, q_seqlen=n, kv_seqlen=n, scale=scale,
                                   mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BNTH", return_residual=True)
    return merge_prefix_and_chunk(pre, own, prior, num_new)


#: Dense attention's backends by name (``KernelConfig.prefill_attention``); the contract is in the
#: module docstring.
DENSE_IMPLEMENTATIONS = MappingProxyType({
    "reference": causal_attention,
    "xla": functools.partial(fused_causal_attention, implementation="xla"),
    "cudnn": cudnn_attention,
})
