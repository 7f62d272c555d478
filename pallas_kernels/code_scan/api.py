"""Public wrapper: code_scan(q, q_rot, keys, codes, scales, errs, lengths, beta, *, ...).

``IMPLEMENTATIONS`` maps each backend name (``implementation=``) to the function that runs it on
validated arguments; it is the one list of the op's backends.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan.arithmetic import MAX_HEAD_DIM
from pallas_kernels.code_scan.layout import longest_split
from pallas_kernels.code_scan.reference import ScanTail, code_scan_reference
from pallas_kernels.common import (
    check_implementation, gqa_groups, group_rows, next_pow2, pad_axis, resolve_interpret, resolve_rounding_slack,
    score_operand_dtype, ungroup_rows,
)

#: keys per scan step (H200, bench/results/dipr_real_keys: 128 beat 64 and 256 at B=1 and B=8)
DEFAULT_TILE = 128
#: flags compacted per epilogue step (the list's slack: a split's list has room for this many more slots)
EPILOGUE_CHUNK = 1024
MIN_CAPACITY = 16


def scan_tile(capacity: int) -> int:
    """Keys per scan step for a store of ``capacity`` positions: DEFAULT_TILE, or the largest power of
    two <= capacity for smaller stores (the last tile is moved back to end at the capacity)."""
    c = max(int(capacity), MIN_CAPACITY)
    return min(DEFAULT_TILE, 1 << (c.bit_length() - 1))


def list_size(capacity: int, num_splits: int) -> int:
    """Slots of each split's candidate list: every key the split can cover, plus one epilogue chunk."""
    cap = max(int(capacity), MIN_CAPACITY)
    return longest_split(cap, num_splits, tile=scan_tile(cap)) + EPILOGUE_CHUNK


def default_num_splits(batch: int, num_kv_heads: int, capacity: int) -> int:
    """Splits per (batch row, KV head): a power of two giving at least 512 programs, and splits of at most
    4096 keys while that keeps the programs <= 1024 (H200: 64 at 128K B=1, 128 at 512K B=1, 16 at 128K
    B=8 were the fastest of the splits swept), never more splits than tiles."""
    heads = max(1, int(batch) * int(num_kv_heads))
    n = max(1, next_pow2(-(-512 // heads)))
    while capacity // n > 4096 and heads * n * 2 <= 1024:
        n *= 2
    return max(1, min(n, -(-max(int(capacity), MIN_CAPACITY) // scan_tile(capacity))))


def check_scan_args(op, q, keys, lengths, *, sink, window):
    """Validates q [B, Hq, D], keys [B, Hkv, S, D], lengths [B]; returns G."""
    if q.ndim != 3 or keys.ndim != 4 or q.shape[0] != keys.shape[0] or q.shape[-1] != keys.shape[-1]:
        raise ValueError(f"{op}: expected q [B, Hq, D] and keys [B, Hkv, S, D]; got q{tuple(q.shape)}, "
                         f"keys{tuple(keys.shape)}")
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be a power of two in [16, {MAX_HEAD_DIM}], got {d}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"{op}: lengths must be [B]={q.shape[0]}, got {tuple(lengths.shape)}")
    if int(sink) < 0 or int(window) < 0:
        raise ValueError(f"{op}: sink and window must be >= 0, got sink={sink}, window={window}")
    return gqa_groups(q.shape[1], keys.shape[1], op)


def code_scan(
    q: jax.Array,
    q_rot: jax.Array,
    keys: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    errs: jax.Array,
    lengths: jax.Array,
    beta,
    *,
    sink: int,
    window: int,
    num_splits: int,
    rounding_slack: Optional[float] = None,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    num_warps: int = 4,
    num_stages: int = 3,
    forced: Optional[tuple[jax.Array, jax.Array]] = None,
    m_lb: Optional[jax.Array] = None,
    value_means: Optional[jax.Array] = None,
    block_size: Optional[int] = None,
    sm_scale: Optional[float] = None,
):
    """Filter step of exact filter-refine DIPR: the candidate keys of each split, from the 4-bit codes.

    Args:
      q: [B, Hq, D] model dtype (exact forced scores); q_rot: f32 [B, Hq, D] = key_codes.rotate(q).
      keys: [B, Hkv, S, D]; codes uint8 [B, Hkv, S, D/2]; scales, errs f16 [B, Hkv, S]
        (key_codes.encode of the rotated keys). Contents past each length may be garbage/NaN.
      lengths: [B] int32 <= S; beta: f32 [B, Hq] (or broadcastable), >= 0, may be +inf.
      sink, window: forced positions p < sink and p >= length - window (scored exactly).
      num_splits: NS programs per (b, KV head), each over a contiguous tile-aligned part of the
        searched range [sink, length - window) (``layout.split_tiles`` with ``scan_tile(S)``).
      rounding_slack: σ of the refine's compare s + σ·‖q‖₁·‖k‖∞ >= M − β (None: 2·D·2^-24); the scan
        widens its bound and threshold by it (``arithmetic``) so that no key the refine attends is missed.
      num_warps, num_stages: Triton launch knobs (Pallas only).
      forced: None, or each row's own ``(sinks [B], windows [B])`` int32 forced counts, at most ``sink`` /
        ``window`` (the static bounds that size the forced tile): a shard of a sequence-sharded store
        (``alaya_jax.store.sharding.shard_frame``) has the sink only on its first shard and the window only
        where the sequence ends. None: ``sink`` and ``window`` for every row.
      m_lb: None, or f32 [B, Hq], a lower bound of M known from elsewhere (the other shards' forced maxima):
        the threshold is max(M_sw, m_lb) − β (still <= M − β: exact). None: M_sw alone.
      value_means: [B, Hkv, S / block_size, D] (any float dtype; the store keeps the values'), the store's
        mean value of each block of block_size keys, or None (a static switch: None runs the scan without
        the tail, the kernel exactly as before): also
        the estimated tail's part of the scan, a :class:`ScanTail` appended to the outputs (sm_scale: the
        softmax scale, None: 1/√D). Not with ``m_lb`` (refused): the tail's weights are relative to the
        row's own M_sw, which on a shard is the max over that shard's forced keys only.
    Returns:
      cand_idx i32 [B, Hkv, NS, list_size(S, NS)]: the split's candidates, ascending, in the first count
        slots (the other slots are undefined: -1 in the reference, never written by the kernel);
      cand_count i32 [B, Hkv, NS]: the number of candidates (a list holds every key of its split: it
        cannot overflow);
      m_sw f32 [B, Hq]: exact max raw score over the forced positions (-inf if none).
    A key is a candidate when est + δ >= thr for some query head of its group, where thr <= M_sw − β:
    every key the refine attends (and the arg-max, unless it is forced) is a candidate.
    """
    op = "code_scan"
    check_implementation(implementation, op, IMPLEMENTATIONS)
    check_scan_args(op, q, keys, lengths, sink=sink, window=window)
    b, hq, d = q.shape
    _, hkv, s_cap, _ = keys.shape
    if tuple(q_rot.shape) != tuple(q.shape):
        raise ValueError(f"{op}: q_rot{tuple(q_rot.shape)} must match q{tuple(q.shape)}")
    if tuple(codes.shape) != (b, hkv, s_cap, d // 2) or codes.dtype != jnp.uint8:
        raise ValueError(f"{op}: codes must be uint8 [B, Hkv, S, D/2]={(b, hkv, s_cap, d // 2)}, got "
                         f"{codes.dtype}{tuple(codes.shape)}")
    for name, x in (("scales", scales), ("errs", errs)):
        if tuple(x.shape) != (b, hkv, s_cap):
            raise ValueError(f"{op}: {name} must be [B, Hkv, S]={(b, hkv, s_cap)}, got {tuple(x.shape)}")
    if int(num_splits) < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    slack = resolve_rounding_slack(rounding_slack, d, op)
    lengths = jnp.asarray(lengths, jnp.int32)
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, hq))
    if value_means is not None and m_lb is not None:
        raise ValueError(f"{op}: the estimated tail (value_means) with m_lb is not supported: the tail's weights are "
                         "relative to the row's own forced maximum M_sw, and a lower bound of M from other shards "
                         "is not combined with it (the estimated tail is not supported on a sharded store yet)")
    forced = row_forced(forced, b, sink=sink, window=window, op=op)
    m_lb = jnp.full((b, hq), -jnp.inf, jnp.float32) if m_lb is None else jnp.broadcast_to(
        jnp.asarray(m_lb, jnp.float32), (b, hq))
    kw = dict(sink=int(sink), window=int(window), num_splits=int(num_splits), rounding_slack=slack, forced=forced,
              m_lb=m_lb)
    if value_means is not None:
        bk = 0 if block_size is None else int(block_size)
        if bk < 1 or s_cap % bk or tuple(value_means.shape) != (b, hkv, s_cap // bk, d):
            raise ValueError(f"{op}: value_means must be [B, Hkv, S / block_size, D] with block_size >= 1 dividing "
                             f"S={s_cap}; got value_means{tuple(value_means.shape)}, block_size={block_size}")
        kw.update(value_means=value_means, block_size=bk,
                  sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale))
    return IMPLEMENTATIONS[implementation](q, q_rot, keys, codes, scales, errs, lengths, beta, interpret=interpret,
                                           num_warps=num_warps, num_stages=num_stages, **kw)


def row_forced(forced, batch: int, *, sink: int, window: int, op: str) -> tuple[jax.Array, jax.Array]:
    """``(sinks [B], windows [B])`` int32: the rows' own forced counts (``forced``), or ``sink`` and
    ``window`` for every row when None."""
    if forced is None:
        return jnp.full((batch,), int(sink), jnp.int32), jnp.full((batch,), int(window), jnp.int32)
    sinks, windows = (jnp.asarray(x, jnp.int32) for x in forced)
    if tuple(sinks.shape) != (batch,) or tuple(windows.shape) != (batch,):
        raise ValueError(f"{op}: forced must be (sinks [B], windows [B]) with B={batch}, got shapes "
                         f"{tuple(sinks.shape)}, {tuple(windows.shape)}")
    return sinks, windows


def _scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, interpret, num_warps, num_stages,
                    num_splits, **kw):
    del interpret, num_warps, num_stages  # Pallas launch knobs
    s_cap = keys.shape[2]
    return code_scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, num_splits=num_splits,
                               tile=scan_tile(s_cap), list_size=list_size(s_cap, num_splits), **kw)


def _scan_pallas(q, q_rot, keys, codes, scales, errs, lengths, beta, *, interpret, num_warps, num_stages,
                 num_splits, sink, window, rounding_slack, forced, m_lb, **tail_kw):
    interpret = resolve_interpret(interpret, "code_scan")
    from pallas_kernels.code_scan.kernel_triton import scan_pallas

    b, hq, d = q.shape
    hkv, s_cap = keys.shape[1], keys.shape[2]
    g = hq // hkv
    if s_cap < MIN_CAPACITY:  # tiny stores only: the tile must fit in the store (padded on the device: keys
        # may lie in pinned host memory, which the kernel otherwise reads in place, untouched by jnp)
        if tail_kw:
            raise ValueError(f"code_scan: the estimated tail needs a store of >= {MIN_CAPACITY} positions, got {s_cap}")
        keys, codes, scales, errs = (pad_axis(jax.device_put(x, jax.memory.Space.Device), 2, MIN_CAPACITY)
                                     for x in (keys, codes, scales, errs))
    qdt = score_operand_dtype(q.dtype, keys.dtype, "auto")
    _, cand_idx, counts, m_sw, *tail = scan_pallas(
        lengths, *forced, group_rows(q.astype(qdt), hkv), group_rows(q_rot.astype(jnp.float32), hkv),
        group_rows(beta, hkv), group_rows(m_lb, hkv, value=-jnp.inf), keys, codes, scales, errs, g=g, sink=sink,
        window=window, tile=scan_tile(s_cap), num_splits=num_splits,
        list_size=list_size(s_cap, num_splits), chunk=EPILOGUE_CHUNK, rounding_slack=rounding_slack,
        interpret=interpret, num_warps=int(num_warps), num_stages=int(num_stages), **tail_kw)
    if not tail:
        return cand_idx, counts, ungroup_rows(m_sw, g)
    return cand_idx, counts, ungroup_rows(m_sw, g), ScanTail(*tail)


#: The backends of ``code_scan`` by name: "reference" (plain jnp), "pallas" (the Triton-lowered kernel;
#: interpret mode on the CPU).
IMPLEMENTATIONS = MappingProxyType({"reference": _scan_reference, "pallas": _scan_pallas})
