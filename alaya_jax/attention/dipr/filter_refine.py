"""Exact DIPR over a :class:`~alaya_jax.store.kv_store.KVStore` by filter–refine over per-key codes
(docs/design.md §4).

For one decode query per head (query heads grouped over KV heads, GQA):

1. **Filter** (``pallas_kernels.code_scan``, one pass over the 4-bit codes of every key,
   once for all query heads of a KV head): ``M_sw`` = exact max over the sink and window
   positions; per key an estimate ``ŝ`` from its code and a rigorous interval ``ŝ ± δ``;
   a key is a *candidate* when ``ŝ + δ ≥ M_sw − β`` for some query head of its group.
   Every DIPR key is a candidate (``ŝ + δ ≥ s ≥ M − β ≥ M_sw − β``), and so is the
   arg-max unless it is a sink/window key: zero false negatives by construction. The scan
   also returns the per-split max of ``ŝ − δ``, a lower bound of ``M``.
2. **Max pass** (``pallas_kernels.refine_attention.refine_max``): the exact scores of the candidates (their
   exact keys gathered, no values) and of sink and window give the exact ``M`` — the
   arg-max is always a candidate or forced.
3. **Refine and attend** (``pallas_kernels.refine_attention``): exact scores of the
   candidates again, token mask ``s ≥ M − β``, V read only for the keys in range, sink and
   window always attended, splits merged by log-sum-exp. ``DiprStats.refined`` counts the
   steps where ``M`` exceeded the scan's lower bound ``M_lb = max(M_sw, max ŝ − δ)`` (a
   one-pass refine with ``M_lb`` would have had to run twice).

Candidate lists live in buffers ``[B, Hkv, splits, capacity]``. With the default
``capacity_fraction`` 1.0 a split's list holds all its keys: it cannot overflow, and the
step is three kernels and a few small XLA ops with no data-dependent branch (no ``lax.cond``:
on a GPU each costs a device-to-host sync). With a smaller fraction, a split with more
candidates than ``capacity`` — typically because the arg-max lies outside sink and window,
so ``M_sw`` is a loose threshold — makes the codes be scanned again with the threshold
``M_lb − β`` (``DiprStats.rescanned``); if a list still overflows, the step takes the exact
dense path (brute force over every valid key) for the whole batch — never a silent drop —
and counts it in ``DiprStats.overflow``.

β may be a number or an array broadcastable to ``[B, Hq]`` (a β per query head).

A filter (``key_mask`` [B, S]) restricts the query to part of the store: DIPR over the valid keys
in the filter or among the sink and window positions. The scan still reads every code; the
candidates outside the filter are then dropped from the lists (slot −1, which both refine backends
skip), so no such key is ever scored exactly, in range or attended; ``M_sw`` (sink and window,
inside the filter by definition) stays a lower bound of the filtered max, and the scan's
``max ŝ − δ`` (over every key) is not used.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from alaya_jax.attention.dipr.brute_force import check_beta, dipr_attention, range_mask_from_scores
from alaya_jax.attention.masked import group_size, raw_scores, sink_window_mask
from alaya_jax.store import placement as placements
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.code_scan import code_scan
from pallas_kernels.code_scan.api import DEFAULT_TILE
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.key_codes import rotate
from pallas_kernels.refine_attention import refine_attention, refine_max

#: Default candidate capacity, as a fraction of each split's keys: 1.0, every key fits, so no
#: list can overflow and the step needs no ``lax.cond``. Candidates are 1–5% of the keys on
#: the real-key proxy (bench/results/dipr_real_keys/dipr_real_keys.md) but crowd into the most recent split
#: (42% of its keys at 2K); the buffer is B·Hkv·S int32 and only the first ``count`` slots
#: of a split are ever written or read.
DEFAULT_CAPACITY_FRACTION = 1.0


@struct.dataclass
class DiprStats:
    candidates: jax.Array  # [B, Hkv] int32: keys whose code interval reached the range (refined exactly)
    keys_in_range: jax.Array  # [B, Hq] int32: |DIPR| (only when the mask was asked for, else -1)
    overflow: jax.Array  # [] int32: 1 if this step took the dense path (a candidate list overflowed)
    max_score: jax.Array  # [B, Hq] f32: the exact max raw score M
    refined: jax.Array  # [] int32: 1 if M > M_lb for some head (a one-pass refine with M_lb would re-run)
    rescanned: jax.Array  # [] int32: 1 if the first scan overflowed and the codes were scanned again


def default_num_splits(batch: int, num_kv_heads: int, capacity: int, *, programs: int = 256,
                       min_keys: int = 512) -> int:
    """Splits of the sequence per (batch, KV head): enough programs to fill a GPU
    (``programs``), each split at least ``min_keys`` positions; a power of two."""
    want = max(1, -(-programs // max(1, batch * num_kv_heads)))
    cap = max(1, capacity // min_keys)
    n = 1
    while n * 2 <= min(want, cap):
        n *= 2
    return n


def split_capacity(capacity: int, num_splits: int, fraction: float, *, tile: int = DEFAULT_TILE) -> int:
    """Candidate slots per split: ``fraction`` of the most positions one split can scan (splits
    are whole tiles of ``tile`` keys, balanced by tiles), at least 16."""
    return max(16, int(math.ceil(longest_split(capacity, num_splits, tile=tile) * fraction)))


def longest_split(capacity: int, num_splits: int, *, tile: int = DEFAULT_TILE) -> int:
    """The most positions one split can hold (its list cannot overflow at this capacity)."""
    tiles = -(-capacity // tile) + 1  # the tile cover of [sink, end) within [0, capacity)
    return min(capacity, -(-tiles // num_splits) * tile)


def _beta_heads(beta, b: int, hq: int) -> jax.Array:
    """β as f32 [B, Hq] (a number, [Hq], [B, Hq] or anything broadcastable to it)."""
    beta = jnp.asarray(beta, jnp.float32)
    if beta.ndim > 2:
        raise ValueError(f"beta must be a number or broadcastable to [B={b}, Hq={hq}], got shape {beta.shape}")
    try:
        return jnp.broadcast_to(beta, (b, hq))
    except ValueError:
        raise ValueError(f"beta of shape {beta.shape} does not broadcast to [B={b}, Hq={hq}]") from None


def rotate_queries(q: jax.Array, rot_signs: jax.Array) -> jax.Array:
    """q [B, Hq, D] → the rotated queries f32 [B, Hq, D] (query head h belongs to KV head h // G)."""
    b, hq, d = q.shape
    hkv = rot_signs.shape[0]
    g = group_size(hq, hkv)
    qg = q.reshape(b, hkv, g, d).transpose(0, 2, 1, 3)  # [B, G, Hkv, D]
    return rotate(qg, rot_signs).transpose(0, 2, 1, 3).reshape(b, hq, d)


def _found_mask(q, keys, lengths, cand_idx, cand_count, beta, *, sink: int, window: int) -> jax.Array:
    """bool [B, Hq, S]: the DIPR set as the search found it — over the listed candidates and the
    forced positions only, their scores recomputed in jnp (``raw_scores``), ``s ≥ max − β`` with
    the max over the same keys. A DIPR key that the scan failed to list is missing here, so
    comparing with brute force tests the search. Stats and tests only (gathers keys again)."""
    b, hq, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    ns, cap = cand_idx.shape[2], cand_idx.shape[3]
    ok = ((jnp.arange(cap)[None, None, None, :] < cand_count[..., None]) & (cand_idx >= 0)).reshape(b, hkv, ns * cap)
    idx = jnp.where(ok, cand_idx.reshape(b, hkv, ns * cap), 0)
    ok_q = jnp.repeat(ok, g, axis=1)  # [B,Hq,N]
    sc_c = jnp.where(ok_q, raw_scores(q, jnp.take_along_axis(keys, idx[..., None], axis=2)), -jnp.inf)
    valid = jnp.arange(s)[None, :] < lengths[:, None]
    forced = sink_window_mask(lengths, s, sink=sink, window=window) & valid  # [B,S]
    sc_f = raw_scores(q, jnp.where(forced[:, None, :, None], keys, jnp.zeros((), keys.dtype)))
    sc_f = jnp.where(forced[:, None, :], sc_f, -jnp.inf)
    m = jnp.maximum(jnp.max(sc_c, axis=-1), jnp.max(sc_f, axis=-1))[..., None] - beta[..., None]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hq)[None, :, None]
    listed = jnp.zeros((b, hq, s), bool).at[bi, hi, jnp.repeat(idx, g, axis=1)].max(ok_q & (sc_c >= m))
    return listed | (forced[:, None, :] & (sc_f >= m))


def _drop_outside(cand_idx: jax.Array, key_mask: jax.Array) -> jax.Array:
    """cand_idx [B,Hkv,NS,C] with every candidate outside ``key_mask`` [B,S] set to −1 (not listed)."""
    b, hkv, ns, cap = cand_idx.shape
    idx = jnp.clip(cand_idx, 0, key_mask.shape[1] - 1).reshape(b, hkv * ns * cap)
    inside = jnp.take_along_axis(key_mask, idx, axis=1).reshape(cand_idx.shape)
    return jnp.where(inside, cand_idx, -1)


def scan_codes(q: jax.Array, store: KVStore, beta: jax.Array, *, sink: int, window: int,
               num_splits: Optional[int] = None, capacity_fraction: float = DEFAULT_CAPACITY_FRACTION,
               implementation: str = "reference", interpret: Optional[bool] = None,
               keys: Optional[jax.Array] = None):
    """The filter stage alone: ``(cand_idx [B,Hkv,NS,C], cand_count [B,Hkv,NS], lb_max [B,Hq,NS],
    m_sw [B,Hq], C, no_overflow)`` for q [B, Hq, D] and β f32 [B, Hq] (see
    ``pallas_kernels.code_scan``); ``no_overflow`` (a Python bool): C holds every key of a split.
    ``keys``: the store's keys [B,Hkv,S,D] as the kernels take them (default ``store.dense_keys()``)."""
    b, hkv, s = store.batch, store.num_kv_heads, store.capacity
    ns = default_num_splits(b, hkv, s) if num_splits is None else int(num_splits)
    if ns < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    cap = split_capacity(s, ns, capacity_fraction)
    codes, scales, errs = store.dense_codes()
    keys = store.dense_keys() if keys is None else keys
    out = code_scan(q, rotate_queries(q, store.rot_signs), keys, codes, scales, errs,
                    store.lengths, beta, sink=sink, window=window, num_splits=ns, capacity=cap,
                    implementation=implementation, interpret=interpret)
    return (*out, cap, cap >= longest_split(s, ns))


def dipr_store_attention(
    q: jax.Array,
    store: KVStore,
    *,
    beta,
    sink: int = 4,
    window: int = 64,
    with_mask: bool = False,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    num_splits: Optional[int] = None,
    capacity_fraction: float = DEFAULT_CAPACITY_FRACTION,
    rounding_slack: Optional[float] = None,
    key_mask: Optional[jax.Array] = None,
):
    """Exact DIPR ∪ sink ∪ window attention over a store by filter–refine.

    Args:
      q: [B, Hq, D] (Hq a multiple of the store's Hkv).
      store: the layer's KVStore (keys, values and their codes).
      beta: the range, a number or broadcastable to [B, Hq] (may be traced; ≥ 0, inf allowed).
      sink, window: positions p < sink and p ≥ length − window are always attended.
      with_mask: also return the DIPR token mask bool [B, Hq, S=capacity] (sink/window not
        included unless in range) and count ``keys_in_range``.
      implementation: "reference" (plain jnp) or "pallas" (``interpret`` None: True on CPU).
      num_splits: splits of each sequence (default :func:`default_num_splits`).
      capacity_fraction: candidate slots per split, as a fraction of the split's keys.
      rounding_slack: the refine's compare is ``s + rounding_slack·‖q‖₁·‖k‖∞ ≥ M − β`` (None:
        2·D·2^-24), so that a threshold taken from one computation never drops a key that
        another computation of the same score rounds just below it.
      key_mask: bool [B, S=capacity] or None: a filter (see the module docstring); the result is
        ``brute_force.dipr_attention(..., key_mask=key_mask)``. With it an overflowing list takes
        the dense path at once (no re-scan: the scan's lower bound covers keys outside the filter).

    Returns:
      ``(out [B, Hq, D] in q's dtype, stats: DiprStats, mask or None)``.
    """
    if q.ndim != 3:
        raise ValueError(f"q [B,Hq,D] must have 3 dims, got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    if (b, d) != (store.batch, store.head_dim):
        raise ValueError(f"q [B,Hq,D]={tuple(q.shape)} does not match the store (B={store.batch}, D={store.head_dim})")
    hkv, s = store.num_kv_heads, store.capacity
    group_size(hq, hkv)
    check_beta(beta)
    if not 0.0 < capacity_fraction <= 1.0:
        raise ValueError(f"capacity_fraction must be in (0, 1], got {capacity_fraction}")
    beta = _beta_heads(beta, b, hq)
    slack = default_rounding_slack(d) if rounding_slack is None else float(rounding_slack)
    kw = dict(implementation=implementation, interpret=interpret)
    lengths = store.lengths
    # Placement (docs/design.md §3): a GPU Pallas kernel reads host-memory K / V rows where they lie,
    # only those it loads; every other backend gets device copies (whole-array transfers).
    if placements.reads_in_place(implementation, interpret):
        keys, values = store.dense_keys_in_place(), store.dense_values_in_place()
    else:
        keys, values = store.dense_keys(), store.dense_values()
    scan = functools.partial(scan_codes, q, store, sink=sink, window=window, num_splits=num_splits,
                             capacity_fraction=capacity_fraction, keys=keys, **kw)
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, bool)
        if key_mask.shape != (b, s):
            raise ValueError(f"key_mask must be bool [B, S]={(b, s)}, got {tuple(key_mask.shape)}")
        unfiltered = scan

        def scan(beta):
            cand_idx, *rest = unfiltered(beta)
            return (_drop_outside(cand_idx, key_mask), *rest)
    cand_idx, cand_count, lb_max, m_sw, cap, no_overflow = scan(beta)
    m_lb = m_sw if key_mask is not None else jnp.maximum(m_sw, jnp.max(lb_max, axis=-1))

    def visible():  # bool [B, S]: the keys the query may see (valid, and in the filter or forced)
        valid = jnp.arange(s)[None, :] < lengths[:, None]
        if key_mask is None:
            return valid
        return valid & (key_mask | sink_window_mask(lengths, s, sink=sink, window=window))

    def filter_refine(cand_idx, cand_count):
        m = refine_max(q, keys, cand_idx, cand_count, lengths, sink=sink, window=window, **kw)
        out, m_seen, _ = refine_attention(q, keys, values, cand_idx, cand_count, lengths, m, beta, sink=sink,
                                          window=window, rounding_slack=slack, **kw)
        return out, m_seen, jnp.any(m > m_lb).astype(jnp.int32)

    if no_overflow:  # every split's list holds all its keys: no branch
        rescanned = overflow = jnp.zeros((), bool)
        out, m, refined = filter_refine(cand_idx, cand_count)
    else:
        # With a filter the scan's lower bound M_lb covers keys outside it: no re-scan.
        rescanned = jnp.any(cand_count > cap) if key_mask is None else jnp.zeros((), bool)

        def rescan():
            # The first scan's threshold was M_sw − β (sink and window only); M_lb ≥ M_sw is known now.
            # Scanning with β' = β − (M_lb − M_sw) makes the kernel's threshold ≤ M_lb − β ≤ M − β:
            # still exact, usually far tighter when the arg-max lies outside sink and window.
            shift = jnp.where(jnp.isfinite(m_sw) & jnp.isfinite(m_lb), m_lb - m_sw, 0.0)
            return scan(beta - shift)[:2]

        cand_idx, cand_count = jax.lax.cond(rescanned, rescan, lambda: (cand_idx, cand_count))
        overflow = jnp.any(cand_count > cap)

        def dense():
            keys = store.dense_keys()  # device copies of host fields: this branch is jnp
            kd, vd = jnp.swapaxes(keys, 1, 2), jnp.swapaxes(store.dense_values(), 1, 2)  # [B,S,Hkv,D]
            out = dipr_attention(q, kd, vd, beta=beta[..., None], lengths=lengths, sink=sink, window=window,
                                 rounding_slack=slack, key_mask=key_mask)
            sc = raw_scores(q, keys)
            m = jnp.max(jnp.where(visible()[:, None, :], sc, -jnp.inf), axis=-1)
            return out.astype(q.dtype), m, jnp.int32(0)

        out, m, refined = jax.lax.cond(overflow, dense, lambda: filter_refine(cand_idx, cand_count))
    mask = None
    keys_in_range = jnp.full((b, hq), -1, jnp.int32)
    if with_mask:
        def dense_mask():  # overflow: the brute-force mask
            return range_mask_from_scores(raw_scores(q, store.dense_keys()), visible(), beta[..., None])

        def found():
            return _found_mask(q, store.dense_keys(), lengths, cand_idx, cand_count, beta, sink=sink,
                               window=window)

        mask = found() if no_overflow else jax.lax.cond(overflow, dense_mask, found)
        keys_in_range = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    valid_count = jnp.broadcast_to(lengths[:, None], (b, hkv))
    if key_mask is None:
        listed = jnp.sum(cand_count, axis=-1)
    else:  # the candidates kept in the filter
        slot = jnp.arange(cand_idx.shape[-1])
        listed = jnp.sum((slot < cand_count[..., None]) & (cand_idx >= 0), axis=(-2, -1))
    candidates = jnp.where(overflow, valid_count, listed)
    stats = DiprStats(candidates=candidates.astype(jnp.int32), keys_in_range=keys_in_range,
                      overflow=overflow.astype(jnp.int32), max_score=m, refined=refined,
                      rescanned=rescanned.astype(jnp.int32))
    return out, stats, mask
