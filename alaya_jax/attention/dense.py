"""Dense causal attention over a store: the prefill path (T > 1 rows) and method ``full``.

Every backend has the contract of :data:`DENSE_IMPLEMENTATIONS`::

    fn(q [B,T,Hq,D], store, positions [B,T], *, k [B,T,Hkv,D], v [B,T,Hkv,D], num_new [B]) -> [B,T,Hq,D]

``store`` already holds the chunk (the attention function appends first): row ``t < num_new[b]``
of sequence b sits at position ``lengths[b] - num_new[b] + t`` and attends to every position up
to its own. ``k``/``v`` are the chunk's keys and values as the store received them.

- ``reference``: :func:`causal_attention`, our jnp code (f32 scores over the whole capacity);
- ``xla``: ``jax.nn.dot_product_attention`` (XLA), the store transposed to [B,S,H,D] and masked;
- ``cudnn``: :func:`cudnn_attention`, cuDNN's fused flash attention in the store's own layout
  (BNSH: ``store.dense_keys()`` is a free reshape, nothing is copied) with sequence lengths
  instead of a mask, so that it reads keys only up to each length. A decode step (T = 1) is one
  call; a prefill chunk is two, merged by log-sum-exp (:func:`merge_prefix_and_chunk`): the
  chunk's queries over the prefix already in the store, and the chunk causally over itself.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

from alaya_jax.attention.masked import group_size
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.common import BackendUnavailableError


def causal_attention(q: jax.Array, store: KVStore, positions: jax.Array, **_chunk) -> jax.Array:
    """Dense causal attention: q [B,T,Hq,D] at absolute ``positions`` [B,T] over the store → [B,T,Hq,D]."""
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
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    mask = mask[:, None, None]  # [B,1,1,T,S]
    z = jnp.where(mask, sc / jnp.sqrt(jnp.float32(d)), -jnp.inf)
    p = jax.nn.softmax(z, axis=-1, where=mask)
    p = jnp.where(mask, p, 0.0)
    vv = jnp.where((kpos[None, :] < store.lengths[:, None])[:, None, :, None], v, jnp.zeros((), v.dtype))
    if v.dtype != jnp.float32:
        p = p.astype(v.dtype)
    o = jnp.einsum("bhgts,bhsd->bthgd", p, vv, precision=prec, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def fused_causal_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, implementation: str,
                           **_chunk) -> jax.Array:
    """Same contract as :func:`causal_attention` through ``jax.nn.dot_product_attention``
    (``implementation`` "xla"); the mask is passed as a boolean [B,1,T,S] and the store is
    transposed to [B,S,Hkv,D] (a copy of all K/V per call)."""
    k = jnp.swapaxes(store.dense_keys(), 1, 2).astype(q.dtype)  # [B,S,Hkv,D]
    v = jnp.swapaxes(store.dense_values(), 1, 2).astype(q.dtype)
    s = k.shape[1]
    kpos = jnp.arange(s)
    v = jnp.where((kpos[None, :] < store.lengths[:, None])[:, :, None, None], v, 0)  # NaN past a length: 0·NaN
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


# ----------------------------------------------------------------------------- two-part prefill


def merge_prefix_and_chunk(prefix: tuple[jax.Array, jax.Array], chunk: tuple[jax.Array, jax.Array],
                           prior: jax.Array, num_new: jax.Array) -> jax.Array:
    """Attention of a chunk over (prefix ∪ itself) from its two parts.

    ``prefix``: (out [B,Hq,T,D], lse f32 [B,Hq,T]) of the chunk's queries over the ``prior`` [B]
    positions before it; ``chunk``: (out [B,T,Hq,D], lse [B,Hq,T]) of the chunk causally over its
    own ``num_new`` [B] rows. lse = log Σ exp(q·k/√D) (natural log). A sequence with no prior
    positions takes the chunk part alone; rows at or past ``num_new`` give 0. → [B,T,Hq,D]."""
    (oa, la), (ob, lb) = prefix, chunk
    t = ob.shape[1]
    has_prior = (prior > 0)[:, None, None]  # [B,1,1]
    la = jnp.where(has_prior, la.astype(jnp.float32), -jnp.inf)
    lb = lb.astype(jnp.float32)
    m = jnp.maximum(la, lb)
    wa = jnp.where(has_prior, jnp.exp(la - m), 0.0)  # [B,Hq,T]
    wb = jnp.exp(lb - m)
    oa = jnp.where(has_prior[..., None], oa.astype(jnp.float32), 0.0)
    out = (wa[..., None] * oa + wb[..., None] * jnp.swapaxes(ob, 1, 2).astype(jnp.float32)) / (wa + wb)[..., None]
    row_ok = (jnp.arange(t)[None, :] < num_new[:, None])[:, None, :, None]  # [B,1,T,1]
    return jnp.swapaxes(jnp.where(row_ok, out, 0.0), 1, 2).astype(ob.dtype)


def reference_parts(q: jax.Array, store: KVStore, *, k: jax.Array, v: jax.Array, num_new: jax.Array):
    """The two parts :func:`merge_prefix_and_chunk` takes, in plain jnp (what the cuDNN calls of
    :func:`cudnn_attention` compute; the tests hold the merge to :func:`causal_attention` with these)."""
    prior = store.lengths - num_new
    b, t, hq, d = q.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(d))

    def part(qq, kk, vv, mask):  # qq [B,T,Hq,D], kk/vv [B,Hkv,S,D], mask [B,T,S] → (out [B,T,Hq,D], lse [B,Hq,T])
        g = group_size(hq, kk.shape[1])
        sc = jnp.einsum("bthgd,bhsd->bhgts", qq.reshape(b, t, -1, g, d).astype(jnp.float32),
                        kk.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale
        mask = mask[:, None, None]
        z = jnp.where(mask, sc, -jnp.inf)
        lse = jax.nn.logsumexp(z, axis=-1)
        p = jnp.where(mask, jnp.exp(z - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
        vv = jnp.where(jnp.any(mask, axis=(1, 2, 3))[:, None, :, None], vv.astype(jnp.float32), 0.0)
        o = jnp.einsum("bhgts,bhsd->bthgd", p, vv, precision=jax.lax.Precision.HIGHEST)
        return o.reshape(b, t, hq, d).astype(q.dtype), lse.reshape(b, hq, t)

    s = store.capacity
    kpos = jnp.arange(s)
    pre_mask = jnp.broadcast_to((kpos[None, :] < prior[:, None])[:, None, :], (b, t, s))
    oa, la = part(q, store.dense_keys(), store.dense_values(), pre_mask)
    tpos = jnp.arange(t)
    self_mask = (tpos[None, None, :] <= tpos[None, :, None]) & (tpos[None, None, :] < num_new[:, None, None])
    ob, lb = part(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), self_mask)
    return (jnp.swapaxes(oa, 1, 2), la), (ob, lb), prior


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


def _check_cudnn_dtype(q, store):
    if q.dtype not in (jnp.bfloat16, jnp.float16) or store.dtype != q.dtype:
        raise BackendUnavailableError(f"prefill_attention 'cudnn' needs bfloat16 or float16 queries and store; "
                                      f"got q {q.dtype}, store {store.dtype} (use 'reference' for float32)")


def cudnn_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, k: jax.Array, v: jax.Array,
                    num_new: jax.Array) -> jax.Array:
    """:data:`DENSE_IMPLEMENTATIONS`' contract through cuDNN, with no copy of the store (see the
    module docstring). Raises :class:`BackendUnavailableError` off NVIDIA GPUs or for f32."""
    fa = _cudnn()
    _check_cudnn_dtype(q, store)
    b, t, hq, d = q.shape
    scale = float(d) ** -0.5
    keys, values = store.dense_keys(), store.dense_values()  # [B,Hkv,S,D]: BNSH, free reshapes
    ones = jnp.ones((b,), jnp.int32)
    if t == 1:  # a decode step: one query over every valid position
        out = fa.dot_product_attention(jnp.swapaxes(q, 1, 2), keys, values, q_seqlen=ones,
                                       kv_seqlen=jnp.maximum(store.lengths, 1), scale=scale,
                                       mask_type=fa.MaskType.PADDING, qkv_layout="BNTH")
        return jnp.swapaxes(out, 1, 2)
    num_new = jnp.asarray(num_new, jnp.int32)
    prior = store.lengths - num_new
    # The chunk over the prefix before it (kv_seqlen = prior; a sequence without one reads one
    # key, weighted 0 by the merge), in the store's layout; the chunk over itself, causal.
    oa, la = fa.dot_product_attention(jnp.swapaxes(q, 1, 2), keys, values, q_seqlen=jnp.full((b,), t, jnp.int32),
                                      kv_seqlen=jnp.maximum(prior, 1), scale=scale, mask_type=fa.MaskType.PADDING,
                                      qkv_layout="BNTH", return_residual=True)
    n = jnp.maximum(num_new, 1)
    ob, lb = fa.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), q_seqlen=n, kv_seqlen=n,
                                      scale=scale, mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
                                      return_residual=True)
    return merge_prefix_and_chunk((oa, la), (ob, lb), prior, num_new)


#: Dense attention's backends by name (``KernelConfig.prefill_attention``); the contract is in the
#: module docstring.
DENSE_IMPLEMENTATIONS = MappingProxyType({
    "reference": causal_attention,
    "xla": functools.partial(fused_causal_attention, implementation="xla"),
    "cudnn": cudnn_attention,
})
