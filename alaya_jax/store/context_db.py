"""The context DB: a directory of prefilled-context snapshots with prefix reuse (docs/design.md §5).

Layout::

    <root>/snapshots/<id>/        one snapshot (see ``checkpoints.snapshot``)
    <root>/snapshots/.tmp-*       a save in progress (or killed): ignored; its writer holds
                                  the lock .tmp-*.lock, so a killed save's is removed on open
    <root>/snapshots/.trash-*     a delete in progress (or killed): ignored, removed on open

There is no separate catalogue file to get out of step: the catalogue is the set
of ``snapshots/<id>/meta.json`` files, scanned on open and re-scanned (a
``stat`` per snapshot, new ones read) before every lookup. Because a snapshot
directory only appears by an atomic rename of a complete one, a crash at any
point of a save or delete leaves the catalogue consistent, and any number of
readers (threads or processes) can use one DB without locks.

Ids are content addresses: ``sha256(model, tokenizer, dtype, block size, token
ids)[:16]``, so saving a token sequence that is already stored returns the
existing id and two writers racing on the same context end with one copy; either way
the save says ``already_stored`` and keeps the name it was given (the snapshot's name,
or one of its ``aliases``).

This module holds the catalogue and the ``ContextDB`` API; the prefix lookup is
:mod:`alaya_jax.store.prefix_index` (chained block hashes, the deepest hit wins) and
the resident copies are :mod:`alaya_jax.store.memory_tier`. A lookup always re-scans
the on-disk catalogue first, so a snapshot deleted or changed on disk (by any process)
is never served from memory. The tier belongs to the instance, i.e. to one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Any, Optional, Sequence

import jax
import numpy as np

from alaya_jax.errors import ConfigError, StorageError
from alaya_jax.store import placement as placements
from alaya_jax.store.kv_store import KVStore
from alaya_jax.store.memory_tier import MEMORY_KINDS, MemoryTier, MemoryTierStats, materialize
from alaya_jax.store.prefix_index import PrefixIndex, block_hashes, prefix_seed
from checkpoints.snapshot import (
    CorruptSnapshotError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotMeta,
    SnapshotNotFoundError,
    check_caches,
    check_compatible,
    dtype_name,
    load_snapshot,
    load_tokens,
    read_meta,
    save_snapshot,
    write_meta,
)
from checkpoints.storage import Leftover, leftovers, storage_error, tree_bytes

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
_TRASH = ".trash-"
__all__ = ["ContextDB", "MEMORY_KINDS", "MemoryTierStats", "Session", "StoreResult"]


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """What a save did. ``already_stored``: the context was in the DB before this call (or
    was written by a concurrent save meanwhile) and nothing was written. ``name`` /
    ``aliases``: the entry's names after the call; ``name_applied``: what became of the
    name given — None (none given), "name" (it is the entry's name now), "alias" (the
    entry had another name: added as an alias) or "present" (the entry had it already)."""

    snapshot_id: str
    already_stored: bool
    name: Optional[str] = None
    aliases: tuple = ()
    name_applied: Optional[str] = None


@dataclasses.dataclass
class Session:
    """A context being built: ``caches`` hold the KV of exactly ``tokens``.

    ``reused_tokens``: how many of ``tokens`` came from snapshot ``snapshot_id``
    (0 / None when nothing was reused). ``skipped``: snapshots that matched but were
    refused while looking up (corrupt, vanished, ...), as ``(id, reason)``.
    ``source``: where the reused caches came from, ``"memory:device"``,
    ``"memory:pinned_host"`` (the DB's memory tier) or ``"disk"`` (None when nothing
    was reused); ``restore_s``: wall seconds to fetch them and build ``caches``
    (ready on the device), 0.0 when nothing was reused. The caches are always new
    buffers (never shared with the memory tier), so the engine may donate them.
    The engine extends ``tokens`` and ``caches`` together as it prefills and decodes."""

    tokens: list[int]
    caches: Optional[tuple[KVStore, ...]]
    snapshot_id: Optional[str] = None
    reused_tokens: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    source: Optional[str] = None
    restore_s: float = 0.0


@dataclasses.dataclass
class _Entry:
    stat_key: tuple
    meta: Optional[SnapshotMeta] = None
    error: Optional[SnapshotError] = None  # why this DB cannot use it (None: usable)
    hashes: Optional[list[bytes]] = None  # chained hash of each full block

    @property
    def problem(self) -> Optional[str]:
        return None if self.error is None else str(self.error)


def with_name(meta: SnapshotMeta, name: str) -> tuple[SnapshotMeta, str]:
    """``meta`` with ``name`` added: ``(meta, "name")`` when it had no name, ``(meta with the
    alias, "alias")`` when it had another one, ``(meta, "present")`` when it has it already."""
    if name == meta.name or name in meta.aliases:
        return meta, "present"
    if meta.name is None:
        return dataclasses.replace(meta, name=name), "name"
    return dataclasses.replace(meta, aliases=tuple(meta.aliases) + (name,)), "alias"


class ContextDB:
    """Snapshots of prefilled contexts for one model / tokenizer / dtype / block size.

    Snapshots of other models in the same directory are kept and listed as
    problems (``problems()``), never loaded. ``sharding``: where loaded stores go
    (default: the first device). ``verify``: re-hash files on every load (about a
    second per GB; turn off only where the storage is trusted).

    ``ContextDB(path)`` with no model arguments opens the catalogue only (for
    listing, showing and deleting without loading a model): every readable snapshot
    is listed, and lookups, loads and saves raise ``SnapshotError``.

    ``memory_budget_bytes`` > 0 turns on the memory tier (0: off): every snapshot this
    instance stores (``store``, ``import_``) or loads from disk is kept resident,
    trimmed to its valid blocks (about ``num_tokens * num_layers * 2 * num_kv_heads *
    head_dim * itemsize`` bytes plus the f32 block summaries), in ``memory_kind``
    memory of the devices of ``sharding``: ``"device"`` (accelerator memory; serving
    costs one on-device copy) or ``"pinned_host"`` (page-locked host RAM; serving
    costs a host-to-device transfer). Least-recently used snapshots are evicted until
    the resident bytes fit the budget; a snapshot larger than the whole budget is not
    kept. ``create_session`` and ``load`` serve a resident snapshot without reading
    disk, but only after the catalogue re-scan they always do finds it unchanged on
    disk; ``delete``, a snapshot found unusable, or one removed / rewritten by another
    process evicts it. The tier is per instance (per process): a CLI call, one process
    each, gains nothing from it. A ``memory_kind`` the devices do not offer raises
    ``ValueError`` here (no fallback to another kind).

    Opening a DB removes what killed saves and deletes left (``cleaned``); ``stale_tmp_s``:
    the age after which a temporary directory without its writer's lock file (left by an
    older alaya-jax) is removed too. A write the storage refuses raises
    ``alaya_jax.errors.StorageError`` naming the cause and this DB's path.

    ``kv_placement``: where sessions' and loads' values (and keys) live
    (:mod:`alaya_jax.store.placement`: "device", "values-on-host", "keys-and-values-on-host").
    Served from a pinned-host tier with values on the host, a session moves only the codes, scales,
    error norms and lengths (and the keys when they stay on the GPU) to the device: lazy restore."""

    persistent = True  # its snapshots are files (see memory_db.MemoryContextDB for one that is not)

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model_fingerprint: Optional[str] = None,
        tokenizer_fingerprint: Optional[str] = None,
        dtype: Any = None,
        block_size: Optional[int] = None,
        sharding=None,
        verify: bool = True,
        stale_tmp_s: float = 6 * 3600,
        memory_budget_bytes: int = 0,
        memory_kind: str = "device",
        kv_placement: str = placements.DEFAULT_PLACEMENT,
    ):
        self.path = os.path.abspath(os.fspath(path))
        given = [x is not None for x in (model_fingerprint, tokenizer_fingerprint, dtype, block_size)]
        if any(given) and not all(given):
            raise ValueError("give all of model_fingerprint, tokenizer_fingerprint, dtype and block_size, or none "
                             "(catalogue only)")
        self.catalog_only = not any(given)
        self.model_fingerprint = None if self.catalog_only else str(model_fingerprint)
        self.tokenizer_fingerprint = None if self.catalog_only else str(tokenizer_fingerprint)
        self.dtype = None if self.catalog_only else dtype_name(dtype)
        self.block_size = None if self.catalog_only else int(block_size)
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.sharding = sharding
        self.verify = verify
        if memory_kind not in MEMORY_KINDS:
            raise ConfigError(f"memory_kind must be one of {MEMORY_KINDS}, got {memory_kind!r}")
        if int(memory_budget_bytes) < 0:
            raise ConfigError(f"memory_budget_bytes must be >= 0 (0: no memory tier), got {memory_budget_bytes}")
        self.memory_kind = memory_kind
        self.kv_placement = placements.check_placement(kv_placement)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._lock = threading.RLock()
        self._tier: Optional[MemoryTier] = None
        if self.memory_budget_bytes:
            if self.catalog_only:
                raise ValueError("the memory tier (memory_budget_bytes > 0) needs a ContextDB opened with a "
                                 "model's fingerprints, dtype and block size")
            self._tier = MemoryTier(budget_bytes=self.memory_budget_bytes, memory_kind=memory_kind,
                                    device_sharding=self._device_sharding(), lock=self._lock)
        self._dir = os.path.join(self.path, SNAPSHOTS)
        try:
            os.makedirs(self._dir, exist_ok=True)
        except OSError as e:
            raise (storage_error(e, "cannot open the context DB", self.path) or e) from None
        self._seed = prefix_seed(self.model_fingerprint, self.tokenizer_fingerprint, self.dtype, self.block_size)
        self._entries: dict[str, _Entry] = {}
        self._index = PrefixIndex()
        #: the leftovers of killed saves and deletes that opening this DB removed
        self.cleaned: list[Leftover] = self.cleanup(older_than_s=stale_tmp_s)
        self.refresh()

    # ------------------------------------------------------------------ catalogue

    def _need_model(self, what: str) -> None:
        if self.catalog_only:
            raise SnapshotError(f"{what} needs a ContextDB opened with a model's fingerprints, dtype and block size")

    def snapshot_id(self, tokens: Sequence[int]) -> str:
        """The id a snapshot of ``tokens`` gets in this DB."""
        self._need_model("snapshot_id")
        h = hashlib.sha256(self._seed)
        h.update(np.asarray(tokens, dtype=np.int64).astype("<i4").tobytes())
        return h.hexdigest()[:16]

    def _snap_path(self, sid: str) -> str:
        return os.path.join(self._dir, sid)

    def refresh(self) -> None:
        """Re-scan ``snapshots/``: index new snapshots, forget removed ones."""
        with self._lock:
            try:
                names = [n for n in os.listdir(self._dir) if not n.startswith(".")]
            except FileNotFoundError:
                os.makedirs(self._dir, exist_ok=True)
                names = []
            seen = set()
            changed = False
            for sid in names:
                p = self._snap_path(sid)
                try:
                    st = os.stat(os.path.join(p, "meta.json"))
                    key = (st.st_ino, st.st_mtime_ns, st.st_size)
                except FileNotFoundError:
                    if not os.path.isdir(p):
                        continue
                    key = ("no-meta",)
                except OSError as e:
                    key = ("error", str(e))
                seen.add(sid)
                old = self._entries.get(sid)
                if old is not None and old.stat_key == key:
                    continue
                self._entries[sid] = self._read_entry(sid, key)
                changed = True
            for sid in list(self._entries):
                if sid not in seen:
                    del self._entries[sid]
                    changed = True
            if changed:
                self._rebuild_index()
                self._prune_resident()

    def _read_entry(self, sid: str, key: tuple) -> _Entry:
        p = self._snap_path(sid)
        try:
            meta = read_meta(p)
        except SnapshotError as e:
            return _Entry(key, None, e)
        meta = dataclasses.replace(meta, snapshot_id=sid)
        try:
            check_compatible(
                meta, expect_model=self.model_fingerprint, expect_tokenizer=self.tokenizer_fingerprint,
                expect_dtype=self.dtype, expect_block_size=self.block_size, where=f"snapshot {sid}",
            )
            toks = load_tokens(p, meta, verify=True)  # cheap (4 bytes a token); the arrays are checked on load
        except SnapshotError as e:
            return _Entry(key, meta, e)
        if self.catalog_only:
            return _Entry(key, meta, None, None)
        return _Entry(key, meta, None, block_hashes(self._seed, toks, self.block_size))

    def _rebuild_index(self) -> None:
        self._index.rebuild({sid: e.hashes for sid, e in self._entries.items() if e.problem is None and e.hashes})

    def _mark_bad(self, sid: str, err: SnapshotError) -> None:
        with self._lock:
            self._evict(sid)
            e = self._entries.get(sid)
            if e is not None:
                e.error = err
                self._rebuild_index()

    def list(self, *, include_incompatible: bool = False) -> list[SnapshotMeta]:
        """Metadata of the usable snapshots, oldest first (``include_incompatible``:
        also those of other models / tokenizers / dtypes / block sizes and those found
        corrupt, when their meta.json is readable). See ``problems()`` for why."""
        self.refresh()
        with self._lock:
            out = [e.meta for e in self._entries.values()
                   if e.meta is not None and (include_incompatible or e.problem is None)]
        return sorted(out, key=lambda m: (m.created, m.snapshot_id))

    def problems(self) -> dict[str, str]:
        """``{id: reason}`` for every snapshot directory this DB will not load."""
        self.refresh()
        with self._lock:
            return {sid: e.problem for sid, e in sorted(self._entries.items()) if e.problem is not None}

    def resolve(self, ref: str) -> str:
        """An id from a full id, a unique id prefix or a unique name (or alias)."""
        self.refresh()
        with self._lock:
            if ref in self._entries:
                return ref
            hits = [sid for sid in self._entries if sid.startswith(ref)] if ref else []
            if not hits:
                hits = [sid for sid, e in self._entries.items()
                        if e.meta is not None and (e.meta.name == ref or ref in e.meta.aliases)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise SnapshotNotFoundError(f"no snapshot {ref!r} in {self.path}")
        raise SnapshotNotFoundError(f"{ref!r} is ambiguous in {self.path}: {sorted(hits)}")

    def show(self, ref: str, *, verify: bool = False) -> SnapshotMeta:
        """Metadata of one snapshot (by id, id prefix or name). Raises the snapshot's
        error if it is unusable; ``verify`` also re-hashes its files."""
        sid = self.resolve(ref)
        with self._lock:
            e = self._entries[sid]
        if e.problem is not None:
            raise e.error
        if verify:
            from checkpoints.snapshot import verify_checksums

            try:
                verify_checksums(self._snap_path(sid), e.meta)
            except SnapshotError as err:
                self._mark_bad(sid, err)
                raise
        return e.meta

    def load(self, ref: str, *, capacity: Optional[int] = None):
        """``(caches, tokens, meta)`` of one snapshot, padded to ``capacity`` positions
        (default: its valid blocks). From the memory tier when resident (new buffers
        either way)."""
        sid = self.resolve(ref)
        with self._lock:
            e = self._entries[sid]
        if e.problem is not None:
            raise e.error
        if capacity is not None and capacity < e.meta.num_tokens:
            raise SnapshotError(f"capacity {capacity} is smaller than the snapshot's {e.meta.num_tokens} tokens")
        caches, toks, meta, _, shared = self._fetch(sid)
        n = meta.num_tokens
        return self._materialize(caches, n, n, n if capacity is None else capacity, shared=shared), toks, meta

    def _load(self, sid: str):
        """The snapshot read from disk: ``(caches trimmed to the valid blocks, tokens, meta)``."""
        self._need_model("loading a snapshot")
        try:
            caches, toks, meta = load_snapshot(
                self._snap_path(sid), expect_model=self.model_fingerprint,
                expect_tokenizer=self.tokenizer_fingerprint, expect_dtype=self.dtype,
                expect_block_size=self.block_size, capacity=None, sharding=self.sharding,
                verify=self.verify,
            )
        except SnapshotError as err:
            if os.path.isdir(self._snap_path(sid)):
                self._mark_bad(sid, err)
            else:
                err = SnapshotNotFoundError(f"snapshot {sid} was deleted while loading")
            raise err from None
        return caches, toks, dataclasses.replace(meta, snapshot_id=sid)

    # ------------------------------------------------------------------ memory tier

    def _device_sharding(self):
        """Where sessions' caches go: ``sharding`` (default: the first device), device memory."""
        base = self.sharding if self.sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return base.with_memory_kind("device")

    def describe(self) -> dict:
        """What ``alaya serve``'s ``/health`` says about this DB."""
        st = self.memory_stats()
        # no path: /health answers without an API key
        return {"kind": "disk", "persistent": True, "memory_kind": st.memory_kind,
                "used_bytes": st.used_bytes, "budget_bytes": st.budget_bytes}

    @property
    def memory_tier(self) -> Optional[MemoryTier]:
        """The memory tier (None when ``memory_budget_bytes`` is 0)."""
        return self._tier

    def memory_stats(self) -> MemoryTierStats:
        """What the memory tier holds now."""
        if self._tier is None:
            return MemoryTierStats(self.memory_kind, self.memory_budget_bytes, 0, ())
        return self._tier.stats()

    def _fetch(self, sid: str):
        """``(trimmed caches, tokens, meta, source, shared)`` of a usable snapshot: the
        resident copy or, on a miss, a disk load, which is then kept resident.
        ``shared``: the caches are (or were) the resident copy, so that what is handed
        out must not share their buffers (see ``memory_tier.materialize``)."""
        r = None if self._tier is None else self._tier.get(sid)
        if r is not None:
            return r.caches, r.tokens, r.meta, self._tier.source, True
        caches, toks, meta = self._load(sid)
        kept = self._keep(sid, caches, toks, meta, owned=True)
        if kept is None:
            return caches, toks, meta, "disk", False
        return kept.caches, toks, meta, "disk", True

    def _materialize(self, caches, length: int, n: int, capacity: int, *, shared: bool) -> tuple[KVStore, ...]:
        """Session caches on this DB's devices (see ``memory_tier.materialize``)."""
        return materialize(caches, length, n, capacity, device_sharding=self._device_sharding(), shared=shared,
                           placement=self.kv_placement)

    def _keep(self, sid: str, caches, tokens: list[int], meta: SnapshotMeta, *, owned: bool):
        """Keep snapshot ``sid`` resident (tier on, its catalogue entry usable, and it fits the
        budget); see ``MemoryTier.keep``."""
        if self._tier is None:
            return None
        with self._lock:
            e = self._entries.get(sid)
            if e is None or e.problem is not None:  # deleted or refused meanwhile
                return None
            return self._tier.keep(sid, caches, tokens, meta, stat_key=e.stat_key, owned=owned)

    def _evict(self, sid: str) -> None:
        if self._tier is not None:
            self._tier.evict(sid)

    def _prune_resident(self) -> None:
        """Evict residents whose snapshot is gone, unusable or changed on disk."""
        if self._tier is None:
            return
        with self._lock:
            def usable(sid, stat_key):
                e = self._entries.get(sid)
                return e is not None and e.problem is None and e.stat_key == stat_key

            self._tier.prune(usable)

    # ------------------------------------------------------------------ lookup

    def longest_prefix(self, tokens: Sequence[int], *, max_tokens: Optional[int] = None) -> tuple[Optional[str], int]:
        """``(id, n)``: a usable snapshot sharing the longest block-aligned prefix with
        ``tokens`` (``n`` tokens, at most ``max_tokens``), or ``(None, 0)``."""
        self._need_model("prefix lookup")
        self.refresh()
        tokens = np.asarray(tokens, dtype=np.int64)  # once: block_hashes takes it as it is
        limit = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
        hashes = block_hashes(self._seed, tokens, self.block_size, max_blocks=limit // self.block_size)
        with self._lock:
            # Prefer the shortest snapshot: fewest bytes to read.
            sid, blocks = self._index.deepest(hashes, prefer=lambda s: (self._entries[s].meta.num_tokens, s))
        return sid, blocks * self.block_size

    def create_session(self, tokens: Sequence[int], *, capacity: int,
                       strict: bool = False) -> tuple[Session, list[int]]:
        """Start a session for the prompt ``tokens``: ``(session, tokens still to prefill)``.

        Reuses the longest stored block-aligned prefix but never the whole prompt (at
        least one token stays to prefill so that the caller gets logits). The caches
        are padded to ``capacity`` positions (rounded up to blocks). A matching snapshot
        that fails to load is recorded in ``session.skipped`` and the next best match is
        tried (``strict=True``: raise its error instead)."""
        ids = np.asarray(tokens, dtype=np.int64)  # one conversion, reused by every lookup below
        if ids.ndim != 1:
            raise TypeError(f"tokens must be a flat sequence of token ids, got shape {ids.shape}")
        tokens = ids.tolist()
        if not tokens:
            raise ValueError("create_session needs at least one token")
        if capacity < len(tokens):
            raise ValueError(f"capacity {capacity} is smaller than the {len(tokens)}-token prompt")
        skipped = []
        while True:
            sid, n = self.longest_prefix(ids, max_tokens=len(tokens) - 1)
            if sid is None:
                return Session(tokens=[], caches=None, skipped=skipped), tokens
            t0 = time.perf_counter()
            try:
                caches, stoks, meta, source, shared = self._fetch(sid)
                if stoks[:n] != tokens[:n]:  # a hash collision or a changed file
                    raise CorruptSnapshotError(f"snapshot {sid}: token ids differ from its index")
            except SnapshotError as err:
                if strict:
                    raise
                log.warning("context DB: skipping snapshot %s: %s", sid, err)
                skipped.append((sid, str(err)))
                self._mark_bad(sid, err)
                continue
            caches = self._materialize(caches, meta.num_tokens, n, capacity, shared=shared)
            return Session(tokens=tokens[:n], caches=caches, snapshot_id=sid, reused_tokens=n, skipped=skipped,
                           source=source, restore_s=time.perf_counter() - t0), tokens[n:]

    # ------------------------------------------------------------------ writes

    def import_(self, tokens: Sequence[int], kv: Sequence[KVStore], *, name: Optional[str] = None) -> str:
        """``save(...).snapshot_id``."""
        return self.save(tokens, kv, name=name).snapshot_id

    def save(self, tokens: Sequence[int], kv: Sequence[KVStore], *, name: Optional[str] = None) -> StoreResult:
        """Store a prefilled context (``kv``: one B=1 store per layer holding exactly
        ``tokens``, any capacity). A token sequence already stored (found now, or written
        by a concurrent save while this one wrote) is not written again: the result says
        ``already_stored`` and ``name`` is added to the entry (see ``StoreResult``). With
        the memory tier on, a copy of ``kv`` (trimmed to the valid blocks; ``kv`` itself
        stays the caller's) is kept resident either way. A write the storage refuses raises
        ``StorageError`` (nothing half-written is left)."""
        tokens, kv = self._check_import(tokens, kv)
        done = self.stored(tokens, name=name, kv=kv)
        if done is not None:
            return done
        sid = self.snapshot_id(tokens)
        path = self._snap_path(sid)
        if os.path.isdir(path):
            self.refresh()
            with self._lock:
                e = self._entries.get(sid)
            if e is None or e.problem is None:  # a good one appeared meanwhile (a concurrent save)
                done = self.stored(tokens, name=name, kv=kv)
                if done is not None:
                    return done
            else:  # a broken copy under this id: move it aside and write a good one
                log.warning("context DB: replacing unusable snapshot %s (%s)", sid, e.problem)
                self._remove(sid)
        try:
            meta = save_snapshot(path, kv, tokens, model_fingerprint=self.model_fingerprint,
                                 tokenizer_fingerprint=self.tokenizer_fingerprint, name=name, snapshot_id=sid)
        except SnapshotExistsError:  # a concurrent save wrote it meanwhile
            done = self.stored(tokens, name=name, kv=kv)
            if done is None:
                raise
            return done
        except StorageError as e:
            raise StorageError("cannot store the context in the context DB", self.path, e.cause, errno=e.errno,
                               no_space=e.no_space) from None
        self.refresh()
        self._keep(sid, kv, tokens, dataclasses.replace(meta, snapshot_id=sid), owned=False)
        return StoreResult(sid, False, name, (), None if name is None else "name")

    def stored(self, tokens: Sequence[int], *, name: Optional[str] = None, kv=None) -> Optional[StoreResult]:
        """The entry of ``tokens`` when it is stored and usable, with ``name`` added to it
        (see ``StoreResult``); None when it is not stored. ``kv``: the caller's caches of
        ``tokens``, kept resident when the memory tier is on."""
        sid = self.snapshot_id(tokens)
        if self.persistent and not os.path.isdir(self._snap_path(sid)):
            return None
        self.refresh()
        with self._lock:
            e = self._entries.get(sid)
        if e is None or e.problem is not None:
            return None
        meta, applied = e.meta, None
        if name is not None:
            meta, applied = self._add_name(sid, name)
        if kv is not None:
            with self._lock:
                e = self._entries.get(sid)
            if e is not None and e.problem is None:
                self._keep(sid, kv, [int(t) for t in tokens], e.meta, owned=False)
        return StoreResult(sid, True, meta.name, tuple(meta.aliases), applied)

    def _add_name(self, sid: str, name: str) -> tuple[SnapshotMeta, str]:
        """Give snapshot ``sid`` the name ``name`` (its name when it has none, else an alias):
        ``(its meta now, "name" | "alias" | "present")``. Serialised across processes by a
        ``flock`` on the snapshot's directory; meta.json is rewritten atomically."""
        import fcntl

        p = self._snap_path(sid)
        try:
            fd = os.open(p, os.O_RDONLY)  # flock on the snapshot's directory itself
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                meta, applied = with_name(read_meta(p), name)
                if applied != "present":
                    write_meta(p, meta)
            finally:
                os.close(fd)
        except OSError as e:
            raise (storage_error(e, "cannot name the context in the context DB", self.path) or e) from None
        self.refresh()
        return dataclasses.replace(meta, snapshot_id=sid), applied

    def _check_import(self, tokens: Sequence[int], kv: Sequence[KVStore]) -> tuple[list[int], tuple[KVStore, ...]]:
        """``(tokens as ints, kv as a tuple)`` after checking that ``kv`` holds exactly ``tokens`` in
        this DB's dtype and block size (``SnapshotError`` naming what differs)."""
        tokens = [int(t) for t in tokens]
        kv = tuple(kv)
        check_caches(kv, len(tokens))
        if kv:
            got = dtype_name(kv[0].dtype)
            if got != self.dtype:
                raise SnapshotError(f"caches have dtype {got}, this DB holds {self.dtype}")
            if kv[0].block_size != self.block_size:
                raise SnapshotError(f"caches have block size {kv[0].block_size}, this DB uses {self.block_size}")
        return tokens, kv

    def store(self, session: Session, *, name: Optional[str] = None) -> str:
        """Store a session's context (its ``caches`` must hold exactly ``tokens``);
        sets and returns ``session.snapshot_id``."""
        if session.caches is None or not session.tokens:
            raise SnapshotError("the session holds no context to store")
        sid = self.import_(session.tokens, session.caches, name=name)
        session.snapshot_id = sid
        return sid

    def delete(self, ref: str) -> str:
        """Delete a snapshot (by id, id prefix or name); returns its id. Atomic: the
        directory is renamed away first, then removed."""
        sid = self.resolve(ref)
        self._remove(sid)
        self.refresh()
        return sid

    def _remove(self, sid: str) -> None:
        self._evict(sid)
        trash = os.path.join(self._dir, f"{_TRASH}{sid}-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self._snap_path(sid), trash)
        except FileNotFoundError:
            raise SnapshotNotFoundError(f"no snapshot {sid!r} in {self.path}") from None
        except OSError as e:
            raise (storage_error(e, f"cannot delete snapshot {sid} of the context DB", self.path) or e) from None
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self, *, older_than_s: float = 6 * 3600) -> list[Leftover]:
        """Remove what killed saves and deletes left: every ``.trash-*`` directory, every
        ``.tmp-*`` directory whose writer is gone (its lock is free), and unmarked ones (no
        lock file: an older alaya-jax's) older than ``older_than_s``. A save in progress is
        never touched. Returns what was removed (names and bytes); see ``leftovers`` for
        what is left."""
        removed, _ = leftovers(self._dir, remove_unmarked_after_s=older_than_s)
        try:
            names = os.listdir(self._dir)
        except OSError:
            return removed
        for n in names:
            if n.startswith(_TRASH):
                p = os.path.join(self._dir, n)
                size = tree_bytes(p)
                shutil.rmtree(p, ignore_errors=True)
                if not os.path.exists(p):
                    removed.append(Leftover(n, size, "trash", 0.0))
        return removed

    def leftovers(self) -> list[Leftover]:
        """Temporary directories still here: saves in progress (``state`` "in_progress") and
        unmarked ones not old enough to remove ("unmarked"); nothing is removed."""
        return leftovers(self._dir, remove=False)[1]
