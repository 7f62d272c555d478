"""checkpoints: Orbax snapshots of prefilled contexts (save, load, verify).

Knows the KV store (``alaya_jax.kv_store``), not the model code.
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
    check_compatible,
    dtype_name,
    fingerprint,
    load_snapshot,
    load_tokens,
    read_meta,
    resize_store,
    save_snapshot,
    truncate_store,
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
    "check_compatible",
    "dtype_name",
    "fingerprint",
    "load_snapshot",
    "load_tokens",
    "read_meta",
    "resize_store",
    "save_snapshot",
    "truncate_store",
    "verify_checksums",
]
