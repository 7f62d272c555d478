"""The code scan's arithmetic: one definition for the kernel (on its tiles) and the reference (on whole arrays).

Plain elementwise jnp and reductions over the last axis, so ``kernel_triton.py`` calls these functions on
[Gr, D/2] query tiles and [T, ...] key tiles and ``reference.py`` on [B, Hkv, G, ...] arrays.

**The estimate** reads the stored code (``key_codes.int4``: byte j holds dim j in the low nibble and dim
j + D/2 in the high nibble, each nibble = level + 8) as two int8 operands without shifting a nibble:
``lo = c & 0x0F`` is level + 8 (0..15) and ``hi = (c & 0xF0) ^ 0x80`` read as int8 is 16·level. The rotated
query q' is split into two int8 planes, q' ≈ q̃ = s1·n1 + s2·n2 (``split_query``), whose 2·Gr columns are
one int8 MMA operand per nibble half (the planes side by side: ``side_by_side``):
a = 16·(lo·n_lo) + hi·n_hi = 16·(Σ_d n_d·c_d + 8·Σ_{d<D/2} n_d), exact in int32
(|a| <= 127·(16·15 + 16·7)·D/2 < 2^24 for D <= 512, so also exact as f32), and

    est = ((a1·(s1/16) + a2·(s2/16)) − K)·scale,   K = s1·8·Σ_{d<D/2} n1_d + s2·8·Σ_{d<D/2} n2_d.

**The bound** of ``key_codes.int4`` (δ = min(‖q'‖₁·scale/2, ‖q'‖₂·err) + eps_D·‖q'‖₁·scale) assumes an
estimate from q' itself or its f16 rounding; here it gains two terms (``row_coefficients``):

1. the query split: |q'·k̂ − q̃·k̂| <= ‖q' − q̃‖₂·‖k̂‖₂ <= dq·7·√D·scale (levels |c| <= 7, k̂ = scale·c), with
   dq >= ‖q' − q̃‖₂ (``split_query``). The f32 roundings of the estimate above (five operations on terms of
   at most ~15·(1 + D/254)·‖q'‖₁·scale, the integer sums exact) are <= ~150·2^-24·‖q'‖₁·scale, far inside
   eps_D's f16-operand term 8·2^-11·‖q'‖₁·scale, which this estimate (no f16 operand) does not use.
2. the refine's rounding slack: the refine attends a candidate when s + σ·‖q‖₁·‖k‖∞ >= M − β
   (σ = rounding_slack). With ‖k‖∞ <= ‖k‖₂ <= 7·√D·scale·(1 + 2^-10) (|k'_d| <= 7·scale; the computed
   rotation keeps the norm to ~(D + 1)·√D·2^-24 relative), adding σ·‖q‖₁·(1 + 2^-10)·7·√D·(1 + 2^-10)·scale
   to δ makes every key the refine can attend a candidate: est + δ >= s + σ·‖q‖₁·‖k‖∞ (the (1 + 2^-10)
   on ‖q‖₁ covers another summation order of it).

**The threshold** is M_sw − β with M_sw the max of the forced scores as the scan computes them. The refine
takes M = max(M_sw, its candidates' exact scores) with this same M_sw (never its own rescoring of the
forced keys), so M >= M_sw. With the two terms above, every key with s + σ·‖q‖₁·‖k‖∞ >= M − β — every key
the refine can attend, and the arg-max (s = M) — has est + δ >= M − β >= M_sw − β: it is a candidate. Zero
false negatives by construction (docs/design.md §4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.key_codes import CODE_MAX, eps_for_dim

PLANE_MAX = 127.0  # int8 plane digits in [-127, 127]
#: plane scales below this are dropped (the plane is 0 and its part of q' stays in the residual), so
#: that s/16 is a normal f32 and exact: no flush-to-zero or subnormal rounding can desynchronise the
#: estimate from the residual the bound measures
TINY_SCALE = 2.0 ** -100
#: dq = ‖r‖₂·(1 + 2^-10) + 2^-20·‖q'‖₂ + √D·2^-60 >= ‖q' − q̃‖₂ for the computed residual r: its f32 norm errs
#: by <= (D/2 + 2)·2^-24 relative; each residual entry by a few 2^-24 of |q'_d| + 2·s1 (so the error
#: vector by ~1.2·2^-24·‖q'‖₂ <= 2^-20·‖q'‖₂ for D <= 512); squares below 2^-126 (flushed or
#: subnormal) move the norm by <= √D·2^-63
DQ_REL, DQ_Q, DQ_ABS = 1.0 + 2.0 ** -10, 2.0 ** -20, 2.0 ** -60
MAX_HEAD_DIM = 512  # the int32 sums of the estimate stay below 2^24 (exact in f32)


def code_operands(c):
    """codes uint8 [..., D/2] -> (lo, hi) int8 [..., D/2]: lo = level + 8 of dims j, hi = 16·level of
    dims j + D/2 (one AND, and one AND + XOR, per byte; no shift)."""
    lo = lax.bitcast_convert_type(c & 0x0F, jnp.int8)
    hi = lax.bitcast_convert_type((c & 0xF0) ^ 0x80, jnp.int8)
    return lo, hi


def _plane(parts, scale):
    """Digits of x / scale in [-127, 127] (f32 integers; 0 where the scale was dropped)."""
    ok = scale > 0
    inv = jnp.where(ok, scale, 1.0)[..., None]
    return [jnp.where(ok[..., None], jnp.clip(jnp.floor(x / inv + 0.5), -PLANE_MAX, PLANE_MAX), 0.0) for x in parts]


def _plane_scale(parts):
    m = jnp.max(jnp.abs(parts[0]), axis=-1)
    for x in parts[1:]:
        m = jnp.maximum(m, jnp.max(jnp.abs(x), axis=-1))
    s = m / PLANE_MAX
    return jnp.where(s >= TINY_SCALE, s, 0.0)


def _sum_sq(parts):
    out = jnp.sum(parts[0] * parts[0], axis=-1)
    for x in parts[1:]:
        out = out + jnp.sum(x * x, axis=-1)
    return out


def split_query(parts, head_dim: int):
    """Two int8 planes of the rotated query, q' ≈ s1·n1 + s2·n2.

    parts: f32 [..., Dk] pieces of q' along the head dim (the kernel passes the two nibble halves, the
    reference may too). Returns (n1 parts, n2 parts: f32 integers in [-127, 127] in the parts' shapes,
    s1, s2, dq f32 [...]) with dq >= ‖q' − s1·n1 − s2·n2‖₂ in exact arithmetic (module docstring).
    """
    s1 = _plane_scale(parts)
    n1 = _plane(parts, s1)
    r = [x - s1[..., None] * n for x, n in zip(parts, n1)]
    s2 = _plane_scale(r)
    n2 = _plane(r, s2)
    res = [x - s2[..., None] * n for x, n in zip(r, n2)]
    dq = (jnp.sqrt(_sum_sq(res)) * jnp.float32(DQ_REL) + jnp.float32(DQ_Q) * jnp.sqrt(_sum_sq(parts))
          + jnp.float32(math.sqrt(head_dim) * DQ_ABS))
    return n1, n2, s1, s2, dq


def low_offset(n_lo):
    """8·Σ_{d<D/2} n_d [...]: the low nibbles are read as level + 8 (exact: integers < 2^24)."""
    return 8.0 * jnp.sum(n_lo, axis=-1)


def plane_offset(n1_lo, n2_lo, s1, s2):
    """K = s1·8·Σ_lo n1 + s2·8·Σ_lo n2 [...] (f32)."""
    return s1 * low_offset(n1_lo) + s2 * low_offset(n2_lo)


def estimate(a, colscale, k_off, scale, *, rows: int):
    """est f32 [..., rows] from the int32 plane sums a [..., 2·rows] (columns: plane 1 of rows 0..rows-1,
    then plane 2: ``side_by_side``), colscale f32 [2·rows] = (s1/16 | s2/16), k_off f32 [rows]
    (:func:`plane_offset`), scale [..., 1]. Columns r and rows + r sit in one thread of an MMA
    accumulator, so the planes' sum needs no data movement."""
    w = a.astype(jnp.float32) * colscale
    x = jnp.sum(w.reshape(w.shape[:-1] + (2, rows)), axis=-2)
    return (x - k_off) * scale


def side_by_side(x1, x2):
    """[..., n] x2 -> [..., 2·n] = (x1 | x2), written as a broadcast and a select (Pallas-Triton lowers no
    concatenation of wide tensors)."""
    n = x1.shape[-1]
    shape = x1.shape[:-1] + (2, n)
    t1 = jnp.broadcast_to(jnp.expand_dims(x1, -2), shape).reshape(x1.shape[:-1] + (2 * n,))
    t2 = jnp.broadcast_to(jnp.expand_dims(x2, -2), shape).reshape(x1.shape[:-1] + (2 * n,))
    col = jax.lax.broadcasted_iota(jnp.int32, (2 * n,), 0)
    return jnp.where(col < n, t1, t2)


def row_coefficients(l1, l2, dq, q_l1, *, head_dim: int, rounding_slack: float):
    """Per query row (f32 [...]): (ca, cb, ce) with δ = min(ca·scale, cb·err) + ce·scale.

    l1, l2: ‖q'‖₁, ‖q'‖₂ of the rotated query; dq from :func:`split_query`; q_l1 = ‖q‖₁ of the query as
    the refine scores it. ce = eps_D·‖q'‖₁ + 7√D·dq + σ·‖q‖₁·7√D (each inflated as derived above)."""
    r7 = CODE_MAX * math.sqrt(head_dim)
    ce = (jnp.float32(eps_for_dim(head_dim)) * l1 + jnp.float32(r7 * (1.0 + 2.0 ** -20)) * dq
          + jnp.float32(rounding_slack * r7 * (1.0 + 2.0 ** -10) ** 3) * q_l1)
    return 0.5 * l1, l2, ce


def key_bound(ca, cb, ce, scale, err):
    """δ f32 (broadcast of the per-row coefficients and the per-key f16 scale and err)."""
    s = scale.astype(jnp.float32)
    return jnp.minimum(ca * s, cb * err.astype(jnp.float32)) + ce * s


def is_candidate(est, delta, thr):
    """not(est + δ < thr): a NaN bound (a key whose code could not bound it) is a candidate."""
    return jnp.logical_not(est + delta < thr)
