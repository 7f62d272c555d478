"""A context DB held only in this process's memory: what ``alaya serve`` keeps stored contexts in
when it is started without ``--db``.

:class:`MemoryContextDB` is a :class:`~alaya_jax.store.context_db.ContextDB` whose catalogue is
its memory tier (docs/design.md §5): no directory, no snapshot files. Storing a context keeps
it resident (trimmed to its valid blocks) in device or pinned host memory, up to the byte
budget, least-recently used evicted first; an evicted context is gone, and everything is lost
when the process exits. Lookups (longest stored prefix, sessions, list / show / delete) are
ContextDB's own.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any, Optional, Sequence

from alaya_jax.errors import ConfigError
from alaya_jax.store import placement as placements
from alaya_jax.store.context_db import ContextDB, StoreResult, _Entry, with_name
from alaya_jax.store.kv_store import KVStore
from alaya_jax.store.memory_tier import MEMORY_KINDS, MemoryTier
from alaya_jax.store.prefix_index import PrefixIndex, block_hashes, prefix_seed
from checkpoints.snapshot import FORMAT_VERSION, SnapshotError, SnapshotMeta, SnapshotNotFoundError

_RESIDENT = ("memory",)  # the stat key of every entry: there is no file whose change could invalidate it


class MemoryContextDB(ContextDB):
    """Stored contexts in memory only, for one model / tokenizer / dtype / block size (see the
    module docstring). ``budget_bytes`` (> 0) and ``memory_kind`` are the memory tier's;
    ``sharding``: where sessions' caches go (default: the first device)."""

    persistent = False

    def __init__(self, *, model_fingerprint: str, tokenizer_fingerprint: str, dtype: Any, block_size: int,
                 budget_bytes: int, memory_kind: str = "device", sharding=None):
        from checkpoints.snapshot import dtype_name

        if int(budget_bytes) <= 0:
            raise ConfigError(f"a memory-only context DB needs a memory budget > 0, got {budget_bytes}")
        if memory_kind not in MEMORY_KINDS:
            raise ConfigError(f"memory_kind must be one of {MEMORY_KINDS}, got {memory_kind!r}")
        if int(block_size) <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.path = "memory"  # what messages name as where a context was looked for
        self.catalog_only = False
        self.model_fingerprint, self.tokenizer_fingerprint = str(model_fingerprint), str(tokenizer_fingerprint)
        self.dtype, self.block_size = dtype_name(dtype), int(block_size)
        self.sharding, self.verify = sharding, False
        self.kv_placement = placements.DEFAULT_PLACEMENT  # alaya serve keeps the KV on the device
        self.memory_kind, self.memory_budget_bytes = memory_kind, int(budget_bytes)
        self._lock = threading.RLock()
        self._tier = MemoryTier(budget_bytes=self.memory_budget_bytes, memory_kind=memory_kind,
                                device_sharding=self._device_sharding(), lock=self._lock)
        self._dir = None
        self._seed = prefix_seed(self.model_fingerprint, self.tokenizer_fingerprint, self.dtype, self.block_size)
        self._entries: dict[str, _Entry] = {}
        self._index = PrefixIndex()

    def describe(self) -> dict:
        """What ``/health`` says about it."""
        st = self.memory_stats()
        return {"kind": "memory", "persistent": False, "contexts": len(st.snapshots), "memory_kind": st.memory_kind,
                "used_bytes": st.used_bytes, "budget_bytes": st.budget_bytes}

    def refresh(self) -> None:
        """Forget the contexts the memory tier has evicted (its catalogue is what is resident)."""
        with self._lock:
            resident = set(self._tier.stats().snapshots)
            gone = [sid for sid in self._entries if sid not in resident]
            for sid in gone:
                del self._entries[sid]
            if gone:
                self._rebuild_index()

    def _load(self, sid: str):
        raise SnapshotNotFoundError(f"context {sid} was evicted from memory (this server has no context DB "
                                    f"on disk: start alaya serve with --db DIR to keep contexts)")

    def show(self, ref: str, *, verify: bool = False) -> SnapshotMeta:
        return super().show(ref, verify=False)  # no files to re-hash

    def save(self, tokens: Sequence[int], kv: Sequence[KVStore], *, name: Optional[str] = None) -> StoreResult:
        """Keep a prefilled context resident (a copy of ``kv``, trimmed to its valid blocks; ``kv``
        stays the caller's); one already kept is ``already_stored`` and gets ``name`` (see
        ``ContextDB.save``). One larger than the whole budget raises ``SnapshotError`` (it could
        not be kept)."""
        tokens, kv = self._check_import(tokens, kv)
        done = self.stored(tokens, name=name, kv=kv)
        if done is not None:
            return done
        sid = self.snapshot_id(tokens)
        with self._lock:
            if sid in self._entries:  # kept by another thread meanwhile
                return self.stored(tokens, name=name, kv=kv)
            first = kv[0]
            meta = SnapshotMeta(format_version=FORMAT_VERSION, model_fingerprint=self.model_fingerprint,
                                tokenizer_fingerprint=self.tokenizer_fingerprint, dtype=self.dtype,
                                block_size=self.block_size, num_layers=len(kv), num_kv_heads=first.num_kv_heads,
                                head_dim=first.head_dim, num_tokens=len(tokens),
                                created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                                    timespec="microseconds"),
                                name=name, snapshot_id=sid)
            self._entries[sid] = _Entry(_RESIDENT, meta, None, block_hashes(self._seed, tokens, self.block_size))
            if self._keep(sid, kv, tokens, meta, owned=False) is None:
                del self._entries[sid]
                raise SnapshotError(f"the context ({len(tokens)} tokens) is larger than the memory budget of "
                                    f"{self.memory_budget_bytes} bytes (--memory-budget), so it cannot be kept")
        self.refresh()  # keeping it may have evicted others
        with self._lock:
            self._rebuild_index()
        return StoreResult(sid, False, name, (), None if name is None else "name")

    def _add_name(self, sid: str, name: str) -> tuple[SnapshotMeta, str]:
        with self._lock:
            e = self._entries[sid]
            e.meta, applied = with_name(e.meta, name)
            return e.meta, applied

    def _remove(self, sid: str) -> None:
        with self._lock:
            if self._entries.pop(sid, None) is None:
                raise SnapshotNotFoundError(f"no context {sid!r} in memory")
            self._evict(sid)
            self._rebuild_index()

    cleaned: list = []  # nothing on disk to clean up

    def cleanup(self, *, older_than_s: float = 0) -> list:
        return []

    def leftovers(self) -> list:
        return []
