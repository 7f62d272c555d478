"""Public wrapper: code_scan(q, q_rot, keys, codes, scales, errs, lengths, beta, *, ...).

``IMPLEMENTATIONS`` maps each backend name (``implementation=``) to the function that runs
it on validated arguments; it is the one list of the op's backends.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan.reference import code_scan_reference
from pallas_kernels.common import (
    check_implementation, gqa_groups, next_pow2, pad_axis, query_slack, resolve_interpret,
    resolve_rounding_slack, score_operand_dtype,
)
from pallas_kernels.key_codes import estimate_operand, query_norms

DEFAULT_TILE = 64  # keys per scan step; H200 sweep (bench/results/kernels_codes_gpu/kernels_codes_gpu.md): 64 fastest


def check_scan_args(op, q, keys, lengths, *, sink, window, num_splits):
    """Validates q [B, Hq, D], keys [B, Hkv, S, D], lengths [B]; returns G."""
    if q.ndim != 3 or keys.ndim != 4 or q.shape[0] != keys.shape[0] or q.shape[-1] != keys.shape[-1]:
        raise ValueError(f"{op}: expected q [B, Hq, D] and keys [B, Hkv, S, D]; got q{tuple(q.shape)}, "
                         f"keys{tuple(keys.shape)}")
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"{op}: head dim must be a power of two >= 16, got {d}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"{op}: lengths must be [B]={q.shape[0]}, got {tuple(lengths.shape)}")
    if int(sink) < 0 or int(window) < 0:
        raise ValueError(f"{op}: sink and window must be >= 0, got sink={sink}, window={window}")
    if int(num_splits) < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    return gqa_groups(q.shape[1], keys.shape[1], op)


def forced_size(sink: int, window: int) -> int:
    """Padded count of forced positions scored per program (>= 16 for tl.dot)."""
    return max(16, next_pow2(int(sink) + int(window)))


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
    capacity: int,
    tile_size: int = DEFAULT_TILE,
    rounding_slack: Optional[float] = None,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    num_warps: int = 4,
    num_stages: int = 3,
):
    """Filter step of exact filter-refine DIPR: candidate keys of each split, from the 4-bit codes.

    Args:
      q: [B, Hq, D] model dtype (exact forced scores); q_rot: f32 [B, Hq, D] = key_codes.rotate(q).
      keys: [B, Hkv, S, D]; codes uint8 [B, Hkv, S, D/2]; scales, errs f16 [B, Hkv, S]
        (key_codes.encode of the rotated keys). Contents past each length may be garbage/NaN.
      lengths: [B] int32 <= S; beta: f32 [B, Hq] (or broadcastable), >= 0, may be +inf.
      sink, window: forced positions p < sink and p >= length - window (scored exactly).
      num_splits: NS programs per (b, KV head), each over a contiguous tile-aligned part of the
        searched range [sink, length - window), balanced by each sequence's own length.
      capacity: candidate slots per split; more candidates are counted, not kept.
      tile_size: keys per scan step (a power of two); the split layout depends on it, so a
        reference and a kernel compared with each other must use the same value.
      rounding_slack: the candidate threshold is max_f(s_f - slack·‖q‖₁·‖k_f‖∞) - β (a lower
        bound of the forced max under any summation order); None: 2·D·2^-24.
      num_warps, num_stages: Triton launch knobs (Pallas only).
    Returns:
      cand_idx i32 [B, Hkv, NS, capacity]: candidates of the split, ascending, in the first
        min(count, capacity) slots; the other slots are undefined (-1 in the reference, never
        written by the kernel): read them by the count;
      cand_count i32 [B, Hkv, NS]: the TRUE count (> capacity means overflow);
      lb_max f32 [B, Hq, NS]: max over the split's searched keys of est - δ (-inf if none);
      m_sw f32 [B, Hq]: exact max raw score over the forced positions (-inf if none).
    """
    op = "code_scan"
    check_implementation(implementation, op, IMPLEMENTATIONS)
    check_scan_args(op, q, keys, lengths, sink=sink, window=window, num_splits=num_splits)
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
    tile = int(tile_size)
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"{op}: tile_size must be a power of two >= 16, got {tile_size}")
    if int(capacity) < 1:
        raise ValueError(f"{op}: capacity must be >= 1, got {capacity}")
    slack = resolve_rounding_slack(rounding_slack, d, op)
    lengths = jnp.asarray(lengths, jnp.int32)
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, hq))
    kw = dict(sink=int(sink), window=int(window), num_splits=int(num_splits), capacity=int(capacity))
    return IMPLEMENTATIONS[implementation](q, q_rot, keys, codes, scales, errs, lengths, beta, tile_size=tile,
                                           rounding_slack=slack, interpret=interpret, num_warps=num_warps,
                                           num_stages=num_stages, **kw)


def _scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, *, interpret, num_warps, num_stages, **kw):
    del interpret, num_warps, num_stages  # Pallas launch knobs
    return code_scan_reference(q, q_rot, keys, codes, scales, errs, lengths, beta, **kw)


def _scan_pallas(q, q_rot, keys, codes, scales, errs, lengths, beta, *, interpret, num_warps, num_stages, **kw):
    interpret = resolve_interpret(interpret, "code_scan")
    from pallas_kernels.code_scan.kernel_triton import code_scan_pallas

    args, static = pallas_scan_inputs(q, q_rot, keys, codes, scales, errs, lengths, beta, **kw)
    cidx, counts, lb, msw = code_scan_pallas(*args, interpret=interpret, num_warps=int(num_warps),
                                             num_stages=int(num_stages), **static)
    return unpack_scan_outputs(cidx, counts, lb, msw, g=static["g"])


#: The backends of ``code_scan`` by name: "reference" (plain jnp), "pallas" (the Triton-lowered kernel;
#: interpret mode on the CPU).
IMPLEMENTATIONS = MappingProxyType({"reference": _scan_reference, "pallas": _scan_pallas})


def pallas_scan_inputs(q, q_rot, keys, codes, scales, errs, lengths, beta, *, sink, window, num_splits, capacity,
                       tile_size, rounding_slack):
    """The kernel's operands (group rows padded to Gp >= 16, S padded to the tile only when needed)
    and static knobs: ``code_scan_pallas(*args, interpret=..., **static)``. Validated inputs only."""
    b, hq, d = q.shape
    hkv, s_cap = keys.shape[1], keys.shape[2]
    g = hq // hkv
    gp = max(16, next_pow2(g))
    sp = -(-s_cap // tile_size) * tile_size  # no copy when S is already a multiple of the tile

    def grp(x, value=0.0):  # [B, Hq, ...] -> [B, Hkv, Gp, ...]
        return pad_axis(x.reshape(b, hkv, g, *x.shape[2:]), 2, gp, value=value)

    q_rot = q_rot.astype(jnp.float32)
    q16, qs = estimate_operand(q_rot)
    l1, l2 = query_norms(q_rot)
    qdt = score_operand_dtype(q.dtype, keys.dtype, "auto")
    args = (jnp.asarray(lengths, jnp.int32), grp(q.astype(qdt)), grp(query_slack(q, rounding_slack)), grp(q16),
            grp(qs), grp(l1), grp(l2), grp(jnp.asarray(beta, jnp.float32)), pad_axis(keys, 2, sp),
            pad_axis(codes, 2, sp), pad_axis(scales, 2, sp), pad_axis(errs, 2, sp))
    static = dict(g=g, sink=int(sink), window=int(window), tile=int(tile_size), num_splits=int(num_splits),
                  capacity=int(capacity), fsize=forced_size(sink, window))
    return args, static


def unpack_scan_outputs(cidx, counts, lb, msw, *, g):
    """Kernel outputs -> (cand_idx, cand_count, lb_max [B, Hq, NS], m_sw [B, Hq])."""
    b, hkv, ns = counts.shape
    lb_max = jnp.moveaxis(lb[..., :g], 2, 3).reshape(b, hkv * g, ns)
    return cidx, counts, lb_max, msw[:, :, 0, :g].reshape(b, hkv * g)
