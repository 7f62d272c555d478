"""Signed 4-bit per-key codes of rotated keys, and the error bound of their estimates.

Layout: codes uint8 [..., D/2]; byte j holds dim j in the LOW nibble and dim j + D/2 in the
HIGH nibble, each nibble = c + 8 with c in [-7, 7]; scale f16 [...] = max|k'|/7 rounded
UP (so |k'/scale| <= 7: nothing clips); err f16 [...] >= ‖k' - k̂‖₂ (rounded up), with
k̂ = f32(scale)·c. A kernel computes est = scale·(q'[:D/2]·lo + q'[D/2:]·hi).

Error bound (``bound``): for a query q and a key k (exact stored values, any float dtype)
with q' = rotate(q), k' = rotate(k) computed in f32, and s = q·k computed by the refine's
arithmetic (16-bit or f32 operands, f32 accumulation, any summation order),

    |s - est| <= δ = min(‖q'‖₁·scale/2, ‖q'‖₂·err) + eps_D·‖q'‖₁·scale,
    eps_D = 16·(D + 2)·(√D + 1)²·2^-24 + 8·2^-11,

where est = scale·(q̃·c) may take q̃ = q' rounded to f16 after a power-of-two scaling
(``estimate_operand``: the kernels' f16 MMA with exact products and f32 accumulation) or
q̃ = q' itself.

Derivation (u = 2^-24, γ_n = n·u/(1 - n·u), Q = ‖q'‖₁, S = scale; |k'_d| <= 7S so
‖k'‖₁ <= 7·D·S and ‖k‖₂ = ‖k'‖₂ <= 7·√D·S; ‖q‖₂ = ‖q'‖₂ <= Q; ‖q‖₁ <= √D·Q):
  1. code: |k'_d - k̂_d| <= S·(1/2 + 7u) (f32 division before rounding), and
     ‖k' - k̂‖₂ <= err (its f32 norm errs by <= (D/2 + 2)·u relative, covered by the 2^-10
     inflation before rounding up): |q'·k' - q'·k̂| <= min(Q·S/2, ‖q'‖₂·err) + 7u·Q·S.
  2. rotation: each computed x'_d errs from the exact (orthogonal) rotation by
     <= γ_{D+1}·‖x‖₁/√D (a D-term dot; the entries fl(1/√D) err by u relative), and the
     exact rotation keeps q·k, so |q'·k' - q·k| <= ‖Δq'‖∞‖k'‖₁ + ‖q'‖₁‖Δk'‖∞
     <= γ_{D+1}·(‖q‖₁/√D·7DS + Q·7√D·S) <= 7γ_{D+1}·(D + √D)·Q·S.
  3. refine score: |s - q·k| <= γ_{D+1}·Σ|q_d k_d| <= γ_{D+1}·‖q‖₂‖k‖₂ <= 7γ_{D+1}·√D·Q·S.
  4. estimate: Σ q'_d·c_d (|c_d| <= 7) in f32 then times S: <= 7γ_{D+2}·Q·S.
  5. f16 operand: q̃ = f16(q'·2^e)·2^-e with max|q'·2^e| in [2^14, 2^15) errs per dim by
     <= 2^-11·|q'_d| + 2^-25·2^-e (f16 subnormal half-spacing, <= 2^-39·‖q'‖∞), so
     |(q̃ - q')·k̂| <= 7·S·(2^-11 + D·2^-39)·Q <= 8·2^-11·Q·S: the second term of eps_D.
  Sum of 1-4: <= 7·(D + 2)·u·(D + 2√D + 2)·Q·S·(1 + O(Du)) <= 7·(D + 2)(√D + 1)²·u·Q·S·(1+O(Du)),
  plus the f32 rounding of δ itself (a few u of δ <= Q·S). The factor 16 instead of 7
  doubles u everywhere, which also covers accumulators that truncate instead of rounding
  to nearest (tensor-core MMAs) and the rounding of δ. (The contract's first draft had
  64·D^1.5·u, which is ~1.5x short of this worst case at D = 128: step 2's ‖q‖₁ <= √D·Q
  is tight for a query along one rotated axis.)

Keys whose scale overflows f16 (max|k'| > 7·65504) get scale inf and err inf: their δ is
inf (or NaN), which the kernels treat as "candidate" (they test ``not (est + δ < thr)``),
never as a miss. Non-finite keys (NaN padding) give garbage codes: kernels mask by position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CODE_MAX = 7  # codes in [-7, 7]; nibble = code + 8
_SCALE_INFLATE = 1.0 + 2.0 ** -20  # covers the f32 rounding of max|k'|/7 before rounding up
_ERR_INFLATE = 1.0 + 2.0 ** -10  # covers the f32 rounding of the error norm


def eps_for_dim(head_dim: int) -> float:
    """eps_D = 16·(D + 2)·(√D + 1)²·2^-24 + 8·2^-11 (derivation in the module docstring)."""
    d = int(head_dim)
    return 16.0 * (d + 2) * (math.sqrt(d) + 1.0) ** 2 * 2.0 ** -24 + 8.0 * 2.0 ** -11


def estimate_operand(q_rot: jax.Array):
    """q_rot f32 [..., D] -> (q16 f16 [..., D], qscale f32 [...]) with q' ≈ qscale·q16.

    q16 = f16(q'·2^(15-e)) where max|q'| = m·2^e, m in [0.5, 1): the largest entry lands in
    [2^14, 2^15), so every entry keeps f16's 11 bits (relative 2^-11, covered by eps_D).
    The estimate is est = scale·(qscale·(q16 · c)) with exact f16 products, f32 sums.
    """
    q = q_rot.astype(jnp.float32)
    _, ex = jnp.frexp(jnp.max(jnp.abs(q), axis=-1))
    up = jnp.ldexp(jnp.float32(1.0), 15 - ex)
    return (q * up[..., None]).astype(jnp.float16), jnp.ldexp(jnp.float32(1.0), ex - 15)


def _round_up_f16(x: jax.Array) -> jax.Array:
    """f32 -> the smallest f16 >= x (inf past the f16 range; NaN stays NaN)."""
    h = x.astype(jnp.float16)
    return jnp.where(h.astype(jnp.float32) < x, jnp.nextafter(h, jnp.float16(jnp.inf)), h)


def unpack_nibbles(codes: jax.Array):
    """codes uint8 [..., D/2] -> (lo, hi) int32 [..., D/2] of codes in [-7, 7] (dims j and j + D/2)."""
    c = codes.astype(jnp.int32)
    return (c & 15) - 8, ((c >> 4) & 15) - 8


def encode(k_rot: jax.Array):
    """k_rot f32 [..., D] -> (codes uint8 [..., D/2], scale f16 [...], err f16 [...])."""
    if k_rot.ndim < 1 or k_rot.shape[-1] < 2 or k_rot.shape[-1] % 2:
        raise ValueError(f"encode: k_rot must be [..., D] with D even, got {tuple(k_rot.shape)}")
    if k_rot.dtype != jnp.float32:
        raise ValueError(f"encode: k_rot must be f32 (the output of rotate), got {k_rot.dtype}")
    half = k_rot.shape[-1] // 2
    amax = jnp.max(jnp.abs(k_rot), axis=-1)
    scale = _round_up_f16(amax / jnp.float32(CODE_MAX) * jnp.float32(_SCALE_INFLATE))
    s32 = scale.astype(jnp.float32)[..., None]
    ok = (s32 > 0) & jnp.isfinite(s32)
    c = jnp.where(ok, jnp.round(k_rot / jnp.where(ok, s32, 1.0)), 0.0)
    c = jnp.where(jnp.isfinite(c), jnp.clip(c, -CODE_MAX, CODE_MAX), 0.0)
    nib = (c.astype(jnp.int32) + 8).astype(jnp.uint8)
    codes = nib[..., :half] | (nib[..., half:] << 4)
    diff = k_rot - s32 * c
    norm = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    err = _round_up_f16(norm * jnp.float32(_ERR_INFLATE))
    err = jnp.where(jnp.isinf(scale), jnp.float16(jnp.inf), err)
    return codes, scale, err


def decode(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """(codes uint8 [..., D/2], scale f16 [...]) -> k̂ f32 [..., D] = f32(scale)·c."""
    lo, hi = unpack_nibbles(codes)
    c = jnp.concatenate([lo, hi], axis=-1).astype(jnp.float32)
    return scale.astype(jnp.float32)[..., None] * c


def bound_from_norms(q_l1, q_l2, scale, err, head_dim: int):
    """δ from ‖q'‖₁, ‖q'‖₂ (f32, broadcastable) and a key's scale/err (f16 or f32): f32.

    Pure elementwise jnp, so the kernels call it on their tiles: the one definition of δ.
    """
    s = scale.astype(jnp.float32)
    e = err.astype(jnp.float32)
    main = jnp.minimum(q_l1 * s * jnp.float32(0.5), q_l2 * e)
    return main + jnp.float32(eps_for_dim(head_dim)) * q_l1 * s


def query_norms(q_rot: jax.Array):
    """q_rot f32 [..., D] -> (‖q'‖₁, ‖q'‖₂) f32 [...]."""
    q = q_rot.astype(jnp.float32)
    return jnp.sum(jnp.abs(q), axis=-1), jnp.sqrt(jnp.sum(q * q, axis=-1))


def bound(q_rot: jax.Array, scale: jax.Array, err: jax.Array) -> jax.Array:
    """δ f32: q_rot [..., D] with scale/err broadcastable to [...] (e.g. q_rot [G, 1, D], scale [T]).

    |s_exact - est| <= δ for every valid key (module docstring); est = decode(codes, scale)·q'.
    """
    l1, l2 = query_norms(q_rot)
    return bound_from_norms(l1, l2, scale, err, q_rot.shape[-1])


def estimate(q_rot: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """est f32 [..., G, S] for q_rot f32 [..., G, D], codes uint8 [..., S, D/2], scale [..., S].

    The kernels' arithmetic: est = scale·(qscale·(q16[:D/2]·lo + q16[D/2:]·hi)) with
    (q16, qscale) = estimate_operand(q_rot), exact products, f32 sums (any order).
    """
    q16, qs = estimate_operand(q_rot)
    lo, hi = unpack_nibbles(codes)
    h = q16.shape[-1] // 2
    hi_p = jax.lax.Precision.HIGHEST
    q32 = q16.astype(jnp.float32)
    dot = (jnp.einsum("...gd,...sd->...gs", q32[..., :h], lo.astype(jnp.float32), precision=hi_p)
           + jnp.einsum("...gd,...sd->...gs", q32[..., h:], hi.astype(jnp.float32), precision=hi_p))
    return (dot * qs[..., None]) * scale.astype(jnp.float32)[..., None, :]
