"""Exact DIPR over a :class:`~alaya_jax.kv_store.KVStore` by block bounds (DESIGN.md §2).

For one decode query per head:

1. ``UB_b = Σ_d max(q_d·kmax_bd, q_d·kmin_bd)`` (+ rounding slack) bounds every key of block b.
2. ``M_lb``: exact max score over a probe list — the sink and window blocks, the
   ``top_r`` blocks with the largest bound (per KV head, over its group; 0 = none)
   and each query head's own largest-bound block.
3. Keep every block with ``UB_b ≥ M_lb − β`` for some query head of the group,
   plus the sink and window blocks. Every DIPR key's block is kept (UB ≥ q·k ≥
   M − β ≥ M_lb − β), so is the arg-max's block: the exact max ``M`` and the exact
   token mask follow from the kept blocks alone.
4. Attend over the kept blocks with token mask ``s ≥ M − β`` ∪ sink ∪ window (the
   compare widened by the dot's rounding bound, ``rounding_slack``: M comes from
   another kernel, which may sum q·k in another order).

Single pass (``single_pass=True``, used when no mask is asked for): step 4 runs
at once with threshold ``M_lb − β`` and the attention kernel also returns the max
raw score ``M'`` it saw over the valid tokens of the kept blocks. The kept blocks
hold the arg-max, so ``M' = M`` (same score arithmetic as the probe). If
``M' == M_lb`` for every head — the arg-max was in the probe — the threshold used
*was* ``M − β`` and the result is the two-pass result, bit for bit. Otherwise
(``lax.cond``) the step re-attends with threshold ``M' − β`` after the two-pass
range max; counted in ``DiprStats.refined``. This drops the separate range-max
pass over the kept blocks in the common case.

Kept lists live in a fixed-capacity buffer ``[B, Hkv, C]``. If any list would
overflow ``C``, the step takes the dense path (every valid block) for the whole
batch — exact, never a silent drop — and counts it in ``DiprStats.overflow``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from alaya_jax.dipr import check_beta
from alaya_jax.kv_store import KVStore
from alaya_jax.masked_attention import group_size
from pallas_kernels.block_bounds import block_bounds
from pallas_kernels.range_mask import dipr_range_mask
from pallas_kernels.sparse_attention import sparse_decode_attention


@struct.dataclass
class DiprStats:
    blocks_kept: jax.Array  # [B, Hkv] int32: blocks read per KV head (sink/window blocks included)
    keys_in_range: jax.Array  # [B, Hq] int32: |DIPR| (only when the mask was asked for, else -1)
    overflow: jax.Array  # [] int32: 1 if this step fell back to the dense path
    max_score: jax.Array  # [B, Hq] f32: the exact max raw score M
    refined: jax.Array = None  # [] int32: single-pass mode only: 1 if M != M_lb and the step re-attended


def _forced_list(lengths: jax.Array, num_blocks: int, block_size: int, *, sink: int, window: int,
                 num_kv_heads: int) -> jax.Array:
    """int32 [B, Hkv, F]: the sink and window blocks below each length (-1 where none), without a search."""
    ln = lengths[:, None]
    cols = []
    ns = -(-sink // block_size)
    if ns:
        i = jnp.arange(ns)[None, :]
        cols.append(jnp.where(i * block_size < jnp.minimum(sink, ln), i, -1))
    if window > 0:
        nw = -(-window // block_size) + 1
        first = jnp.maximum(ln - window, 0) // block_size
        i = first + jnp.arange(nw)[None, :]
        cols.append(jnp.where((i * block_size < ln) & (i < num_blocks), i, -1))
    if not cols:
        return jnp.full((lengths.shape[0], num_kv_heads, 0), -1, jnp.int32)
    f = jnp.concatenate(cols, axis=-1).astype(jnp.int32)
    return jnp.broadcast_to(f[:, None, :], (f.shape[0], num_kv_heads, f.shape[1]))


def _forced_blocks(lengths: jax.Array, num_blocks: int, block_size: int, *, sink: int, window: int) -> jax.Array:
    """bool [B, NB]: blocks holding a sink or window position (below each length)."""
    start = jnp.arange(num_blocks)[None, :] * block_size
    end = start + block_size  # exclusive
    ln = lengths[:, None]
    in_sink = start < jnp.minimum(sink, ln)
    if window <= 0:
        return in_sink
    in_window = (end > ln - window) & (start < ln)
    return in_sink | in_window


def _compact(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """keep bool [..., NB] → (indices int32 [..., capacity] ascending, -1 padded; count [...])."""
    count = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    rank = jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    nb = keep.shape[-1]
    target = jnp.where(keep & (rank < capacity), rank, capacity)  # out of range → dropped
    flat_t = target.reshape(-1, nb)
    src = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), flat_t.shape)
    out = jnp.full((flat_t.shape[0], capacity), -1, jnp.int32)
    out = out.at[jnp.arange(flat_t.shape[0])[:, None], flat_t].set(src, mode="drop")
    return out.reshape(keep.shape[:-1] + (capacity,)), count


def _scatter_mask(mask: jax.Array, block_idx: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """mask [B,Hq,C,Bk] over listed blocks (block_idx [B,Hkv,C]) → dense bool [B,Hq,S]."""
    b, hq, c, bk = mask.shape
    hkv = block_idx.shape[1]
    g = hq // hkv
    idx = jnp.repeat(block_idx, g, axis=1)  # [B,Hq,C]
    idx = jnp.where(idx >= 0, idx, num_blocks)  # dropped
    dense = jnp.zeros((b, hq, num_blocks, bk), bool)
    dense = dense.at[jnp.arange(b)[:, None, None], jnp.arange(hq)[None, :, None], idx].set(mask, mode="drop")
    return dense.reshape(b, hq, num_blocks * bk)


def _head_beta(beta, batch: int, num_q_heads: int) -> jax.Array:
    """β (float, scalar or broadcastable to [B, Hq]) → f32 [B, Hq]: a β per query head."""
    beta = jnp.asarray(beta, jnp.float32)
    try:
        return jnp.broadcast_to(beta, (batch, num_q_heads))
    except ValueError:
        raise ValueError(f"beta of shape {tuple(beta.shape)} does not broadcast to [B, Hq]=[{batch}, "
                         f"{num_q_heads}]") from None


def kept_blocks(q: jax.Array, store: KVStore, *, beta, sink: int, window: int, top_r: int, capacity: int,
                rel_slack: float = 1e-4, implementation: str = "reference", interpret: Optional[bool] = None):
    """Steps 1–3: bounds, probe, kept blocks (``beta``: float or broadcastable to [B, Hq]).
    q [B,Hq,D] → (M_lb f32 [B,Hq], kept_idx int32
    [B,Hkv,capacity] ascending and -1 padded, kept_count int32 [B,Hkv] (may exceed ``capacity``))."""
    if top_r < 0:
        raise ValueError(f"top_r must be >= 0, got {top_r}")
    b, hq, _ = q.shape
    hkv, nb, bk = store.num_kv_heads, store.num_blocks, store.block_size
    g = group_size(hq, hkv)
    kw = dict(implementation=implementation, interpret=interpret)
    lengths = store.lengths
    nvb = (lengths + bk - 1) // bk
    block_ok = jnp.arange(nb)[None, :] < nvb[:, None]  # [B, NB]
    beta = _head_beta(beta, b, hq)

    # 1. Upper bound of every block's scores, per query head.
    ub = block_bounds(q, store.kmin, store.kmax, nvb, rel_slack=rel_slack, **kw)  # [B,Hq,NB]
    group_ub = jnp.max(ub.reshape(b, hkv, g, nb), axis=2)  # [B,Hkv,NB]
    forced = _forced_blocks(lengths, nb, bk, sink=sink, window=window) & block_ok  # [B,NB]

    # 2. Lower bound M_lb from a probe list: the forced blocks (by arithmetic), each query head's own
    # largest-bound block and the group's top_r blocks by bound (top_r = 0: none; saves a top-k).
    parts = [_forced_list(lengths, nb, bk, sink=sink, window=window, num_kv_heads=hkv)]
    head_ub = jnp.where(block_ok[:, None, :], ub, -jnp.inf)  # [B,Hq,NB]
    # The group's top_r can miss a head's arg-max block entirely (heads of a group disagree), which
    # leaves that head a low M_lb and keeps far too many blocks: each head adds its own best block.
    own = jnp.argmax(head_ub, axis=-1).astype(jnp.int32)  # [B,Hq]
    parts.append(jnp.where(jnp.max(head_ub, axis=-1) > -jnp.inf, own, -1).reshape(b, hkv, g))
    if top_r > 0:
        val, idx = jax.lax.top_k(jnp.where(block_ok[:, None, :], group_ub, -jnp.inf), min(nb, top_r))
        parts.append(jnp.where(val > -jnp.inf, idx, -1).astype(jnp.int32))
    # Listed entries first (the kernels take a prefix-packed list); duplicates only cost a re-read.
    probe_idx = jnp.flip(jnp.sort(jnp.concatenate(parts, axis=-1), axis=-1), axis=-1)
    _, m_lb = dipr_range_mask(q, store.keys, probe_idx, lengths, beta=beta, return_mask=False, **kw)

    # 3. Kept blocks: union over the group of UB >= M_lb - beta, plus forced; only valid blocks.
    hit = ub >= (m_lb - beta)[..., None]  # [B,Hq,NB]
    keep = (jnp.any(hit.reshape(b, hkv, g, nb), axis=2) | forced[:, None, :]) & block_ok[:, None, :]
    kept_idx, kept_count = _compact(keep, capacity)
    return m_lb, kept_idx, kept_count


def dipr_store_attention(
    q: jax.Array,
    store: KVStore,
    *,
    beta,
    sink: int = 4,
    window: int = 64,
    top_r: int = 4,
    max_kept_blocks: Optional[int] = None,
    num_splits: int = 1,
    rel_slack: float = 1e-4,
    with_mask: bool = False,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    single_pass: bool = True,
    blocks_per_step: int = 4,
    rounding_slack: Optional[float] = None,
):
    """Exact DIPR ∪ sink ∪ window attention over a store, reading only kept blocks.

    ``beta``: a float, a scalar array or an array broadcastable to [B, Hq] (a β per query head:
    each head's token threshold is its own ``M − β``; a KV head keeps the union of its group's blocks).

    q [B, Hq, D] → ``(out [B,Hq,D], stats: DiprStats, mask)`` where ``mask`` is the
    DIPR token mask bool [B, Hq, S=capacity] (without sink/window) when
    ``with_mask`` else None. ``max_kept_blocks`` (static, default: all blocks) is
    the capacity C of the kept-block lists per KV head. ``rounding_slack`` is passed to
    the attention (None: 2·D·2^-24): a token is attended when ``s + rounding_slack·‖q‖₁·‖k‖∞ ≥
    M − β``, so that the threshold, computed by the range-max kernel, never drops a key
    that the attention kernel's own rounding puts just below it (the arg-max at β = 0).
    The mask (``with_mask``) is the plain DIPR mask of the range kernel.
    """
    check_beta(beta)
    b, hq, d = q.shape
    if (b, d) != (store.batch, store.head_dim):
        raise ValueError(f"q [B,Hq,D]={tuple(q.shape)} does not match the store (B={store.batch}, D={store.head_dim})")
    hkv, nb, bk = store.num_kv_heads, store.num_blocks, store.block_size
    g = group_size(hq, hkv)
    cap = nb if max_kept_blocks is None else min(int(max_kept_blocks), nb)
    if cap < 1:
        raise ValueError(f"max_kept_blocks must be >= 1, got {max_kept_blocks}")
    kw = dict(implementation=implementation, interpret=interpret)
    beta = _head_beta(beta, b, hq)
    lengths = store.lengths
    nvb = (lengths + bk - 1) // bk
    block_ok = jnp.arange(nb)[None, :] < nvb[:, None]  # [B, NB]

    m_lb, kept_idx, kept_count = kept_blocks(q, store, beta=beta, sink=sink, window=window, top_r=top_r,
                                             capacity=cap, rel_slack=rel_slack, **kw)
    overflow = jnp.any(kept_count > cap)

    def attend(block_idx):
        mask, m = dipr_range_mask(q, store.keys, block_idx, lengths, beta=beta, return_mask=with_mask, **kw)
        out, _ = sparse_decode_attention(
            q, store.keys, store.values, block_idx, lengths, m - beta,
            sink=sink, window=window, num_splits=num_splits, blocks_per_step=blocks_per_step,
            rounding_slack=rounding_slack, **kw,
        )
        dense_mask = _scatter_mask(mask, block_idx, nb, bk) if with_mask else None
        return out, m, dense_mask

    refined = jnp.int32(0)
    if single_pass and not with_mask:
        def optimistic():
            out1, _, mx = sparse_decode_attention(
                q, store.keys, store.values, kept_idx, lengths, m_lb - beta, sink=sink, window=window,
                num_splits=num_splits, return_max=True, blocks_per_step=blocks_per_step,
                rounding_slack=rounding_slack, **kw,
            )
            exact = jnp.all(mx == m_lb)
            o, m_ = jax.lax.cond(exact, lambda: (out1, mx), lambda: attend(kept_idx)[:2])
            return o, m_, (~exact).astype(jnp.int32)

        if cap == nb:
            out, m, refined = optimistic()
        else:
            all_idx = jnp.where(block_ok[:, None, :], jnp.arange(nb, dtype=jnp.int32), -1)
            all_idx = jnp.broadcast_to(all_idx, (b, hkv, nb))
            out, m, refined = jax.lax.cond(overflow, lambda: attend(all_idx)[:2] + (jnp.int32(0),), optimistic)
        dense_mask = None
    elif cap == nb:
        out, m, dense_mask = attend(kept_idx)
    else:
        all_idx = jnp.where(block_ok[:, None, :], jnp.arange(nb, dtype=jnp.int32), -1)
        all_idx = jnp.broadcast_to(all_idx, (b, hkv, nb))
        # Static shapes differ (C vs NB); both branches return dense-shaped results.
        out, m, dense_mask = jax.lax.cond(overflow, lambda: attend(all_idx), lambda: attend(kept_idx))
    blocks_kept = jnp.where(overflow, nvb[:, None], kept_count)
    keys_in_range = (
        jnp.sum(dense_mask, axis=-1, dtype=jnp.int32) if with_mask else jnp.full((b, hq), -1, jnp.int32)
    )
    stats = DiprStats(
        blocks_kept=blocks_kept.astype(jnp.int32),
        keys_in_range=keys_in_range,
        overflow=overflow.astype(jnp.int32),
        max_score=m,
        refined=refined,
    )
    return out, stats, dense_mask
