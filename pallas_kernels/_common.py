"""Shared helpers: backend choice, interpret resolution, padding."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "pallas")


class BackendUnavailableError(RuntimeError):
    """The requested implementation cannot run here (never silently replaced)."""


def check_implementation(implementation: str, op: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
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


def gqa_groups(num_q_heads: int, num_kv_heads: int, op: str) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{op}: number of query heads ({num_q_heads}) must be a multiple of the number of "
            f"KV heads ({num_kv_heads})"
        )
    return num_q_heads // num_kv_heads
