"""Where each program of the filter-refine kernels looks (plain jnp on scalars or arrays, so the
kernels, the references and the tests share one definition).

Forced positions (always attended, scored exactly): p < sink and length - window <= p < length.
Searched positions (scanned by their codes): sink <= p < length - window. ``sink``, ``window`` and
``length`` may be arrays (a row's own forced counts: a shard of a sequence-sharded store has its own,
``alaya_jax.store.sharding.shard_frame``). Split j of a sequence
covers the tiles [start_j, end_j) of the tile-aligned cover of its searched range, balanced by
that sequence's own length: with n tiles from t0 = sink // tile, start_j = t0 + j·n // NS.
"""

from __future__ import annotations

import jax.numpy as jnp


def searched_end(length, *, sink: int, window: int):
    """End (exclusive) of the searched range [sink, end); end <= sink means empty."""
    return jnp.maximum(length - window, sink)


def split_tiles(length, split, *, sink: int, window: int, tile: int, num_splits: int):
    """(first tile, end tile) of split ``split`` (tiles of ``tile`` positions, absolute)."""
    hi = searched_end(length, sink=sink, window=window)
    t0 = sink // tile
    n = jnp.where(hi > sink, (hi + tile - 1) // tile - t0, 0)
    return t0 + (split * n) // num_splits, t0 + ((split + 1) * n) // num_splits


def split_of_position(pos, length, *, sink: int, window: int, tile: int, num_splits: int):
    """Split id (int32) of each searched position; pos and length broadcastable."""
    hi = searched_end(length, sink=sink, window=window)
    t0 = sink // tile
    n = jnp.where(hi > sink, (hi + tile - 1) // tile - t0, 0)
    r = pos // tile - t0  # tile rank within the cover
    # the last j with j·n // NS <= r: j = floor(((r + 1)·NS - 1) / n) (n > 0), clipped
    j = ((r + 1) * num_splits - 1) // jnp.maximum(n, 1)
    return jnp.clip(j, 0, num_splits - 1).astype(jnp.int32)


def forced_positions(length, *, sink: int, window: int, size: int):
    """(pos int32 [..., size], ok bool [..., size]) of the forced positions, padded to ``size``.

    Entry j < sink is position j; entry sink <= j < sink + window is length - window + (j - sink);
    ``ok`` marks the real ones (each forced position once: a window position below ``sink``
    is the sink's). pos is clamped to >= 0 so it can index an array.
    """
    if isinstance(sink, int) and isinstance(window, int) and size < sink + window:
        raise ValueError(f"forced_positions: size {size} < sink + window = {sink + window}")
    length = jnp.asarray(length, jnp.int32)
    j = jnp.arange(size, dtype=jnp.int32)
    if length.ndim:
        length = length[..., None]
        sink, window = (x[..., None] if jnp.ndim(x) else x for x in (sink, window))
    p = jnp.where(j < sink, j, length - window + (j - sink))
    ok = jnp.where(j < sink, p < length, (j < sink + window) & (p >= sink) & (p < length))
    return jnp.maximum(p, 0), ok


def longest_split(capacity: int, num_splits: int, *, tile: int) -> int:
    """The most positions one split can cover in a store of ``capacity`` positions (its list cannot
    overflow at this size): the tile cover of [sink, end) has at most ceil(capacity / tile) tiles."""
    tiles = -(-int(capacity) // int(tile))
    return min(int(capacity), -(-tiles // int(num_splits)) * int(tile))
