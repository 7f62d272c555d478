"""A KV store's blocks sharded along the sequence over the devices of one host (docs/design.md §10).

Layout. A 1-D :class:`~jax.sharding.Mesh` of N devices with the axis ``"seq"`` (:data:`SEQ_AXIS`). The block
axis NB of every blocked field (keys, values, codes, code scales and errors, block value means) is cut into N
equal contiguous ranges by one ``PartitionSpec(None, None, "seq")``: device i holds blocks
``[i·NB/N, (i+1)·NB/N)``, i.e. positions ``[i·C, (i+1)·C)`` with ``C = capacity / N``, and the codes, keys,
values and value means of a block always live on the same device. ``rot_signs``, ``lengths`` and
``dipr_beta`` are replicated. The global value is an ordinary :class:`~alaya_jax.store.kv_store.KVStore`
(every store function still applies); only its arrays' shardings differ. A capacity is made shardable by
:func:`sharded_capacity` (a multiple of N blocks).

Appends (:func:`append`). Position p lives on shard ``p // C``; each device writes the new rows whose
positions fall in its range, so a sequence fills shard 0, then shard 1, ... (appends go to the last
shard that has room) and nothing moves between devices.

Inside ``shard_map`` a device sees its shard as a KVStore of C positions whose ``lengths`` are the
sequences' global lengths; :func:`shard_frame` gives its offset, its local valid counts and the forced
(sink / window) positions it holds, in its own coordinates.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alaya_jax.store import kv_store
from alaya_jax.store.kv_store import KVStore

#: The mesh axis the sequence is sharded over.
SEQ_AXIS = "seq"


def seq_mesh(devices: int) -> Mesh:
    """A 1-D mesh over the first ``devices`` devices of the default backend, axis :data:`SEQ_AXIS`.
    More devices than the backend has is a ``ValueError`` naming both counts."""
    n = int(devices)
    available = jax.devices()
    if n < 1:
        raise ValueError(f"the device count must be >= 1, got {devices}")
    if n > len(available):
        raise ValueError(f"{n} devices were asked for, but the {jax.default_backend()} backend has "
                         f"{len(available)} ({', '.join(str(d) for d in available)})")
    return Mesh(available[:n], (SEQ_AXIS,))


def num_shards(mesh: Optional[Mesh]) -> int:
    """Devices along :data:`SEQ_AXIS` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[SEQ_AXIS])


def sharded_capacity(capacity: int, *, block_size: int, devices: int) -> int:
    """``capacity`` rounded up to whole blocks and to a multiple of ``devices`` blocks (equal shards)."""
    per = int(block_size) * int(devices)
    return -(-int(capacity) // per) * per


def store_specs(store: KVStore) -> KVStore:
    """The store's ``PartitionSpec`` tree (a pytree prefix of ``store``): blocked fields split along the
    block axis over :data:`SEQ_AXIS`, everything else replicated."""
    blocked = P(None, None, SEQ_AXIS)
    return store.replace(keys=blocked, values=blocked, codes=blocked, code_scale=blocked, code_err=blocked,
                         value_means=blocked, rot_signs=P(), lengths=P(),
                         dipr_beta=None if store.dipr_beta is None else P())


def store_shardings(store: KVStore, mesh: Mesh) -> KVStore:
    """:func:`store_specs` as ``NamedSharding`` s on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), store_specs(store),
                        is_leaf=lambda x: isinstance(x, P))


def check_shardable(store: KVStore, mesh: Mesh) -> None:
    """ValueError unless the store's blocks split into equal shards over the mesh (and it is on the devices)."""
    n = num_shards(mesh)
    if store.host_fields:
        raise ValueError(f"a store sharded over devices keeps its arrays on the devices (placement 'device'), got "
                         f"placement {store.placement!r}")
    if store.num_blocks % n:
        raise ValueError(f"a store of {store.num_blocks} blocks does not split into {n} equal shards; make its "
                         f"capacity a multiple of {n} blocks (sharding.sharded_capacity)")


def shard_store(store: KVStore, mesh: Mesh) -> KVStore:
    """The store placed on ``mesh`` with :func:`store_shardings` (a copy onto the devices)."""
    check_shardable(store, mesh)
    return jax.device_put(store, store_shardings(store, mesh))


@struct.dataclass
class ShardFrame:
    """One device's shard in its own coordinates (inside ``shard_map``): local position l is global
    position ``offset + l``."""

    offset: jax.Array  # [] int32: the global position of local slot 0
    lengths: jax.Array  # [B] int32: valid positions of this shard (0..C)
    sinks: jax.Array  # [B] int32: local sink positions 0..sinks-1 (the global p < sink held here)
    windows: jax.Array  # [B] int32: local window positions lengths-windows..lengths-1 (global p >= length - window)


def shard_frame(lengths: jax.Array, shard_capacity: int, *, sink: int, window: int,
                axis_name: Optional[str] = SEQ_AXIS) -> ShardFrame:
    """The frame of this device's shard of C = ``shard_capacity`` positions, from the sequences' global
    ``lengths`` [B]. ``axis_name`` None: an unsharded store (offset 0, the whole sequence).

    The forced positions of a sequence of length L (p < sink, L − window <= p < L) held by the shard at
    offset o are local ``[0, sinks)`` and ``[n − windows, n)`` with n = clip(L − o, 0, C): the window
    always ends at the shard's last valid position when the shard holds any of it."""
    lengths = jnp.asarray(lengths, jnp.int32)
    c = int(shard_capacity)
    o = jnp.int32(0) if axis_name is None else jax.lax.axis_index(axis_name).astype(jnp.int32) * c
    n = jnp.clip(lengths - o, 0, c)
    sinks = jnp.broadcast_to(jnp.clip(jnp.int32(sink) - o, 0, min(int(sink), c)), lengths.shape)
    windows = jnp.clip(n - jnp.maximum(lengths - int(window) - o, 0), 0, int(window))
    return ShardFrame(offset=o, lengths=n, sinks=sinks, windows=windows)


def local_view(store: KVStore, frame: ShardFrame) -> KVStore:
    """The shard as a store of its own: its ``lengths`` the shard's valid counts (what the kernels read).
    The block value means are kept as they are (not recomputed, as ``kv_store.with_lengths`` would): a
    shard's valid positions are the sequence's valid positions it holds, in whole blocks, so its blocks'
    means are the global ones."""
    return store.replace(lengths=jnp.asarray(frame.lengths, jnp.int32))


def append(store: KVStore, k_new: jax.Array, v_new: jax.Array, num_new: Optional[jax.Array] = None, *,
           mesh: Mesh) -> KVStore:
    """:func:`alaya_jax.store.kv_store.append` on a sharded store: every device writes the new rows whose
    positions it holds (k_new, v_new [B, T, Hkv, D] and num_new [B] replicated); the result keeps the
    store's shardings. With concrete lengths an overflow of the whole capacity raises ``ValueError``."""
    check_shardable(store, mesh)
    b, t = k_new.shape[:2]
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    if not isinstance(store.lengths, jax.core.Tracer) and not isinstance(num_new, jax.core.Tracer):
        kv_store.check_capacity(store.replace(lengths=store.lengths + num_new))
    c = store.capacity // num_shards(mesh)
    specs = store_specs(store)

    def local(st, k, v, nn):
        return kv_store.append(st, k, v, nn, first_position=jax.lax.axis_index(SEQ_AXIS) * c)

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(), P()), out_specs=specs,
                         check_vma=False)(store, k_new, v_new, num_new)


__all__ = ["SEQ_AXIS", "ShardFrame", "append", "check_shardable", "local_view", "num_shards", "seq_mesh",
           "shard_frame", "shard_store", "sharded_capacity", "store_shardings", "store_specs"]
