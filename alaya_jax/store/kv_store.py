"""The KV store: an immutable pytree of blocked keys and values with per-key codes.

One ``KVStore`` holds one layer's cache for a ragged batch. Exact keys and values
are the truth; beside them every key keeps a small code that the DIPR search
scans instead of the key (docs/design.md §3; filter–refine: §4)::

    keys, values : [B, Hkv, NB, Bk, D]   model dtype; contents past a length are
                                          undefined and may be anything, NaN too
    codes        : [B, Hkv, NB, Bk, D/2] uint8: the rotated key, 4 bits a dimension
                                          (dim j low nibble, dim j + D/2 high nibble)
    code_scale   : [B, Hkv, NB, Bk] f16  per-key scale of the 4-bit levels −7..7
    code_err     : [B, Hkv, NB, Bk] f16  ‖rotated key − decoded code‖₂, rounded up
    value_means  : [B, Hkv, NB, D] f32    mean of the values of each block's valid positions
                                          (0 for a block without one): what the estimated
                                          tail attends to for the keys it does not read
    rot_signs    : [Hkv, D] f32           ±1: the rotation H·diag(signs)/√D per KV head
    lengths      : [B] int32             valid positions per sequence
    dipr_beta    : [B, Hq] f32 or None   this layer's DIPR β per query head, chosen by
                                          calibration at the end of prefill
                                          (:mod:`alaya_jax.attention.dipr.calibration`); None = not calibrated
    placement    : static str            where the arrays live (:mod:`alaya_jax.store.placement`):
                                          "device", or values (and keys) in pinned host memory

``capacity = NB * Bk`` is static. Codes are built from the stored (dtype-cast)
keys at prefill and appended with every new key, so they always describe the
keys that the refine step reads; the block value means are recomputed, from the
stored values, for every block an append, a truncation or a change of lengths
touches, so they always describe the valid values. Every update returns a new store; nothing is
mutated in place. Block structure (``Bk``) is what prefix reuse hashes and what
the block baselines (Quest, InfLLM) select; the DIPR search is per key.

This module owns every change to a store's shape — :func:`resize`, :func:`fit_blocks`,
:func:`truncate`, :func:`with_lengths`, :func:`take_rows`, :func:`place_row`,
:func:`gather_positions`, :func:`place` (where its arrays live) — and its
array layout (:func:`to_arrays`, :func:`from_arrays`, :func:`abstract_arrays`, for
snapshots): callers never pad axes or list fields themselves.

Placement. A store whose placement keeps a field on the host holds it as a ``pinned_host`` array.
:meth:`KVStore.dense_keys` / :meth:`KVStore.dense_values` always give device arrays (a whole-array
transfer for a host field: what jnp readers such as the dense prefill attention pay);
:meth:`KVStore.dense_keys_in_place` / :meth:`KVStore.dense_values_in_place` give the arrays where
they lie, for the kernels that read host memory in place (the DIPR refine on a GPU). :func:`append`
writes a host field with read-modify-write ``dynamic_update_slice`` s of the rows it touches (in
place when the caller donates the store), and the shape operations move a host field to the device,
reshape it there and move the result back (whole-array transfers; re-layouts are rare).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from alaya_jax.store import placement as placements
from pallas_kernels.key_codes import CODE_MAX, rotate, rotation_signs
from pallas_kernels.key_codes import encode as encode_codes

#: Seed of the default rotation signs (recorded in snapshots as ``code_seed``).
DEFAULT_CODE_SEED = 0

#: The code byte of an all-zero key (both nibbles hold code 0): what empty positions hold, so
#: that padding a store and building it from zero-padded keys give the same bits.
ZERO_CODE = (CODE_MAX + 1) * 0x11

# The block value means (``KVStore.value_means``) are held in the values' dtype (averaged in f32):
# 1/64 of the values' bytes at Bk = 64, so that the code scan's tail reads 1/34 of a key code's
# bytes more per key (bf16, D = 128), not twice that.

# Fields with a block axis (axis 2), each with its fill value for blocks / positions that hold no
# key (all but ``value_means`` also have a position inside the block, axis 3). Private: only this
# module reads the layout.
_BLANK = {"keys": 0, "values": 0, "codes": ZERO_CODE, "code_scale": 0, "code_err": 0, "value_means": 0}
_BLOCKED_FIELDS = tuple(_BLANK)
# The arrays of a store as snapshots save them (``dipr_beta`` is optional and kept apart).
_ARRAY_FIELDS = (*_BLOCKED_FIELDS, "rot_signs", "lengths")


@struct.dataclass
class KVStore:
    keys: jax.Array  # [B, Hkv, NB, Bk, D]
    values: jax.Array  # [B, Hkv, NB, Bk, D]
    codes: jax.Array  # [B, Hkv, NB, Bk, D/2] uint8
    code_scale: jax.Array  # [B, Hkv, NB, Bk] f16
    code_err: jax.Array  # [B, Hkv, NB, Bk] f16
    value_means: jax.Array  # [B, Hkv, NB, D] values' dtype: mean of each block's valid values
    rot_signs: jax.Array  # [Hkv, D] f32
    lengths: jax.Array  # [B] int32
    dipr_beta: Optional[jax.Array] = None  # [B, Hq] f32: calibrated β per query head (None: not calibrated)
    # Where the arrays live (static: a decode step compiles per placement); see alaya_jax.store.placement.
    placement: str = struct.field(pytree_node=False, default=placements.DEFAULT_PLACEMENT)

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

    @property
    def host_fields(self) -> tuple[str, ...]:
        """The fields this store's placement keeps in pinned host memory."""
        return placements.host_fields(self.placement)

    def _device_field(self, name: str) -> jax.Array:
        x = getattr(self, name)
        return placements.to_device(x) if name in self.host_fields else x

    def dense_keys(self) -> jax.Array:
        """Keys as ``[B, Hkv, S=capacity, D]`` in device memory (a free reshape; with the keys on the host,
        a whole-array host-to-device transfer)."""
        return _flat(self._device_field("keys"))

    def dense_values(self) -> jax.Array:
        """Values as ``[B, Hkv, S=capacity, D]`` in device memory (a free reshape; with the values on the
        host, a whole-array host-to-device transfer)."""
        return _flat(self._device_field("values"))

    def dense_keys_in_place(self) -> jax.Array:
        """Keys as ``[B, Hkv, S, D]`` where the placement keeps them (pinned host memory or device): only
        for kernels that read host memory in place (:func:`alaya_jax.store.placement.reads_in_place`)."""
        return _flat(self.keys)

    def dense_values_in_place(self) -> jax.Array:
        """Values as ``[B, Hkv, S, D]`` where the placement keeps them (see :meth:`dense_keys_in_place`)."""
        return _flat(self.values)

    def blocked_keys(self) -> jax.Array:
        """Keys ``[B, Hkv, NB, Bk, D]`` in device memory (a transfer when they are on the host)."""
        return self._device_field("keys")

    def dense_codes(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(codes [B,Hkv,S,D/2] uint8, scale [B,Hkv,S] f16, err [B,Hkv,S] f16)`` (free reshapes)."""
        return _flat(self.codes), _flat(self.code_scale), _flat(self.code_err)

    def _map_blocked(self, fn: Callable[[jax.Array, int], jax.Array]) -> "KVStore":
        """The store with ``fn(array, blank)`` applied to every field that has the block axis
        (axis 2); ``blank`` is the field's fill value for empty positions. A host field is moved to the
        device for ``fn`` and the result back to the host (``fn`` need not know about placement)."""
        return self.replace(**{f: self._apply(f, lambda x, f=f: fn(x, _BLANK[f])) for f in _BLOCKED_FIELDS})

    def _apply(self, name: str, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """``fn`` of field ``name`` computed in device memory, the result where the placement keeps the field."""
        if name not in self.host_fields:
            return fn(getattr(self, name))
        return placements.to_host(fn(placements.to_device(getattr(self, name))))


def _flat(x: jax.Array) -> jax.Array:
    """[B, Hkv, NB, Bk, ...] -> [B, Hkv, NB*Bk, ...]."""
    return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _num_blocks_for(capacity: int, block_size: int) -> int:
    return -(-capacity // block_size)


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 2 for the key codes (Hadamard rotation), got {head_dim}")


def empty(
    *,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    capacity: int,
    block_size: int = 64,
    dtype=jnp.float32,
    code_seed: int = DEFAULT_CODE_SEED,
    placement: str = placements.DEFAULT_PLACEMENT,
) -> KVStore:
    """An empty store able to hold ``capacity`` positions (rounded up to whole blocks). ``placement``
    (:data:`alaya_jax.store.placement.PLACEMENTS`): a host field is allocated in pinned host memory
    directly (never as a device array first)."""
    if block_size <= 0 or capacity <= 0:
        raise ValueError(f"block_size and capacity must be positive, got {block_size=}, {capacity=}")
    _check_head_dim(head_dim)
    host = placements.host_fields(placement)
    if host:
        placements.check_host_memory()
    nb = _num_blocks_for(capacity, block_size)
    shape = (batch, num_kv_heads, nb, block_size)
    return KVStore(
        keys=_zeros(shape + (head_dim,), dtype, host="keys" in host),
        values=_zeros(shape + (head_dim,), dtype, host="values" in host),
        codes=jnp.full(shape + (head_dim // 2,), ZERO_CODE, jnp.uint8),
        code_scale=jnp.zeros(shape, jnp.float16),
        code_err=jnp.zeros(shape, jnp.float16),
        value_means=jnp.zeros((batch, num_kv_heads, nb, head_dim), dtype),
        rot_signs=jnp.asarray(rotation_signs(num_kv_heads, head_dim, seed=code_seed)),
        lengths=jnp.zeros((batch,), jnp.int32),
        placement=placement,
    )


def _zeros(shape, dtype, *, host: bool) -> jax.Array:
    """Zeros of ``shape`` in device memory or (``host``) pinned host memory of the default device
    (under ``jit``: an explicit transfer of the zeros to the host)."""
    if not host:
        return jnp.zeros(shape, dtype)
    return _host_zeros(tuple(shape), jnp.dtype(dtype))


def _host_zeros(shape, dtype) -> jax.Array:
    # An explicit transfer inside the jit, not out_shardings=pinned_host: with jax 0.10 the latter gives
    # an array whose sharding says pinned_host but whose aval says device memory, and jit then traces it
    # as a device array.
    return jax.jit(lambda: placements.to_host(jnp.zeros(shape, dtype)))()


def place(store: KVStore, placement: str) -> KVStore:
    """The store with its arrays where ``placement`` keeps them (:mod:`alaya_jax.store.placement`):
    each field moved between device and pinned host memory as needed (no copy for a field already
    there); traceable. The same values bit for bit: outputs are identical in every placement."""
    host = placements.host_fields(placement)
    if host:
        placements.check_host_memory()
    moved = {}
    for f in ("keys", "values"):
        want, now = f in host, f in store.host_fields
        if want != now:
            moved[f] = (placements.to_host if want else placements.to_device)(getattr(store, f))
    return store.replace(**moved, placement=placement)


def key_codes(keys: jax.Array, rot_signs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Codes of stored keys: keys [B, Hkv, ..., D] (store dtype), rot_signs [Hkv, D] →
    ``(codes [..., D/2] uint8, scale [...] f16, err [...] f16)`` with the leading shape of ``keys``."""
    moved = jnp.moveaxis(keys, 1, -2)  # [B, ..., Hkv, D]
    codes, scale, err = encode_codes(rotate(moved, rot_signs))
    return jnp.moveaxis(codes, -2, 1), jnp.moveaxis(scale, -1, 1), jnp.moveaxis(err, -1, 1)


def with_codes(store: KVStore, *, code_seed: Optional[int] = None) -> KVStore:
    """The store with every code rebuilt from its keys (optionally under a new rotation seed).
    Used to upgrade stores loaded from snapshots that predate the codes."""
    signs = store.rot_signs if code_seed is None else jnp.asarray(
        rotation_signs(store.num_kv_heads, store.head_dim, seed=code_seed))
    codes, scale, err = key_codes(store.blocked_keys(), signs)
    return store.replace(codes=codes, code_scale=scale, code_err=err, rot_signs=signs)


def _block_valid(lengths: jax.Array, first_blocks: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """bool [B, n, Bk]: which positions of blocks ``first_blocks[b] + 0..n-1`` lie below ``lengths[b]``
    (``first_blocks`` [B] or a number)."""
    blk = jnp.asarray(first_blocks, jnp.int32).reshape(-1, 1) + jnp.arange(num_blocks, dtype=jnp.int32)
    pos = blk[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return pos < lengths[:, None, None]


def _masked_block_means(values: jax.Array, valid: jax.Array) -> jax.Array:
    """values [B, Hkv, n, Bk, D], valid bool [B, n, Bk] → [B, Hkv, n, D] in the values' dtype: the mean
    of each block's valid values, summed in f32 (0 where none is valid; invalid positions may hold NaN)."""
    ok = valid[:, None, :, :, None]
    total = jnp.sum(jnp.where(ok, values.astype(jnp.float32), 0.0), axis=3)
    count = jnp.sum(ok, axis=3, dtype=jnp.float32)
    return (total / jnp.maximum(count, 1.0)).astype(values.dtype)


def block_value_means(values: jax.Array, lengths: jax.Array) -> jax.Array:
    """The mean value of every block's valid positions: values [B, Hkv, NB, Bk, D], lengths [B] →
    [B, Hkv, NB, D] in the values' dtype (0 for blocks without a valid position)."""
    _, _, nb, bk, _ = values.shape
    return _masked_block_means(values, _block_valid(lengths, 0, nb, bk))


def _device_values(store: KVStore) -> jax.Array:
    """The values in device memory: a copy of all of them when the placement keeps them on the host (a
    recomputation of the block means then reads every value over PCIe once)."""
    return placements.to_device(store.values) if "values" in store.host_fields else store.values


def with_value_means(store: KVStore) -> KVStore:
    """The store with every block value mean recomputed from its values and lengths (used by the
    shape changes that move lengths, and to upgrade stores loaded from snapshots without them)."""
    return store.replace(value_means=block_value_means(_device_values(store), store.lengths))


def block_summaries(keys: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Element-wise min/max of the valid keys of every block (Quest's page summary).

    keys: [B, Hkv, NB, Bk, D]; lengths: [B]. Returns (kmin, kmax), each
    [B, Hkv, NB, D] f32; blocks without a valid key get 0.
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
    code_seed: int = DEFAULT_CODE_SEED,
) -> KVStore:
    """Build a store from dense keys/values.

    k, v: [B, S, Hkv, D]; lengths: [B] (default: all S). ``capacity`` (default S)
    is rounded up to whole blocks and must be >= S. Key codes are built once, under
    the rotation of ``code_seed``.
    """
    _check_kv("k", k, "v", v)
    b, s, hkv, d = k.shape
    _check_head_dim(d)
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
        return x.reshape(b, nb, block_size, hkv, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    signs = jnp.asarray(rotation_signs(hkv, d, seed=code_seed))
    keys, values = blocked(k), blocked(v)
    codes, scale, err = key_codes(keys, signs)
    return KVStore(keys=keys, values=values, codes=codes, code_scale=scale, code_err=err,
                   value_means=block_value_means(values, lengths), rot_signs=signs, lengths=lengths)


def append(
    store: KVStore,
    k_new: jax.Array,
    v_new: jax.Array,
    num_new: Optional[jax.Array] = None,
    *,
    first_position=None,
) -> KVStore:
    """Append up to T new positions per sequence; returns a new store.

    k_new, v_new: [B, T, Hkv, D]; num_new: [B] int (default T) — sequence b takes
    its first ``num_new[b]`` rows at positions ``lengths[b] ...``. The new keys'
    codes are built and written beside them, so the store stays searchable after
    every append, and the value means of the blocks the new rows land in are
    recomputed from the stored values (at most ``ceil((T + Bk − 1) / Bk)`` blocks a sequence).

    Capacity: with concrete lengths an overflow raises ``ValueError``. Under
    ``jit`` the caller must check capacity up front (the generation loop does);
    rows beyond capacity are then not written but ``lengths`` still grows past
    ``capacity``, so :func:`check_capacity` reports the overflow afterwards.

    ``first_position`` (int or traced scalar; None: 0): the store is one shard of a store sharded
    along the sequence (:mod:`alaya_jax.store.sharding`) that holds positions ``[first_position,
    first_position + capacity)`` of its sequences, whose ``lengths`` are the whole sequences'; a new
    row is written only where its position falls in that range (no capacity check: the caller checks
    the whole store's).
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
    if first_position is None and not isinstance(new_lengths, jax.core.Tracer):
        over = np.asarray(new_lengths) > store.capacity
        if over.any():
            raise ValueError(
                f"KVStore capacity {store.capacity} exceeded: sequence(s) {np.nonzero(over)[0].tolist()} "
                f"would reach {np.asarray(new_lengths)[over].tolist()} positions"
            )
    bk = store.block_size
    pos = store.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    ok = jnp.arange(t)[None, :] < num_new[:, None]
    if first_position is not None:  # a shard: its own slots, the others' rows are not written here
        pos = pos - jnp.asarray(first_position, jnp.int32)
        ok = ok & (pos >= 0) & (pos < store.capacity)
    # Rows not to be written go out of bounds and are dropped by the scatter.
    pos = jnp.where(ok, pos, store.capacity)
    blk, off = pos // bk, pos % bk
    bidx = jnp.arange(b)[:, None].repeat(t, 1)

    kt = k_new.astype(store.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vt = v_new.astype(store.dtype).transpose(0, 2, 1, 3)
    codes, scale, err = key_codes(kt, store.rot_signs)  # [B, Hkv, T, D/2], [B, Hkv, T] x2

    def scatter(dst, src):
        # dst [B, Hkv, NB, Bk, ...]; src [B, Hkv, T, ...] -> dst[b, :, blk, off] = src[b, :, t]
        return dst.at[bidx, :, blk, off].set(jnp.swapaxes(src, 1, 2), mode="drop")

    def write(name, src):
        dst = getattr(store, name)
        if name in store.host_fields:
            return _write_host_rows(dst, src, store.lengths, num_new)
        return scatter(dst, src)

    # The block means from the new rows (the stored values are not read: they may be in host memory, and
    # every placement then holds the same bits).
    means = _add_to_value_means(store.value_means, vt, store.lengths, new_lengths, bk, offset=first_position)
    return store.replace(keys=write("keys", kt), values=write("values", vt),
                         codes=scatter(store.codes, codes), code_scale=scatter(store.code_scale, scale),
                         code_err=scatter(store.code_err, err),
                         value_means=means, lengths=new_lengths)


def _add_to_value_means(means: jax.Array, vt: jax.Array, old_lengths: jax.Array, new_lengths: jax.Array,
                        bk: int, *, offset=None) -> jax.Array:
    """``means`` [B, Hkv, NB, D] updated for the rows ``vt[b, :, :new − old]`` ([B, Hkv, T, D], device)
    appended at positions ``old_lengths[b] ...``, without reading the stored values (they may be in host
    memory): mean' = (mean·n + Σ new rows of the block) / n', in f32 from the stored mean (so in bf16 one
    rounding of the mean per append: after a block of decode steps the mean is within ~1% of the exact
    recomputation that :func:`with_value_means` makes). ``offset``: None, or a shard's first global position
    (``append``'s ``first_position``): the lengths are the sequences' global ones, ``means`` the shard's
    blocks; only the new rows that fall in the shard are added."""
    b, _, nb, d = means.shape
    t = vt.shape[2]
    pos = old_lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    if offset is not None:  # the shard's own coordinates (rows before or past it: not new here)
        offset = jnp.asarray(offset, jnp.int32)
        pos = pos - offset
        old_lengths, new_lengths = (jnp.clip(x - offset, 0, nb * bk) for x in (old_lengths, new_lengths))
    n = min(nb, (t + 2 * bk - 2) // bk)  # blocks a run of T positions can touch
    first = jnp.minimum(old_lengths // bk, nb - 1)
    blk = first[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, n]
    new = (pos >= old_lengths[:, None]) & (pos < new_lengths[:, None])  # [B, T]
    new = new[:, :, None] & (pos[:, :, None] // bk == blk[:, None, :])  # [B, T, n]
    vsum = jnp.einsum("bhtd,btn->bhnd", jnp.where(new.any(-1)[:, None, :, None], vt.astype(jnp.float32), 0.0),
                      new.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    start = blk * bk
    n_old = jnp.clip(old_lengths[:, None] - start, 0, bk).astype(jnp.float32)  # [B, n]
    n_new = jnp.clip(new_lengths[:, None] - start, 0, bk).astype(jnp.float32)
    old = jnp.take_along_axis(means, jnp.minimum(blk, nb - 1)[:, None, :, None], axis=2).astype(jnp.float32)
    fresh = (old * n_old[:, None, :, None] + vsum) / jnp.maximum(n_new, 1.0)[:, None, :, None]
    touched = (n_new > n_old) & (blk < nb)
    dst = jnp.where(touched, blk, nb)  # untouched blocks go out of bounds and are dropped
    return means.at[jnp.arange(b)[:, None], :, dst].set(jnp.swapaxes(fresh, 1, 2).astype(means.dtype), mode="drop")


def _write_host_rows(dst: jax.Array, src: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
    """``dst`` (a host field [B, Hkv, NB, Bk, D], pinned host memory) with sequence b's rows
    ``src[b, :, :count[b]]`` ([B, Hkv, T, D], device) written at positions ``start[b] ...``; positions
    at or past the capacity are not written (as ``append``'s scatter drops them).

    XLA refuses a scatter or gather between memory spaces, so each touched unit — the row itself for
    T = 1 (a decode step: Hkv·D elements), else each block the T rows overlap — is read back to the
    device (``dynamic_slice``), merged with its new rows there, moved to the host and written with a
    ``dynamic_update_slice``: PCIe traffic of the touched units only, in place when the caller
    donates ``dst``. Units are written one after the other, each read after the previous write, so a
    unit index clamped into range (past the capacity) writes back what it read."""
    b, hkv, nb, bk = dst.shape[:4]
    t = src.shape[2]
    rows = 1 if t == 1 else bk  # positions per unit
    units = 1 if t == 1 else (t - 1) // bk + 2  # units T rows starting anywhere can overlap
    lanes = jnp.arange(rows, dtype=jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    for i in range(b):
        p0 = start[i]
        for j in range(units):
            first = (p0 if t == 1 else (p0 // bk) * bk) + j * rows  # first position of the unit
            blk = jnp.minimum(first // bk, nb - 1)
            off = jnp.where(first < nb * bk, first % bk, 0) if t == 1 else zero
            at = (jnp.int32(i), zero, blk, off) + (zero,) * (dst.ndim - 4)
            size = (1, hkv, 1, rows) + dst.shape[4:]
            old = placements.to_device(jax.lax.dynamic_slice(dst, at, size))  # [1, Hkv, 1, rows, D]
            row = first + lanes - p0  # which new row lands on each position of the unit
            ok = (first < nb * bk) & (row >= 0) & (row < count[i])
            new = jnp.take(src[i], jnp.clip(row, 0, t - 1), axis=1)  # [Hkv, rows, D]
            merged = jnp.where(ok[None, :, None], new.astype(dst.dtype), old[0, :, 0])
            dst = jax.lax.dynamic_update_slice(dst, placements.to_host(merged[None, :, None]), at)
    return dst


def check_capacity(store: KVStore) -> None:
    """Raise ``ValueError`` if any sequence outgrew the store (see :func:`append`)."""
    lengths = np.asarray(store.lengths)
    if (lengths > store.capacity).any():
        raise ValueError(f"KVStore capacity {store.capacity} exceeded: lengths {lengths.tolist()}")


def positions_valid(store: KVStore) -> jax.Array:
    """bool [B, S=capacity]: which positions hold a valid key."""
    return jnp.arange(store.capacity)[None, :] < store.lengths[:, None]


# ----------------------------------------------------------------------------- shape changes


def _fit_axis(x: jax.Array, num_blocks: int, blank, *, copy: bool) -> jax.Array:
    """A blocked field [B, Hkv, NB, ...] padded (with ``blank``) or cut to ``num_blocks`` blocks;
    unchanged in size: ``x`` itself, or a copy when ``copy``."""
    cur = x.shape[2]
    if num_blocks > cur:
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, num_blocks - cur)
        return jnp.pad(x, widths, constant_values=jnp.asarray(blank, x.dtype))
    if num_blocks < cur:
        return jax.lax.slice_in_dim(x, 0, num_blocks, axis=2)
    return jnp.copy(x) if copy else x


def fit_blocks(store: KVStore, num_blocks: int, *, copy: bool = False) -> KVStore:
    """The store with its block axis padded with empty blocks or cut to ``num_blocks`` blocks
    (no check against the lengths: see :func:`resize`; traceable). ``copy``: every array of
    the result is computed by an op of its own (a pad, a slice or an explicit copy), so under
    ``jit`` none is an input passed through (fresh buffers, safe to donate)."""
    num_blocks = int(num_blocks)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    out = store._map_blocked(lambda x, blank: _fit_axis(x, num_blocks, blank, copy=copy))
    if copy:
        out = out.replace(rot_signs=jnp.copy(store.rot_signs), lengths=jnp.copy(store.lengths),
                          dipr_beta=None if store.dipr_beta is None else jnp.copy(store.dipr_beta))
    return out


def num_blocks_for(capacity: int, block_size: int) -> int:
    """Blocks of ``block_size`` positions needed to hold ``capacity`` positions."""
    return _num_blocks_for(int(capacity), int(block_size))


def resize(store: KVStore, capacity: int) -> KVStore:
    """The same store with its block axis padded (empty blocks) or cut to hold ``capacity``
    positions, rounded up to whole blocks (the store itself when that is its size). Cutting
    below a valid length is an error (lengths must be concrete)."""
    bk = store.block_size
    nb = _num_blocks_for(int(capacity), bk)
    if nb <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    longest = int(np.max(np.asarray(store.lengths), initial=0))
    if nb < _num_blocks_for(longest, bk):
        raise ValueError(f"capacity {capacity} ({nb} blocks of {bk}) cannot hold the store's "
                         f"{longest} valid positions")
    if nb == store.num_blocks:
        return store
    return fit_blocks(store, nb)


def with_lengths(store: KVStore, lengths) -> KVStore:
    """The store with ``lengths`` [B] (or one length for every sequence) as its valid positions;
    keys, values and codes are left as they are, the block value means recomputed for the new
    lengths (traceable; no check: see :func:`truncate`)."""
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), store.lengths.shape)
    return store.replace(lengths=lengths, value_means=block_value_means(_device_values(store), lengths))


def truncate(store: KVStore, num_tokens: int) -> KVStore:
    """Keep the first ``num_tokens`` positions of every sequence (which must not exceed any
    length): sets ``lengths`` and recomputes the block value means. Keys, values and codes past
    the new length are left as they are (undefined contents; every reader masks by length)."""
    n = int(num_tokens)
    lengths = np.asarray(store.lengths)
    if n < 0 or (lengths < n).any():
        raise ValueError(f"cannot truncate to {n} positions: lengths are {lengths.tolist()}")
    if (lengths == n).all():
        return store
    return with_lengths(store, n)


def gather_positions(store: KVStore, positions) -> KVStore:
    """A store of ``len(positions) / block_size`` blocks whose position p holds position ``positions[p]``
    of the same sequence in ``store`` (positions int [S'], S' a positive multiple of the block size,
    every entry a valid position of every sequence; traceable), every position valid (lengths S').
    Keys, values, codes, scales and error norms move together, so the codes still describe the keys
    (e.g. a long context tiled from a short one: ``bench/beyond_gpu.py``)."""
    positions = jnp.asarray(positions, jnp.int32)
    n, bk = positions.shape[0], store.block_size
    if n < 1 or n % bk:
        raise ValueError(f"gather_positions takes a positive multiple of the block size {bk} of positions, got {n}")

    def gather(x):
        flat = jnp.take(_flat(x), positions, axis=2)
        return flat.reshape(flat.shape[:2] + (n // bk, bk) + flat.shape[3:])

    out = store.replace(**{f: store._apply(f, gather) for f in _BLOCKED_FIELDS if f != "value_means"},
                        value_means=jnp.zeros(store.value_means.shape[:2] + (n // bk,) + store.value_means.shape[3:],
                                              store.value_means.dtype),
                        lengths=jnp.full(store.lengths.shape, n, jnp.int32))
    return with_value_means(out)  # the block means of the gathered values


def take_rows(store: KVStore, rows: jax.Array) -> KVStore:
    """A store of batch ``len(rows)`` whose sequence ``i`` is sequence ``rows[i]`` of ``store``
    (rows int [B'], traceable): blocked fields, lengths and calibrated βs."""
    rows = jnp.asarray(rows)
    out = store._map_blocked(lambda x, _: jnp.take(x, rows, axis=0))
    return out.replace(lengths=jnp.take(store.lengths, rows, axis=0),
                       dipr_beta=None if store.dipr_beta is None else jnp.take(store.dipr_beta, rows, axis=0))


def place_row(batch: KVStore, slot, row: KVStore) -> KVStore:
    """``batch`` with sequence ``slot`` replaced by the single sequence of ``row`` (a B=1 store of
    the same heads, dtype and block size, any number of blocks: padded or cut to ``batch``'s).
    A calibrated ``batch`` takes the row's βs (zeros when the row has none); an uncalibrated one
    keeps none."""
    if row.batch != 1:
        raise ValueError(f"place_row takes a B=1 store, got batch {row.batch}")
    nb = batch.num_blocks
    put = {f: batch._apply(f, lambda x, f=f: x.at[slot].set(
        _fit_axis(row._device_field(f), nb, _BLANK[f], copy=False)[0])) for f in _BLOCKED_FIELDS}
    if batch.dipr_beta is not None:
        rb = row.dipr_beta[0] if row.dipr_beta is not None else jnp.zeros(batch.dipr_beta.shape[1:], jnp.float32)
        put["dipr_beta"] = batch.dipr_beta.at[slot].set(rb)
    return batch.replace(**put, lengths=batch.lengths.at[slot].set(row.lengths[0]))


# ----------------------------------------------------------------------------- array layout (snapshots)


def to_arrays(store: KVStore, *, num_blocks: Optional[int] = None) -> dict[str, jax.Array]:
    """The store's arrays by name (every field but the optional ``dipr_beta``), the block axis
    cut to its first ``num_blocks`` blocks when given (what a snapshot writes)."""
    if num_blocks is not None:
        store = store._map_blocked(lambda x, _: x[:, :, :num_blocks])
    return {f: getattr(store, f) for f in _ARRAY_FIELDS}


def from_arrays(arrays: dict, *, dipr_beta: Optional[jax.Array] = None) -> KVStore:
    """The store of :func:`to_arrays`' dict (extra entries ignored)."""
    missing = [f for f in _ARRAY_FIELDS if f not in arrays]
    if missing:
        raise ValueError(f"a KV store needs the arrays {missing}")
    return KVStore(**{f: arrays[f] for f in _ARRAY_FIELDS}, dipr_beta=dipr_beta)


def abstract_arrays(*, batch: int, num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype,
                    sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
    """``jax.ShapeDtypeStruct`` of every array :func:`to_arrays` gives for a store of these sizes
    and key/value ``dtype`` (a restore target)."""
    pos = (batch, num_kv_heads, num_blocks, block_size)

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=sharding)

    return {"keys": sds(pos + (head_dim,), dtype), "values": sds(pos + (head_dim,), dtype),
            "codes": sds(pos + (head_dim // 2,), jnp.uint8), "code_scale": sds(pos, jnp.float16),
            "code_err": sds(pos, jnp.float16),
            "value_means": sds((batch, num_kv_heads, num_blocks, head_dim), dtype),
            "rot_signs": sds((num_kv_heads, head_dim), jnp.float32),
            "lengths": sds((batch,), jnp.int32)}
