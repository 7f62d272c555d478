"""Public wrapper: block_bounds(q, kmin, kmax, num_valid_blocks, *, ...)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_implementation, gqa_groups, resolve_interpret
from pallas_kernels.block_bounds.reference import block_bounds_reference


def _check(q, kmin, kmax, num_valid_blocks):
    if q.ndim != 3 or kmin.ndim != 4 or kmax.shape != kmin.shape:
        raise ValueError(
            "block_bounds: expected q [B, Hq, D], kmin/kmax [B, Hkv, NB, D]; got "
            f"q{tuple(q.shape)}, kmin{tuple(kmin.shape)}, kmax{tuple(kmax.shape)}"
        )
    b, hq, d = q.shape
    if kmin.shape[0] != b or kmin.shape[3] != d:
        raise ValueError(
            f"block_bounds: batch/head_dim mismatch: q{tuple(q.shape)} vs kmin{tuple(kmin.shape)}"
        )
    if tuple(num_valid_blocks.shape) != (b,):
        raise ValueError(
            f"block_bounds: num_valid_blocks must be [B={b}], got {tuple(num_valid_blocks.shape)}"
        )
    gqa_groups(hq, kmin.shape[1], "block_bounds")


def block_bounds(
    q: jax.Array,
    kmin: jax.Array,
    kmax: jax.Array,
    num_valid_blocks: jax.Array,
    *,
    rel_slack: float = 1e-4,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
) -> jax.Array:
    """Upper bound of q·k over each key block, per query head.

    Args:
      q: [B, Hq, D] any float dtype.
      kmin, kmax: [B, Hkv, NB, D] f32 (or 16-bit, see kv_store.with_summary_dtype) element-wise min / max of each block's valid keys.
      num_valid_blocks: [B] int32; blocks n >= num_valid_blocks[b] get -inf.
      rel_slack: added slack, relative to Σ_d |q_d|·max(|kmin_d|, |kmax_d|), so that
        f32 rounding never puts a bound below a computed score.
    Returns:
      ub: [B, Hq, NB] f32 with ub >= q·k (f32) for every valid key of the block.
    """
    check_implementation(implementation, "block_bounds")
    _check(q, kmin, kmax, num_valid_blocks)
    num_valid_blocks = jnp.asarray(num_valid_blocks, jnp.int32)
    if implementation == "reference":
        return block_bounds_reference(q, kmin, kmax, num_valid_blocks, rel_slack=rel_slack)
    interpret = resolve_interpret(interpret, "block_bounds")
    from pallas_kernels.block_bounds.kernel import block_bounds_pallas

    return block_bounds_pallas(
        q, kmin, kmax, num_valid_blocks, rel_slack=rel_slack, interpret=interpret
    )
