"""checkpoints: Orbax snapshots of prefilled contexts (save, load, verify).

Knows the KV store (``alaya_jax.store.kv_store``: its array layout and shape changes) and
``alaya_jax.errors``, not the model code (docs/design.md §5).
"""

from checkpoints.snapshot import (
    FORMAT_VERSION,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotMeta,
    SnapshotNotFoundError,
    abstract_tree,
    check_caches,
    check_compatible,
    dtype_name,
    fingerprint,
    load_snapshot,
    load_tokens,
    read_meta,
    save_snapshot,
    verify_checksums,
)

__all__ = [
    "FORMAT_VERSION",
    "CorruptSnapshotError",
    "IncompatibleSnapshotError",
    "SnapshotError",
    "SnapshotExistsError",
    "SnapshotMeta",
    "SnapshotNotFoundError",
    "abstract_tree",
    "check_caches",
    "check_compatible",
    "dtype_name",
    "fingerprint",
    "load_snapshot",
    "load_tokens",
    "read_meta",
    "save_snapshot",
    "verify_checksums",
]
