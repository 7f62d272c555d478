"""The blocked KV store: an immutable pytree of keys, values and block summaries.

One ``KVStore`` holds one layer's cache for a ragged batch. Keys and values are
laid out in blocks so that a query can read a few blocks instead of the whole
context::

    keys, values : [B, Hkv, NB, Bk, D]   (model dtype; contents past a length are
                                          undefined and may be anything, NaN too)
    kmin, kmax   : [B, Hkv, NB, D] f32   element-wise min / max of the *valid*
                                          keys of each block (0 for empty blocks)
    lengths      : [B] int32             valid positions per sequence
    dipr_beta    : [B, Hq] f32 or None   this layer's DIPR β per query head, chosen by
                                          calibration at the end of prefill
                                          (:mod:`alaya_jax.calibration`); None = not calibrated

``capacity = NB * Bk`` is static. Every update returns a new store; nothing is
mutated in place.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class KVStore:
    keys: jax.Array  # [B, Hkv, NB, Bk, D]
    values: jax.Array  # [B, Hkv, NB, Bk, D]
    kmin: jax.Array  # [B, Hkv, NB, D] f32
    kmax: jax.Array  # [B, Hkv, NB, D] f32
    lengths: jax.Array  # [B] int32
    dipr_beta: Optional[jax.Array] = None  # [B, Hq] f32: calibrated β per query head (None: not calibrated)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[2]

    @property
    def block_size(self) -> int:
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def dtype(self):
        return self.keys.dtype

    def dense_keys(self) -> jax.Array:
        """Keys as ``[B, Hkv, S=capacity, D]`` (a free reshape)."""
        b, h, nb, bk, d = self.keys.shape
        return self.keys.reshape(b, h, nb * bk, d)

    def dense_values(self) -> jax.Array:
        """Values as ``[B, Hkv, S=capacity, D]`` (a free reshape)."""
        b, h, nb, bk, d = self.values.shape
        return self.values.reshape(b, h, nb * bk, d)


def _num_blocks_for(capacity: int, block_size: int) -> int:
    return -(-capacity // block_size)


def empty(
    *,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    capacity: int,
    block_size: int = 64,
    dtype=jnp.float32,
) -> KVStore:
    """An empty store able to hold ``capacity`` positions (rounded up to whole blocks)."""
    if block_size <= 0 or capacity <= 0:
        raise ValueError(f"block_size and capacity must be positive, got {block_size=}, {capacity=}")
    nb = _num_blocks_for(capacity, block_size)
    shape = (batch, num_kv_heads, nb, block_size, head_dim)
    return KVStore(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        kmin=jnp.zeros((batch, num_kv_heads, nb, head_dim), jnp.float32),
        kmax=jnp.zeros((batch, num_kv_heads, nb, head_dim), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def block_summaries(keys: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Element-wise min/max of the valid keys of every block.

    keys: [B, Hkv, NB, Bk, D]; lengths: [B]. Returns (kmin, kmax), each
    [B, Hkv, NB, D] f32; blocks without a valid key get 0 (queries never read
    them: their start is >= the length).
    """
    _, _, nb, bk, _ = keys.shape
    pos = jnp.arange(nb * bk, dtype=jnp.int32).reshape(nb, bk)
    valid = pos[None] < lengths[:, None, None]  # [B, NB, Bk]
    valid = valid[:, None, :, :, None]  # [B, 1, NB, Bk, 1]
    k32 = keys.astype(jnp.float32)
    kmin = jnp.min(jnp.where(valid, k32, jnp.inf), axis=3)
    kmax = jnp.max(jnp.where(valid, k32, -jnp.inf), axis=3)
    nonempty = jnp.any(valid, axis=3)
    return jnp.where(nonempty, kmin, 0.0), jnp.where(nonempty, kmax, 0.0)


def round_outward(kmin: jax.Array, kmax: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Summaries in ``dtype`` rounded outward: kmin down, kmax up (never inside the f32 box).

    The min/max bound stays a bound: q_d·kmax_d' ≥ q_d·k_d for q_d ≥ 0 because kmax' ≥ kmax,
    and likewise for kmin' ≤ kmin with q_d < 0. Exact (no rounding at all) when the keys are
    already in ``dtype`` (min/max of ``dtype`` values are ``dtype`` values).
    """
    dtype = jnp.dtype(dtype)
    lo, hi = kmin.astype(jnp.float32), kmax.astype(jnp.float32)
    rlo, rhi = lo.astype(dtype), hi.astype(dtype)
    rlo = jnp.where(rlo.astype(jnp.float32) > lo, jnp.nextafter(rlo, jnp.asarray(-jnp.inf, dtype)), rlo)
    rhi = jnp.where(rhi.astype(jnp.float32) < hi, jnp.nextafter(rhi, jnp.asarray(jnp.inf, dtype)), rhi)
    return rlo, rhi


def with_summary_dtype(store: "KVStore", dtype) -> "KVStore":
    """The same store with ``kmin``/``kmax`` held in ``dtype`` (e.g. bf16: half the bytes that the
    bounds pass reads), rounded outward so that every bound stays ≥ every score. For a
    read-only context (decode over a fixed cache); :func:`append` on such a store keeps its
    summary dtype and is exact when the keys are in that dtype too."""
    lo, hi = round_outward(store.kmin, store.kmax, dtype)
    return store.replace(kmin=lo, kmax=hi)


def _check_kv(name_k: str, k: jax.Array, name_v: str, v: jax.Array, *, ndim: int = 4) -> None:
    if k.ndim != ndim or v.shape != k.shape:
        raise ValueError(
            f"{name_k} and {name_v} must both be [B, S, Hkv, D] with equal shapes; got "
            f"{name_k}{tuple(k.shape)} and {name_v}{tuple(v.shape)}"
        )


def from_dense(
    k: jax.Array,
    v: jax.Array,
    lengths: Optional[jax.Array] = None,
    *,
    block_size: int = 64,
    capacity: Optional[int] = None,
) -> KVStore:
    """Build a store from dense keys/values.

    k, v: [B, S, Hkv, D]; lengths: [B] (default: all S). ``capacity`` (default S)
    is rounded up to whole blocks and must be >= S. Summaries are built once.
    """
    _check_kv("k", k, "v", v)
    b, s, hkv, d = k.shape
    capacity = s if capacity is None else capacity
    if capacity < s:
        raise ValueError(f"capacity {capacity} is smaller than the {s} positions given")
    if lengths is None:
        lengths = jnp.full((b,), s, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B={b}], got {tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer) and int(jnp.max(lengths)) > s:
        raise ValueError(f"a length ({int(jnp.max(lengths))}) exceeds the {s} positions given")
    nb = _num_blocks_for(capacity, block_size)
    pad = nb * block_size - s

    def blocked(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, nb, block_size, hkv, d).transpose(0, 3, 1, 2, 4)

    keys, values = blocked(k), blocked(v)
    kmin, kmax = block_summaries(keys, lengths)
    return KVStore(keys=keys, values=values, kmin=kmin, kmax=kmax, lengths=lengths)


def append(
    store: KVStore,
    k_new: jax.Array,
    v_new: jax.Array,
    num_new: Optional[jax.Array] = None,
) -> KVStore:
    """Append up to T new positions per sequence; returns a new store.

    k_new, v_new: [B, T, Hkv, D]; num_new: [B] int (default T) — sequence b takes
    its first ``num_new[b]`` rows at positions ``lengths[b] ...``. Summaries of the
    touched blocks are updated incrementally (min/max with the new keys), so the
    store stays exact for block-bound queries after every append.

    Capacity: with concrete lengths an overflow raises ``ValueError``. Under
    ``jit`` the caller must check capacity up front (the generation loop does);
    rows beyond capacity are then not written but ``lengths`` still grows past
    ``capacity``, so :func:`check_capacity` reports the overflow afterwards.
    """
    _check_kv("k_new", k_new, "v_new", v_new)
    b, t, hkv, d = k_new.shape
    if (b, hkv, d) != (store.batch, store.num_kv_heads, store.head_dim):
        raise ValueError(
            f"new keys [B, T, Hkv, D]={tuple(k_new.shape)} do not match the store "
            f"(B={store.batch}, Hkv={store.num_kv_heads}, D={store.head_dim})"
        )
    if num_new is None:
        num_new = jnp.full((b,), t, jnp.int32)
    num_new = jnp.asarray(num_new, jnp.int32)
    new_lengths = store.lengths + num_new
    if not isinstance(new_lengths, jax.core.Tracer):
        over = np.asarray(new_lengths) > store.capacity
        if over.any():
            raise ValueError(
                f"KVStore capacity {store.capacity} exceeded: sequence(s) {np.nonzero(over)[0].tolist()} "
                f"would reach {np.asarray(new_lengths)[over].tolist()} positions"
            )
    bk = store.block_size
    pos = store.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    ok = jnp.arange(t)[None, :] < num_new[:, None]
    # Rows not to be written go out of bounds and are dropped by the scatter.
    pos = jnp.where(ok, pos, store.capacity)
    blk, off = pos // bk, pos % bk
    bidx = jnp.arange(b)[:, None].repeat(t, 1)

    kt = k_new.astype(store.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vt = v_new.astype(store.dtype).transpose(0, 2, 1, 3)

    def scatter(dst, src):
        # dst [B, Hkv, NB, Bk, D]; src [B, Hkv, T, D] -> write dst[b, :, blk, off] = src[b, :, t]
        return dst.at[bidx, :, blk, off].set(src.transpose(0, 2, 1, 3), mode="drop")

    keys = scatter(store.keys, kt)
    values = scatter(store.values, vt)

    k32 = k_new.astype(store.dtype).astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    was_empty = (blk * bk >= store.lengths[:, None])  # block had no valid key before this append
    # Per new row: current summary of its block (0-filled if the block was empty).
    safe_blk = jnp.minimum(blk, store.num_blocks - 1)
    gather = lambda s: s[bidx, :, safe_blk]  # [B, T, Hkv, D]
    cur_min = jnp.where(was_empty[..., None, None], jnp.inf, gather(store.kmin))
    cur_max = jnp.where(was_empty[..., None, None], -jnp.inf, gather(store.kmax))
    kn = k32.transpose(0, 2, 1, 3)
    upd_min = jnp.minimum(cur_min, kn)
    upd_max = jnp.maximum(cur_max, kn)
    # Several new rows may hit one block: a scatter-min/max over them is exact.
    base_min = jnp.where(
        (jnp.arange(store.num_blocks)[None, :] * bk >= store.lengths[:, None])[:, None, :, None],
        jnp.inf,
        store.kmin,
    )
    base_max = jnp.where(
        (jnp.arange(store.num_blocks)[None, :] * bk >= store.lengths[:, None])[:, None, :, None],
        -jnp.inf,
        store.kmax,
    )
    kmin = base_min.at[bidx, :, blk].min(upd_min, mode="drop")
    kmax = base_max.at[bidx, :, blk].max(upd_max, mode="drop")
    kmin = jnp.where(jnp.isfinite(kmin), kmin, 0.0)
    kmax = jnp.where(jnp.isfinite(kmax), kmax, 0.0)
    return KVStore(keys=keys, values=values, kmin=kmin, kmax=kmax, lengths=new_lengths, dipr_beta=store.dipr_beta)


def check_capacity(store: KVStore) -> None:
    """Raise ``ValueError`` if any sequence outgrew the store (see :func:`append`)."""
    lengths = np.asarray(store.lengths)
    if (lengths > store.capacity).any():
        raise ValueError(f"KVStore capacity {store.capacity} exceeded: lengths {lengths.tolist()}")


def positions_valid(store: KVStore) -> jax.Array:
    """bool [B, S=capacity]: which positions hold a valid key."""
    return jnp.arange(store.capacity)[None, :] < store.lengths[:, None]
