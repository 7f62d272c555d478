"""Public wrappers: refine_attention(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, *, ...)
and its max pass refine_max(q, keys, cand_idx, cand_count, lengths, *, ...).

``IMPLEMENTATIONS`` (refine_attention) and ``MAX_IMPLEMENTATIONS`` (refine_max) map each backend
name (``implementation=``) to the function that runs it on validated arguments.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.code_scan.api import check_scan_args, forced_size
from pallas_kernels.common import (
    check_implementation, next_pow2, pad_axis, query_slack, resolve_interpret, resolve_rounding_slack,
    score_operand_dtype,
)
from pallas_kernels.lse_merge import merge_attention
from pallas_kernels.refine_attention.reference import (refine_attention_reference, refine_mask_reference,
                                                      refine_max_reference)

DEFAULT_CHUNK = 64


def _check(op, q, keys, values, cand_idx, cand_count, lengths, m_base, *, sink, window):
    check_scan_args(op, q, keys, lengths, sink=sink, window=window, num_splits=1)
    if values is not None and values.shape != keys.shape:
        raise ValueError(f"{op}: values{tuple(values.shape)} must match keys{tuple(keys.shape)}")
    b, hq, _ = q.shape
    hkv = keys.shape[1]
    if cand_idx.ndim != 4 or tuple(cand_idx.shape[:2]) != (b, hkv):
        raise ValueError(f"{op}: cand_idx must be [B, Hkv, NS, capacity] with B, Hkv = {(b, hkv)}, "
                         f"got {tuple(cand_idx.shape)}")
    if tuple(cand_count.shape) != tuple(cand_idx.shape[:3]):
        raise ValueError(f"{op}: cand_count must be [B, Hkv, NS]={tuple(cand_idx.shape[:3])}, "
                         f"got {tuple(cand_count.shape)}")
    if tuple(m_base.shape) != (b, hq):
        raise ValueError(f"{op}: m_base must be [B, Hq]={(b, hq)}, got {tuple(m_base.shape)}")


def refine_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    cand_idx: jax.Array,
    cand_count: jax.Array,
    lengths: jax.Array,
    m_base: jax.Array,
    beta,
    *,
    sink: int,
    window: int,
    sm_scale: Optional[float] = None,
    rounding_slack: Optional[float] = None,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    chunk: int = DEFAULT_CHUNK,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Refine and attend: exact DIPR attention over forced positions ∪ in-range candidates.

    Args:
      q: [B, Hq, D]; keys, values: [B, Hkv, S, D] (garbage/NaN past each length).
      cand_idx: i32 [B, Hkv, NS, capacity], cand_count: i32 [B, Hkv, NS] (code_scan's outputs;
        the first min(count, capacity) slots of each split are read; candidates must be distinct,
        valid and not forced).
      lengths: [B] int32; m_base: f32 [B, Hq] threshold base (M_lb first, the exact M on a re-run);
      beta: f32 [B, Hq] (or broadcastable), may be +inf.
      A candidate is attended when s + rounding_slack·‖q‖₁·‖k‖∞ >= m_base - β (None: 2·D·2^-24).
      chunk: candidate slots per gather step (Pallas; a power of two >= 16).
    Returns:
      out [B, Hq, D] (q dtype), m_seen f32 [B, Hq] (max exact score over forced ∪ all listed
      candidates; -inf if none), n_attended i32 [B, Hq] (forced included).
      If m_seen == m_base for every head the threshold used was M - β: the output is exact DIPR
      attention; otherwise re-run with m_base = m_seen.
    """
    op = "refine_attention"
    check_implementation(implementation, op, IMPLEMENTATIONS)
    _check(op, q, keys, values, cand_idx, cand_count, lengths, m_base, sink=sink, window=window)
    b, hq, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    slack = resolve_rounding_slack(rounding_slack, d, op)
    lengths = jnp.asarray(lengths, jnp.int32)
    cand_idx = jnp.asarray(cand_idx, jnp.int32)
    cand_count = jnp.asarray(cand_count, jnp.int32)
    m_base = jnp.asarray(m_base, jnp.float32)
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, hq))
    return IMPLEMENTATIONS[implementation](q, keys, values, cand_idx, cand_count, lengths, m_base, beta,
                                           sink=int(sink), window=int(window), sm_scale=sm_scale,
                                           rounding_slack=slack, interpret=interpret, chunk=chunk,
                                           num_warps=num_warps, num_stages=num_stages)


def _refine_reference(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, *, sink, window, sm_scale,
                      rounding_slack, interpret, chunk, num_warps, num_stages):
    del interpret, chunk, num_warps, num_stages  # Pallas knobs
    return refine_attention_reference(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, sink=sink,
                                      window=window, sm_scale=sm_scale, rounding_slack=rounding_slack)


def _refine_pallas(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, *, sink, window, sm_scale,
                   rounding_slack, interpret, chunk, num_warps, num_stages):
    op = "refine_attention"
    interpret = resolve_interpret(interpret, op)
    from pallas_kernels.refine_attention.kernel_triton import refine_attention_pallas

    r = int(chunk)
    if r < 16 or r & (r - 1):
        raise ValueError(f"{op}: chunk must be a power of two >= 16, got {chunk}")
    args, static = pallas_refine_inputs(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, sink=sink,
                                        window=window, chunk=r, sm_scale=sm_scale, rounding_slack=rounding_slack)
    parts = refine_attention_pallas(*args, interpret=interpret, num_warps=int(num_warps),
                                    num_stages=int(num_stages), **static)
    return merge_refine_partials(*parts, g=q.shape[1] // keys.shape[1], dtype=q.dtype)


#: The backends of ``refine_attention`` by name: "reference" (plain jnp), "pallas" (the Triton-lowered
#: kernel; interpret mode on the CPU).
IMPLEMENTATIONS = MappingProxyType({"reference": _refine_reference, "pallas": _refine_pallas})


def refine_max(
    q: jax.Array,
    keys: jax.Array,
    cand_idx: jax.Array,
    cand_count: jax.Array,
    lengths: jax.Array,
    *,
    sink: int,
    window: int,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    chunk: int = DEFAULT_CHUNK,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """The max pass of the refine: f32 [B, Hq] = the exact max raw score over the forced positions and
    every listed candidate (-inf if none); keys only (no values, no softmax). Arguments as
    :func:`refine_attention`. When the candidates are a superset of the keys whose code bound reaches
    M_lb - β, this is the exact max M over all keys (the arg-max is always a candidate)."""
    op = "refine_max"
    check_implementation(implementation, op, MAX_IMPLEMENTATIONS)
    b, hq, d = q.shape
    _check(op, q, keys, None, cand_idx, cand_count, lengths, jnp.zeros((b, hq), jnp.float32), sink=sink,
           window=window)
    lengths = jnp.asarray(lengths, jnp.int32)
    cand_idx = jnp.asarray(cand_idx, jnp.int32)
    cand_count = jnp.asarray(cand_count, jnp.int32)
    return MAX_IMPLEMENTATIONS[implementation](q, keys, cand_idx, cand_count, lengths, sink=int(sink),
                                               window=int(window), interpret=interpret, chunk=chunk,
                                               num_warps=num_warps, num_stages=num_stages)


def _max_reference(q, keys, cand_idx, cand_count, lengths, *, sink, window, interpret, chunk, num_warps, num_stages):
    del interpret, chunk, num_warps, num_stages  # Pallas knobs
    return refine_max_reference(q, keys, cand_idx, cand_count, lengths, sink=sink, window=window)


def _max_pallas(q, keys, cand_idx, cand_count, lengths, *, sink, window, interpret, chunk, num_warps, num_stages):
    interpret = resolve_interpret(interpret, "refine_max")
    from pallas_kernels.refine_attention.kernel_triton import refine_attention_pallas

    b, hq, _ = q.shape
    g = hq // keys.shape[1]
    zeros = jnp.zeros((b, hq), jnp.float32)
    args, static = pallas_refine_inputs(q, keys, keys, cand_idx, cand_count, lengths, zeros, zeros, sink=sink,
                                        window=window, chunk=int(chunk), sm_scale=1.0, rounding_slack=0.0)
    _, _, mx, _ = refine_attention_pallas(*args, interpret=interpret, num_warps=int(num_warps),
                                          num_stages=int(num_stages), max_only=True, **static)
    return _max_over_splits(mx, g)


#: The backends of ``refine_max`` (the refine kernel's max pass) by name.
MAX_IMPLEMENTATIONS = MappingProxyType({"reference": _max_reference, "pallas": _max_pallas})


def pallas_refine_inputs(q, keys, values, cand_idx, cand_count, lengths, m_base, beta, *, sink, window, chunk,
                         sm_scale, rounding_slack):
    """The kernel's operands and static knobs: ``refine_attention_pallas(*args, interpret=..., **static)``."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    cap = cand_idx.shape[-1]
    gp = max(16, next_pow2(g))
    qdt = score_operand_dtype(q.dtype, keys.dtype, "auto")

    def grp(x, value=0.0):
        return pad_axis(x.reshape(b, hkv, g, *x.shape[2:]), 2, gp, value=value)

    args = (jnp.asarray(lengths, jnp.int32), jnp.asarray(cand_count, jnp.int32),
            pad_axis(jnp.asarray(cand_idx, jnp.int32), 3, -(-cap // chunk) * chunk, value=-1),
            grp(q.astype(qdt)), grp(query_slack(q, rounding_slack)),
            grp(jnp.asarray(m_base, jnp.float32) - jnp.asarray(beta, jnp.float32), value=jnp.inf), keys, values)
    static = dict(g=g, sink=int(sink), window=int(window), capacity=cap, chunk=int(chunk),
                  fsize=forced_size(sink, window), sm_scale=float(sm_scale))
    return args, static


def _max_over_splits(mx, g):
    """Kernel maxes [NS+1, B, Hkv, Gp] -> f32 [B, Hq] (the G real rows of each group)."""
    _, b, hkv, _ = mx.shape
    return jnp.max(mx[:, :, :, :g], axis=0).reshape(b, hkv * g)


def merge_refine_partials(outs, lses, mx, n, *, g, dtype):
    """Kernel partials [NS+1, B, Hkv, Gp, ...] -> (out [B, Hq, D] dtype, m_seen, n_attended), LSE-merged."""
    p, b, hkv, _, d = outs.shape
    hq = hkv * g
    out, _ = merge_attention(outs[:, :, :, :g].reshape(p, b, hq, d), lses[:, :, :, :g].reshape(p, b, hq))
    m_seen = _max_over_splits(mx, g)
    n_att = jnp.sum(n[:, :, :, :g], axis=0).reshape(b, hq)
    return out.astype(dtype), m_seen, n_att


def refine_mask(q, keys, cand_idx, cand_count, m_base, beta, *, rounding_slack: Optional[float] = None):
    """Reference-only: DIPR mask bool [B, Hq, S] of the listed candidates in range (forced NOT
    included), for tests and statistics."""
    op = "refine_mask"
    b, hq, d = q.shape
    if keys.ndim != 4 or cand_idx.ndim != 4 or tuple(m_base.shape) != (b, hq):
        raise ValueError(f"{op}: expected q [B,Hq,D], keys [B,Hkv,S,D], cand_idx [B,Hkv,NS,C], m_base [B,Hq]; "
                         f"got {tuple(q.shape)}, {tuple(keys.shape)}, {tuple(cand_idx.shape)}, "
                         f"{tuple(m_base.shape)}")
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, hq))
    return refine_mask_reference(q, keys, jnp.asarray(cand_idx, jnp.int32), jnp.asarray(cand_count, jnp.int32),
                                 jnp.asarray(m_base, jnp.float32), beta,
                                 rounding_slack=resolve_rounding_slack(rounding_slack, d, op))
