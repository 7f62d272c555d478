"""The context DB's memory tier: snapshots kept resident in device or pinned host memory.

Like vLLM's GPU prefix cache: the snapshots one ``ContextDB`` instance stores or loads
from disk stay resident, trimmed to their valid blocks, up to a byte budget, least
recently used evicted first. A resident copy is served only while its catalogue entry is
unchanged (the DB checks its ``stat_key``), and what is handed out never shares a buffer
with it (:func:`materialize`): the engine donates session caches on accelerators.
docs/design.md §5.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable, Optional

import jax
import numpy as np

from alaya_jax.errors import ConfigError
from alaya_jax.store import kv_store
from alaya_jax.store import placement as placements
from alaya_jax.store.kv_store import KVStore

log = logging.getLogger("alaya_jax.store.context_db")

#: Where resident snapshots may live.
MEMORY_KINDS = ("device", "pinned_host")


@dataclasses.dataclass(frozen=True)
class MemoryTierStats:
    """The memory tier of one ``ContextDB``: ``used_bytes`` of ``budget_bytes`` held
    in ``memory_kind``; ``snapshots``: resident ids, least recently used first."""

    memory_kind: str
    budget_bytes: int
    used_bytes: int
    snapshots: tuple[str, ...]


@dataclasses.dataclass
class Resident:
    """One resident snapshot: B=1 stores trimmed to the valid blocks, every array in the tier's memory
    kind whatever the stores' ``placement`` says (storage, not for computing with: :func:`materialize`
    places each field where a session needs it)."""

    caches: tuple[KVStore, ...]
    tokens: list[int]
    meta: object  # checkpoints.SnapshotMeta
    stat_key: tuple  # the catalogue entry's stat key when kept: served only while it is unchanged
    nbytes: int


def _leaf_ids(x) -> tuple:
    """``(device, memory kind, buffer address)`` of every addressable shard of one array
    (a single-device array without building its shard objects: the serve path's common case)."""
    sh = x.sharding
    if isinstance(sh, jax.sharding.SingleDeviceSharding):
        (d,) = sh.device_set
        return ((d, sh.memory_kind, x.unsafe_buffer_pointer()),)
    return tuple((s.device, sh.memory_kind, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards)


def buffer_ids(tree) -> set:
    """``(device, memory kind, buffer address)`` of every addressable shard of a pytree's arrays."""
    return {i for x in jax.tree.leaves(tree) for i in _leaf_ids(x)}


def _unaliased(tree, avoid):
    """``tree`` with every array that shares a buffer with an array of ``avoid`` replaced
    by a copy (same sharding and memory kind). jax may return an input's buffer for an
    identity op (a whole-range slice, a device_put to the same sharding, a no-op
    resize), so identity of the Python objects is not enough. Arrays in different
    memory kinds cannot share a buffer: only same-kind pairs are compared."""
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
    taken = buffer_ids([x for x in jax.tree.leaves(avoid) if x.sharding.memory_kind in kinds])
    if not taken:
        return tree

    def fresh(x):
        if any(i in taken for i in _leaf_ids(x)):
            return jax.device_put(x, x.sharding, may_alias=False)
        return x

    return jax.tree.map(fresh, tree)


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _serve_copy_impl(caches, n, *, num_blocks: int):
    """All layers' stores cut to their first ``n`` positions (``n``: a traced int32) and
    padded / cut to ``num_blocks`` blocks, in one compiled dispatch. Every output is
    computed by an op of its own (``fit_blocks(copy=True)``), never an input passed
    through, so jit returns new buffers (no input is donated)."""
    return tuple(kv_store.with_lengths(kv_store.fit_blocks(c, num_blocks, copy=True), n) for c in caches)


# One executable per (layer count, shapes, dtypes, shardings, output blocks): jit's own cache.
_serve_copy = jax.jit(_serve_copy_impl, static_argnames=("num_blocks",))


def materialize(caches, length: int, n: int, capacity: int, *, device_sharding, shared: bool,
                placement: str = placements.DEFAULT_PLACEMENT) -> tuple[KVStore, ...]:
    """Stores on ``device_sharding`` holding the first ``n`` positions of ``caches`` (B=1 stores
    of ``length`` valid positions each, any memory kind), padded to ``capacity`` positions, ready.
    ``placement``: where their values and keys go (:mod:`alaya_jax.store.placement`); every other
    field goes to device memory. ``shared``: ``caches`` are the memory tier's, and the result gets
    buffers of its own (the engine donates session caches on accelerators, which would delete a
    shared buffer).

    Lazy restore: from a pinned-host tier only the device fields (codes, scales, error norms,
    lengths, and the keys unless they stay on the host) cross to the GPU; host fields stay host
    arrays (their copy padded to the capacity is made through the device: ``kv_store.fit_blocks``
    of a host field, two PCIe crossings of it, measured in ``bench/beyond_gpu.py``).

    One compiled dispatch for all layers (``_serve_copy``) instead of a few ops per
    array; the same values, bit for bit, as ``kv_store.truncate`` then ``kv_store.resize``."""
    n, length = int(n), int(length)
    if not 0 <= n <= length:
        raise ValueError(f"cannot truncate to {n} positions: the snapshot holds {length}")
    if not caches:
        return ()
    bk = caches[0].block_size
    nb = kv_store.num_blocks_for(capacity, bk)
    if nb <= 0 or nb < kv_store.num_blocks_for(n, bk):
        raise ValueError(f"capacity {capacity} ({nb} blocks of {bk}) cannot hold {n} valid positions")
    src = caches
    caches = _placed(caches, device_sharding, placement)
    out = _serve_copy(tuple(caches), np.int32(n), num_blocks=nb)
    if shared:
        out = _unaliased(out, src)  # a guard: _serve_copy never passes an input through
    return jax.block_until_ready(out)


def _placed(caches, device_sharding, placement: str) -> tuple[KVStore, ...]:
    """``caches`` with each array moved (one batched ``device_put``) to the memory kind ``placement``
    gives its field on ``device_sharding``'s devices, and ``placement`` recorded on the stores. Arrays
    already there are not moved."""
    host = placements.host_fields(placement)
    if host:
        placements.check_host_memory(next(iter(device_sharding.device_set)))
    target = {kind: device_sharding.with_memory_kind(kind) for kind in ("device", placements.HOST_MEMORY_KIND)}
    leaves, where = [], []
    for i, c in enumerate(caches):
        arrays = dict(kv_store.to_arrays(c), **({} if c.dipr_beta is None else {"dipr_beta": c.dipr_beta}))
        for f, x in arrays.items():
            kind = placements.HOST_MEMORY_KIND if f in host else "device"
            if x.sharding.memory_kind not in ((kind, None) if kind == "device" else (kind,)):
                leaves.append((x, target[kind]))
                where.append((i, f))
    moved = {}
    if leaves:  # e.g. codes out of a pinned-host tier: one batched transfer of everything that moves
        for (i, f), y in zip(where, jax.device_put([x for x, _ in leaves], [t for _, t in leaves])):
            moved.setdefault(i, {})[f] = y
    return tuple(c.replace(**moved.get(i, {}), placement=placement) for i, c in enumerate(caches))


class MemoryTier:
    """Resident snapshots by id, in ``memory_kind`` memory of the devices of ``device_sharding``,
    at most ``budget_bytes`` (> 0) in all. ``lock``: the owning DB's lock (its catalogue
    checks and these updates happen under one lock). A ``memory_kind`` the devices do not
    offer raises ``ValueError`` (no fallback to another kind)."""

    def __init__(self, *, budget_bytes: int, memory_kind: str, device_sharding, lock: threading.RLock):
        if memory_kind not in MEMORY_KINDS:
            raise ConfigError(f"memory_kind must be one of {MEMORY_KINDS}, got {memory_kind!r}")
        self.budget_bytes = int(budget_bytes)
        self.memory_kind = memory_kind
        self._lock = lock
        self._resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()
        self._sharding = device_sharding.with_memory_kind(memory_kind)
        for d in self._sharding.device_set:
            kinds = sorted(m.kind for m in d.addressable_memories())
            if memory_kind not in kinds:
                raise ConfigError(f"memory_kind {memory_kind!r} is not available on device {d} "
                                 f"({jax.default_backend()} backend offers {kinds})")

    @property
    def source(self) -> str:
        """How a session served from here names its source."""
        return f"memory:{self.memory_kind}"

    def stats(self) -> MemoryTierStats:
        with self._lock:
            return MemoryTierStats(self.memory_kind, self.budget_bytes,
                                   sum(r.nbytes for r in self._resident.values()), tuple(self._resident))

    def peek(self, sid: str) -> Optional[Resident]:
        """The resident copy of ``sid`` or None, without counting it as used (for inspection)."""
        with self._lock:
            return self._resident.get(sid)

    def get(self, sid: str) -> Optional[Resident]:
        """The resident copy of ``sid`` (now the most recently used), or None."""
        with self._lock:
            r = self._resident.get(sid)
            if r is not None:
                self._resident.move_to_end(sid)
            return r

    def keep(self, sid: str, caches, tokens: list[int], meta, *, stat_key: tuple, owned: bool) -> Optional[Resident]:
        """Keep snapshot ``sid`` (catalogue entry ``stat_key``) resident if it fits the budget,
        evicting the least recently used ones. ``caches``: B=1 stores holding exactly its
        tokens, any capacity; ``owned``: they may become the resident copy as they are, else
        the resident copy gets its own buffers. A copy already kept under the same
        ``stat_key`` is reused."""
        with self._lock:
            r = self._resident.get(sid)
            if r is not None and r.stat_key == stat_key:
                self._resident.move_to_end(sid)
                return r
            self.evict(sid)
            trimmed = tuple(kv_store.resize(c, meta.num_tokens) for c in caches)
            nbytes = _nbytes(trimmed)
            if nbytes > self.budget_bytes:
                log.info("context DB: snapshot %s (%d bytes) exceeds the memory budget of %d bytes: not kept",
                         sid, nbytes, self.budget_bytes)
                return None
            used = sum(x.nbytes for x in self._resident.values())
            while used + nbytes > self.budget_bytes:
                _, old = self._resident.popitem(last=False)
                used -= old.nbytes
            held = jax.device_put(trimmed, self._sharding)
            if not owned:
                held = _unaliased(held, caches)
            r = Resident(jax.block_until_ready(held), list(tokens), meta, stat_key, nbytes)
            self._resident[sid] = r
            return r

    def evict(self, sid: str) -> None:
        with self._lock:
            self._resident.pop(sid, None)

    def prune(self, usable: Callable[[str, tuple], bool]) -> None:
        """Evict every resident ``sid`` for which ``usable(sid, stat_key)`` is false (gone,
        unusable or changed on disk)."""
        with self._lock:
            for sid, r in list(self._resident.items()):
                if not usable(sid, r.stat_key):
                    del self._resident[sid]
