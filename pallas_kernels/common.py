"""Shared helpers of the kernel folders: backend checks, interpret resolution, padding,
score arithmetic and rounding slack."""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp


class BackendUnavailableError(RuntimeError):
    """The requested implementation cannot run here (never silently replaced)."""


def check_implementation(implementation: str, op: str, implementations: Mapping) -> str:
    """``implementation`` if it names one of the op's backends (its ``IMPLEMENTATIONS``), else ValueError."""
    if implementation not in implementations:
        raise ValueError(
            f"{op}: implementation must be one of {tuple(implementations)}, got {implementation!r}"
        )
    return implementation


def resolve_interpret(interpret: Optional[bool], op: str) -> bool:
    """None -> True on CPU, False on GPU. Raises if Pallas cannot run as asked."""
    backend = jax.default_backend()
    if interpret is None:
        if backend == "cpu":
            return True
        if backend == "gpu":
            return False
        raise BackendUnavailableError(
            f"{op}: implementation='pallas' targets the GPU Triton lowering (or interpret=True); "
            f"backend {backend!r} is not supported. Pass interpret=True or implementation='reference'."
        )
    if not interpret:
        if backend == "cpu":
            raise BackendUnavailableError(
                f"{op}: implementation='pallas' with interpret=False needs a GPU, but the default "
                "backend is CPU. Pass interpret=True (slow, for tests) or implementation='reference'."
            )
        if backend != "gpu":
            raise BackendUnavailableError(
                f"{op}: compiled Pallas kernels here are written for the GPU Triton lowering; "
                f"backend {backend!r} is not supported."
            )
        try:
            from jax.experimental.pallas import triton as _plgpu  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(f"{op}: Pallas Triton lowering unavailable: {e}") from e
    return bool(interpret)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def compiler_params(interpret: bool, *, num_warps: int = 4, num_stages: int = 2):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad ``x`` along ``axis`` up to ``size`` (no copy when already that size)."""
    cur = x.shape[axis]
    if cur == size:
        return x
    if cur > size:
        raise ValueError(f"cannot pad axis {axis} of size {cur} down to {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - cur)
    return jnp.pad(x, widths, constant_values=value)


def group_rows(x: jax.Array, num_kv_heads: int, value=0) -> jax.Array:
    """[B, Hq, ...] -> [B, Hkv, Gi, ...] with Gi = next_pow2(G) (query head h is row h % G of KV head
    h // G); a free reshape when G is a power of two, else padded with ``value``."""
    b, hq = x.shape[:2]
    g = hq // num_kv_heads
    return pad_axis(x.reshape(b, num_kv_heads, g, *x.shape[2:]), 2, next_pow2(g), value=value)


def ungroup_rows(x: jax.Array, g: int) -> jax.Array:
    """[B, Hkv, Gi, ...] -> [B, Hkv·G, ...]: the inverse of :func:`group_rows` (free when Gi == G)."""
    b, hkv, gi = x.shape[:3]
    if gi != g:
        x = x[:, :, :g]
    return x.reshape(b, hkv * g, *x.shape[3:])


def gqa_groups(num_q_heads: int, num_kv_heads: int, op: str) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{op}: number of query heads ({num_q_heads}) must be a multiple of the number of "
            f"KV heads ({num_kv_heads})"
        )
    return num_q_heads // num_kv_heads


# Score arithmetic of the Pallas range mask and sparse attention (they must agree,
# so that a threshold taken from one is compared against the same numbers in the
# other). "f32": upcast q and k, IEEE f32 dot. "auto": when q and k are both the
# same 16-bit float dtype, a 16-bit MMA with f32 accumulation (products exact in
# f32; only the summation order differs), else "f32".
# Measured on the H100 (bench/results/kernels_tune_v1.json, 128K, 8B shapes): the
# IEEE f32 dot runs on the FMA units and made the (then) range mask 6x slower (125 vs
# 19 us per layer) and attention 1.5x slower than the bf16 MMA; the kernels use "auto".


def score_operand_dtype(q_dtype, k_dtype, mode: str):
    if mode not in ("f32", "auto"):
        raise ValueError(f"score mode must be 'f32' or 'auto', got {mode!r}")
    if mode == "auto" and jnp.dtype(q_dtype) == jnp.dtype(k_dtype) and jnp.dtype(k_dtype) in (
        jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
    ):
        return jnp.dtype(k_dtype)
    return jnp.dtype(jnp.float32)


# Rounding slack of the attention threshold. The threshold ``M - beta`` comes from
# another computation (the range-max kernel, or the jnp reference on another
# fusion) whose dot may sum in another order; on the H100 that rounded a beta = 0
# arg-max below its own threshold (f32, group 1) and the head attended nothing.
# Every |fl(q·k) - q·k| <= D·2^-24·Σ_d|q_d k_d| <= D·2^-24·‖q‖₁·‖k‖∞, so two
# computations differ by at most twice that: attention compares
# ``s + slack·‖q‖₁·‖k‖∞ >= threshold`` with slack = 2·D·2^-24 by default. It can only
# add keys within that rounding bound of the boundary, never drop one.
def default_rounding_slack(head_dim: int) -> float:
    """2·D·2^-24: twice the f32 dot's worst-case relative summation error for head dim D."""
    return 2.0 * int(head_dim) * 2.0 ** -24


def resolve_rounding_slack(rounding_slack, head_dim: int, op: str) -> float:
    if rounding_slack is None:
        return default_rounding_slack(head_dim)
    r = float(rounding_slack)
    if not r >= 0.0:
        raise ValueError(f"{op}: rounding_slack must be >= 0 (or None for the default), got {rounding_slack!r}")
    return r


def query_slack(q: jax.Array, rounding_slack: float) -> jax.Array:
    """f32 [..., ] = rounding_slack · ‖q‖₁ over the last axis (the per-query factor of the slack)."""
    return jnp.float32(rounding_slack) * jnp.sum(jnp.abs(q.astype(jnp.float32)), axis=-1)
