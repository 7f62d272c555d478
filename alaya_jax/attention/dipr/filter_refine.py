"""Exact DIPR over a :class:`~alaya_jax.store.kv_store.KVStore` by filter–refine over per-key codes
(docs/design.md §4).

For one decode query per head (query heads grouped over KV heads, GQA), three kernels a layer and two small
XLA ops (the query rotation before, the sum of the attend pass's partials after); no data-dependent branch,
no host sync:

1. **Filter** (``pallas_kernels.code_scan``, one pass over the 4-bit codes of every key, once for all
   query heads of a KV head): ``M_sw`` = exact max over the sink and window positions; per key an
   estimate ``ŝ`` from its code and a rigorous interval ``ŝ ± δ``; a key is a *candidate* when
   ``ŝ + δ ≥ M_sw − β`` for some query head of its group, and each split of the sequence lists its
   candidates. Every DIPR key is a candidate (``ŝ + δ ≥ s ≥ M − β ≥ M_sw − β``), and so is the
   arg-max unless it is a sink/window key: zero false negatives by construction. A split's list holds
   every key it covers, so no list can overflow.
2. **Score pass** (``pallas_kernels.refine_attention``): the exact scores of the candidates (each exact key
   gathered once); with ``M_sw`` they give the exact max ``M``.
3. **Attend pass**: the token mask ``s ≥ M − β`` over the candidates (with the rounding slack), sink and
   window always attended, V read only for the keys attended.

β may be a number or an array broadcastable to ``[B, Hq]`` (a β per query head).

Sharded along the sequence (``mesh``: docs/design.md §10, :mod:`alaya_jax.store.sharding`), the same pieces
run on every device over its shard inside one ``shard_map``: the forced maxima of all shards are reduced
(``lax.pmax``) into the lower bound ``M_lb`` before the scan, each shard scans its codes against
``M_lb − β``, the score pass's maxima are reduced into the one exact ``M`` before the attend pass, and the
attend pass's partial sums (all against that ``M``) are added over the devices (``lax.psum``). Three
collectives of [B, Hq] (or [B, Hq, D]) values a layer; no key or value leaves its device.

A filter (``key_mask`` [B, S]) restricts the query to part of the store: DIPR over the valid keys
in the filter or among the sink and window positions. The scan still reads every code; the
candidates outside the filter are then dropped from the lists (slot −1, which both refine backends
skip), so no such key is ever scored exactly, in range or attended; ``M_sw`` (sink and window,
inside the filter by definition) stays a lower bound of the filtered max.

With the estimated tail (``tail="estimate"``, :mod:`alaya_jax.attention.tail`) the scan also sums, per
split and query head, exp(ŝ/√D) and those weights times their block's mean value (``KVStore.value_means``)
over the keys that are not candidates, and stores the candidates' estimates; the attend pass adds the
candidates it rejects, weighed by the same estimates: the output is exact over DIPR ∪ sink ∪ window and
estimated over every other key (no filter yet; not on a sharded store yet: refused, docs/design.md §10).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from alaya_jax.attention.dipr.brute_force import check_beta
from alaya_jax.attention.masked import group_size, raw_scores
from alaya_jax.store import placement as placements
from alaya_jax.store import sharding
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.code_scan import code_scan
from pallas_kernels.code_scan.api import default_num_splits
from pallas_kernels.code_scan.reference import forced_scores
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.key_codes import hadamard
from pallas_kernels.refine_attention import refine_attention
from pallas_kernels.refine_attention.reference import normalise


@struct.dataclass
class DiprStats:
    candidates: jax.Array  # [B, Hkv] int32: keys whose code interval reached the range (refined exactly)
    keys_in_range: jax.Array  # [B, Hq] int32: |DIPR| (only when the mask was asked for, else -1)
    max_score: jax.Array  # [B, Hq] f32: the exact max raw score M


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
    """q [B, Hq, D] → the rotated queries f32 [B, Hq, D] (query head h belongs to KV head h // G).

    ``key_codes.rotate``'s arithmetic (f32 products of ±fl(1/√D)·x, f32 sums; the code's bound holds for
    any summation order) written as a product and a sum over D, so that XLA makes it one small fusion
    per layer rather than a matmul call and transposes."""
    b, hq, d = q.shape
    hkv = rot_signs.shape[0]
    g = group_size(hq, hkv)
    hm = jnp.asarray(hadamard(d) * (1.0 / d ** 0.5), jnp.float32)
    xs = q.astype(jnp.float32).reshape(b, hkv, g, d) * jnp.asarray(rot_signs, jnp.float32)[None, :, None, :]
    return jnp.sum(xs[..., :, None] * hm, axis=-2).reshape(b, hq, d)


def _frame_forced(frame: sharding.ShardFrame, s: int) -> jax.Array:
    """bool [B, S]: the shard's forced positions (its sink and window positions below its length)."""
    pos = jnp.arange(s)[None, :]
    n = frame.lengths[:, None]
    return (pos < n) & ((pos < frame.sinks[:, None]) | (pos >= n - frame.windows[:, None]))


def _pmax(x, axis_name):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _found_mask(q, keys, frame, cand_idx, cand_count, beta, *, axis_name) -> jax.Array:
    """bool [B, Hq, S]: the DIPR set as the search found it — over the listed candidates and the
    forced positions only, their scores recomputed in jnp (``raw_scores``), ``s ≥ max − β`` with
    the max over the same keys. A DIPR key that the scan failed to list is missing here, so
    comparing with brute force tests the search. Stats and tests only (gathers keys again). On a shard
    (``frame``, ``axis_name``) the max is reduced over the devices; the mask is the shard's positions."""
    b, hq, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = hq // hkv
    ns, cap = cand_idx.shape[2], cand_idx.shape[3]
    ok = ((jnp.arange(cap)[None, None, None, :] < cand_count[..., None]) & (cand_idx >= 0)).reshape(b, hkv, ns * cap)
    idx = jnp.where(ok, cand_idx.reshape(b, hkv, ns * cap), 0)
    ok_q = jnp.repeat(ok, g, axis=1)  # [B,Hq,N]
    sc_c = jnp.where(ok_q, raw_scores(q, jnp.take_along_axis(keys, idx[..., None], axis=2)), -jnp.inf)
    forced = _frame_forced(frame, s)  # [B,S]
    sc_f = raw_scores(q, jnp.where(forced[:, None, :, None], keys, jnp.zeros((), keys.dtype)))
    sc_f = jnp.where(forced[:, None, :], sc_f, -jnp.inf)
    m = _pmax(jnp.maximum(jnp.max(sc_c, axis=-1), jnp.max(sc_f, axis=-1)), axis_name)[..., None] - beta[..., None]
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
               num_splits: Optional[int] = None, rounding_slack: Optional[float] = None,
               implementation: str = "reference", interpret: Optional[bool] = None, forced=None, m_lb=None,
               keys: Optional[jax.Array] = None, tail: bool = False):
    """The filter stage alone: ``(cand_idx [B,Hkv,NS,L], cand_count [B,Hkv,NS], m_sw [B,Hq])`` for
    q [B, Hq, D] and β f32 [B, Hq] (see ``pallas_kernels.code_scan``; ``forced``, ``m_lb``: a shard's).
    ``keys``: the store's keys [B,Hkv,S,D] as the kernel takes them (default ``store.dense_keys()``, a
    device array); ``tail``: also the scan's part of the estimated tail (a ``ScanTail``), from the store's
    value means (on the device)."""
    b, hkv, s = store.batch, store.num_kv_heads, store.capacity
    ns = default_num_splits(b, hkv, s) if num_splits is None else int(num_splits)
    if ns < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    codes, scales, errs = store.dense_codes()
    keys = store.dense_keys() if keys is None else keys
    return code_scan(q, rotate_queries(q, store.rot_signs), keys, codes, scales, errs,
                     store.lengths, beta, sink=sink, window=window, num_splits=ns, rounding_slack=rounding_slack,
                     implementation=implementation, interpret=interpret, forced=forced, m_lb=m_lb,
                     value_means=store.value_means if tail else None, block_size=store.block_size if tail else None)


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
    refine_programs: Optional[int] = None,
    rounding_slack: Optional[float] = None,
    key_mask: Optional[jax.Array] = None,
    mesh: Optional[Mesh] = None,
    tail: str = "none",
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
      num_splits: splits of each sequence in the scan (default ``code_scan.api.default_num_splits``).
      refine_programs: programs per (batch row, KV head) of the refine (default
        ``refine_attention.api.default_programs``).
      rounding_slack: the refine's compare is ``s + rounding_slack·‖q‖₁·‖k‖∞ ≥ M − β`` (None:
        2·D·2^-24), so that a threshold taken from one computation never drops a key that
        another computation of the same score rounds just below it.
      key_mask: bool [B, S=capacity] or None: a filter (see the module docstring); the result is
        ``brute_force.dipr_attention(..., key_mask=key_mask)``.
      mesh: None, or the 1-D mesh (axis ``"seq"``) the store's blocks are sharded over
        (:mod:`alaya_jax.store.sharding`): the same result, computed shard by shard (module docstring).
      tail: "none" (exact sparse attention) or "estimate": the estimated tail over every searched key not
        attended (module docstring; not with a key_mask, not with a mesh).

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
    beta = _beta_heads(beta, b, hq)
    slack = default_rounding_slack(d) if rounding_slack is None else float(rounding_slack)
    if tail not in ("none", "estimate"):
        raise ValueError(f"filter-refine DIPR takes tail 'none' or 'estimate', got {tail!r}")
    if tail != "none" and key_mask is not None:
        raise ValueError("filter-refine DIPR with the estimated tail does not take a key_mask (a filter) yet: "
                         "use tail 'none' for a filtered query")
    if tail != "none" and mesh is not None:
        raise ValueError("the estimated tail is not supported on a sharded store yet (filter-refine DIPR with "
                         "tail 'estimate' and a mesh): each shard's scan sums are relative to its own forced "
                         "maximum M_sw, which only the shards holding sink or window positions have; use tail "
                         "'none' with several devices")
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, bool)
        if key_mask.shape != (b, s):
            raise ValueError(f"key_mask must be bool [B, S]={(b, s)}, got {tuple(key_mask.shape)}")
    shard = functools.partial(_dipr_shard, sink=sink, window=window, with_mask=with_mask, slack=slack,
                              implementation=implementation, interpret=interpret, num_splits=num_splits,
                              refine_programs=refine_programs, tail=tail != "none")
    if mesh is None:
        return shard(q, store, beta, key_mask, axis_name=None)
    sharding.check_shardable(store, mesh)
    seq = P(None, sharding.SEQ_AXIS)
    stats_spec = DiprStats(candidates=P(), keys_in_range=P(), max_score=P())
    return jax.shard_map(functools.partial(shard, axis_name=sharding.SEQ_AXIS), mesh=mesh,
                         in_specs=(P(), sharding.store_specs(store), P(), None if key_mask is None else seq),
                         out_specs=(P(), stats_spec, P(None, None, sharding.SEQ_AXIS) if with_mask else None),
                         check_vma=False)(q, store, beta, key_mask)


def _dipr_shard(q, store, beta, key_mask, *, axis_name, sink, window, with_mask, slack, implementation, interpret,
                num_splits, refine_programs, tail):
    """:func:`dipr_store_attention` over one shard (``axis_name`` None: the whole, unsharded store); the
    arguments are validated, β is [B, Hq]; ``tail``: the estimated tail (unsharded only)."""
    b, hq, _ = q.shape
    frame = sharding.shard_frame(store.lengths, store.capacity, sink=sink, window=window, axis_name=axis_name)
    local = sharding.local_view(store, frame)
    forced = (frame.sinks, frame.windows)
    kw = dict(implementation=implementation, interpret=interpret)
    # Placement (docs/design.md §3): a GPU Pallas kernel reads host-memory K / V rows where they lie,
    # only those it loads; every other backend gets device copies (whole-array transfers).
    if placements.reads_in_place(implementation, interpret):
        keys, values = local.dense_keys_in_place(), local.dense_values_in_place()
    else:
        keys, values = local.dense_keys(), local.dense_values()
    m_lb = None
    if axis_name is not None:  # M_lb: the forced maxima of every shard, before any shard scans
        _, _, s_f = forced_scores(q, keys, local.lengths, sink=sink, window=window, forced=forced)
        m_lb = jax.lax.pmax(jnp.max(s_f, axis=-1).reshape(b, hq), axis_name)
    cand_idx, cand_count, m_sw, *scan_tail = scan_codes(q, local, beta, sink=sink, window=window,
                                                        num_splits=num_splits, rounding_slack=slack, forced=forced,
                                                        m_lb=m_lb, keys=keys, tail=tail, **kw)
    if key_mask is not None:
        cand_idx = _drop_outside(cand_idx, key_mask)
    m_in = m_sw if m_lb is None else jnp.maximum(m_sw, m_lb)
    reduce = None if axis_name is None else functools.partial(jax.lax.pmax, axis_name=axis_name)
    tail_kw = {} if not scan_tail else dict(tail=scan_tail[0], value_means=local.value_means,
                                            block_size=local.block_size)
    o, l, _, m = refine_attention(q, keys, values, cand_idx, cand_count, m_in, local.lengths, beta,
                                  sink=sink, window=window, rounding_slack=slack, programs=refine_programs,
                                  forced=forced, max_reduce=reduce, partials=True, **kw, **tail_kw)
    if key_mask is None:
        listed = jnp.sum(cand_count, axis=-1, dtype=jnp.int32)
    else:  # the candidates kept in the filter
        slot = jnp.arange(cand_idx.shape[-1])
        listed = jnp.sum((slot < cand_count[..., None]) & (cand_idx >= 0), axis=(-2, -1), dtype=jnp.int32)
    if axis_name is not None:  # every shard attended with the one exact M: the partial sums add up
        o, l, listed = jax.lax.psum((o, l, listed), axis_name)
    out = normalise(o, l).astype(q.dtype)
    mask = None
    keys_in_range = jnp.full((b, hq), -1, jnp.int32)
    if with_mask:
        mask = _found_mask(q, local.dense_keys(), frame, cand_idx, cand_count, beta, axis_name=axis_name)
        keys_in_range = jnp.sum(mask, axis=-1, dtype=jnp.int32)
        if axis_name is not None:
            keys_in_range = jax.lax.psum(keys_in_range, axis_name)
    stats = DiprStats(candidates=listed, keys_in_range=keys_in_range, max_score=m)
    return out, stats, mask
