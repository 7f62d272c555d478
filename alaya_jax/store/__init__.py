"""The KV store and the context DB (docs/design.md §3, §5).

- ``kv_store``: :class:`~alaya_jax.store.kv_store.KVStore`, one layer's blocked keys, values
  and 4-bit key codes for a ragged batch, and every change to it: build, append, and the
  shape operations (resize, fit to N blocks, truncate, take and place rows). Nothing
  outside this module reads the store's field lists or pads its axes.
- ``sharding``: a store's blocks sharded along the sequence over a 1-D ``"seq"`` mesh (layout, the
  sharded append, a shard's frame: docs/design.md §10).
- ``context_db``: :class:`~alaya_jax.store.context_db.ContextDB`, a directory of Orbax
  snapshots (``checkpoints.snapshot``) with its catalogue; ``prefix_index``: the chained
  block hashes that find the longest stored prefix of a prompt; ``memory_tier``: the
  resident copies of snapshots in device or pinned host memory.
- ``db_for_model``: the context DB of a loaded model (model and tokenizer fingerprints).
- ``placement``: where a store's exact values (and keys) live: device memory or pinned host
  memory, and the explicit transfers between the two.

May import: ``pallas_kernels.key_codes``, ``checkpoints`` (snapshots), ``alaya_jax.errors``;
never ``attention``, ``runtime``, ``server`` or ``cli``. The public functional store API
(``new_store`` / ``append`` / ``attend``) is ``alaya_jax.attention.store_api``, since attending
needs the methods.
"""
