"""Dense causal attention over a store sharded along the sequence (docs/design.md §10).

The contract of :data:`alaya_jax.attention.dense.DENSE_IMPLEMENTATIONS` with a ``mesh``
(:mod:`alaya_jax.store.sharding`): inside one ``shard_map`` every device attends the queries (replicated)
over its own shard and gives a partial ``(out, lse)``; the partials are merged by log-sum-exp across the
devices (:func:`merge_across`: a ``pmax`` of the lse, then a ``psum`` of the rescaled terms). No key or
value leaves its device.

- ``reference``: each shard's partial in jnp (:func:`~alaya_jax.attention.dense.masked_part`) under the
  global causal mask (key position <= the query's, < the length, in the filter);
- ``cudnn``: a decode step (T = 1) is one cuDNN call per shard with the shard's valid count as its
  sequence length; a prefill chunk (T > 1) is the chunk over each shard's part of the prefix before it
  (sequence length ``clip(prior − offset, 0, C)``), merged across the shards, then merged with the chunk
  causally over itself (its T keys summed onto every device from the shard(s) that hold them) as in the
  unsharded :func:`~alaya_jax.attention.dense.cudnn_attention`. No filter.

``xla`` is not sharded (``jax.nn.dot_product_attention`` takes the whole store): it raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from alaya_jax.attention import dense
from alaya_jax.store import sharding
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.common import BackendUnavailableError

SHARDED = ("reference", "cudnn")


def merge_across(out: jax.Array, lse: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp merge of every device's partial ``(out [..., D], lse [...])`` (natural log; −inf: the
    device attended nothing) → the whole ``(out f32, lse)``, the same on every device."""
    lse = lse.astype(jnp.float32)
    m = jax.lax.pmax(lse, axis_name)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)
    num, den = jax.lax.psum((w[..., None] * jnp.where(w[..., None] > 0, out.astype(jnp.float32), 0.0), w),
                            axis_name)
    total = jnp.where(den > 0, m_safe + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0), total


def _frame(store: KVStore) -> sharding.ShardFrame:
    return sharding.shard_frame(store.lengths, store.capacity, sink=0, window=0)


def _reference_shard(q, store, positions, key_mask):
    fr = _frame(store)
    kpos = fr.offset + jnp.arange(store.capacity)  # global positions of the shard's slots
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    if key_mask is not None:
        mask = mask & key_mask[:, None, :]
    out, lse = dense.masked_part(q, store.dense_keys(), store.dense_values(), mask)
    out, _ = merge_across(out, lse, sharding.SEQ_AXIS)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _chunk_keys_across(store: KVStore, fr: sharding.ShardFrame, prior: jax.Array, t: int):
    """The chunk's T stored keys and values ``[B,Hkv,T,D]`` on every device: each shard gathers the rows it
    holds (zeros elsewhere) and the shards' pieces are summed."""
    pos = prior[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :] - fr.offset  # [B,T] local
    mine = ((pos >= 0) & (pos < store.capacity))[:, None, :, None]
    idx = jnp.clip(pos, 0, store.capacity - 1)[:, None, :, None]

    def piece(x):
        return jnp.where(mine, jnp.take_along_axis(x, idx, axis=2), jnp.zeros((), x.dtype))

    return jax.lax.psum((piece(store.dense_keys()), piece(store.dense_values())), sharding.SEQ_AXIS)


def _cudnn_shard(q, store, positions, key_mask):
    del key_mask  # refused before the shard_map
    fa = dense._cudnn()
    fr = _frame(store)
    b, t, hq, d = q.shape
    scale = float(d) ** -0.5
    keys, values = store.dense_keys(), store.dense_values()
    qb = jnp.swapaxes(q, 1, 2)

    def local(kv_len, q_len, causal_keys=None):
        k_, v_ = (keys, values) if causal_keys is None else causal_keys
        out, lse = fa.dot_product_attention(
            qb, k_, v_, q_seqlen=q_len, kv_seqlen=jnp.maximum(kv_len, 1), scale=scale,
            mask_type=fa.MaskType.PADDING if causal_keys is None else fa.MaskType.PADDING_CAUSAL,
            qkv_layout="BNTH", return_residual=True)
        return out, jnp.where((kv_len > 0)[:, None, None], lse, -jnp.inf)

    if t == 1:
        out, _ = merge_across(*local(fr.lengths, jnp.ones((b,), jnp.int32)), sharding.SEQ_AXIS)
        return jnp.swapaxes(out, 1, 2).astype(q.dtype)
    prior, num_new = dense.chunk_rows(store, positions)
    pre_len = jnp.clip(prior - fr.offset, 0, store.capacity)
    pre = merge_across(*local(pre_len, jnp.full((b,), t, jnp.int32)), sharding.SEQ_AXIS)
    n = jnp.maximum(num_new, 1)
    own = local(n, n, causal_keys=_chunk_keys_across(store, fr, prior, t))
    return dense.merge_prefix_and_chunk(pre, own, prior, num_new)


_SHARDS = {"reference": _reference_shard, "cudnn": _cudnn_shard}


def sharded_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, implementation: str, mesh: Mesh,
                      key_mask=None) -> jax.Array:
    """:data:`~alaya_jax.attention.dense.DENSE_IMPLEMENTATIONS`' contract over a sharded store (module
    docstring). q [B,T,Hq,D], positions [B,T], key_mask bool [B,S] or None → [B,T,Hq,D]."""
    if implementation not in _SHARDS:
        raise BackendUnavailableError(f"prefill_attention {implementation!r} does not run on a sharded store "
                                      f"(devices > 1); use one of {SHARDED}")
    if implementation == "cudnn":
        dense._cudnn()  # a clear error off NVIDIA GPUs, before tracing the shards
        if key_mask is not None:
            raise BackendUnavailableError("prefill_attention 'cudnn' takes no filter (positions=); use 'reference'")
    sharding.check_shardable(store, mesh)
    seq = P(None, sharding.SEQ_AXIS)
    return jax.shard_map(_SHARDS[implementation], mesh=mesh,
                         in_specs=(P(), sharding.store_specs(store), P(), None if key_mask is None else seq),
                         out_specs=P(), check_vma=False)(q, store, positions, key_mask)


__all__ = ["SHARDED", "merge_across", "sharded_attention"]
