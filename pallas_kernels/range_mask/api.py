"""Public wrapper: dipr_range_mask(q, keys, block_idx, lengths, *, beta, ...)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    DEFAULT_SCORE_MODE, check_implementation, score_operand_dtype, suggest_num_splits, gqa_groups, next_pow2, pad_axis, resolve_interpret,
)
from pallas_kernels.range_mask.reference import dipr_range_mask_reference, listed_valid


def check_listed_args(op, q, keys, block_idx, lengths):
    if q.ndim != 3 or keys.ndim != 5 or block_idx.ndim != 3:
        raise ValueError(
            f"{op}: expected q [B, Hq, D], keys [B, Hkv, NB, Bk, D], block_idx [B, Hkv, C]; got "
            f"q{tuple(q.shape)}, keys{tuple(keys.shape)}, block_idx{tuple(block_idx.shape)}"
        )
    b, hq, d = q.shape
    kb, hkv, _, _, kd = keys.shape
    if kb != b or kd != d or tuple(block_idx.shape[:2]) != (b, hkv):
        raise ValueError(
            f"{op}: shape mismatch: q{tuple(q.shape)}, keys{tuple(keys.shape)}, "
            f"block_idx{tuple(block_idx.shape)}"
        )
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"{op}: lengths must be [B={b}], got {tuple(lengths.shape)}")
    return gqa_groups(hq, hkv, op)


def auto_splits(b: int, hkv: int, c: int) -> int:
    """Enough programs to fill the GPU, at least one slot per split."""
    return suggest_num_splits(b, hkv, c)


def dipr_range_mask(
    q: jax.Array,
    keys: jax.Array,
    block_idx: jax.Array,
    lengths: jax.Array,
    *,
    beta,
    return_mask: bool = True,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    score_mode: str = DEFAULT_SCORE_MODE,
    num_splits: Optional[int] = None,
):
    """Exact DIPR mask over the listed blocks of each KV head.

    Args:
      q: [B, Hq, D]; keys: [B, Hkv, NB, Bk, D]; block_idx: [B, Hkv, C] int32, listed
        blocks first then -1, no duplicates; lengths: [B] int32.
      beta: Python float or f32 scalar (inf -> every valid position).
      num_splits: Pallas only: split each block list over this many programs
        (default: enough to fill the GPU).
      score_mode: Pallas only. "auto" (default): bf16/f16 q and keys use a 16-bit MMA
        with f32 accumulation (exact products); otherwise, and with "f32", both are
        upcast and dotted in IEEE f32 (no TF32). Pass the same value to
        sparse_decode_attention so a threshold taken from max_score is compared
        against the same score arithmetic.
    Returns:
      (mask [B, Hq, C, Bk] bool or None, max_score [B, Hq] f32).
    """
    check_implementation(implementation, "dipr_range_mask")
    g = check_listed_args("dipr_range_mask", q, keys, block_idx, lengths)
    block_idx = jnp.asarray(block_idx, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if implementation == "reference":
        return dipr_range_mask_reference(
            q, keys, block_idx, lengths, beta=beta, return_mask=return_mask
        )
    interpret = resolve_interpret(interpret, "dipr_range_mask")
    from pallas_kernels.range_mask.kernel import listed_scores_pallas

    b, hq, d = q.shape
    _, hkv, nb, bk, _ = keys.shape
    c = block_idx.shape[-1]
    s = auto_splits(b, hkv, c) if num_splits is None else int(num_splits)
    if s < 1:
        raise ValueError(f"dipr_range_mask: num_splits must be >= 1, got {s}")
    cs = -(-c // s)
    gp, dp = max(16, next_pow2(g)), next_pow2(d)  # tl.dot needs M >= 16
    qdt = score_operand_dtype(q.dtype, keys.dtype, score_mode)
    q32 = pad_axis(pad_axis(q.astype(qdt).reshape(b, hkv, g, d), 2, gp), 3, dp)
    kp = pad_axis(keys, 4, dp)
    bidx = pad_axis(block_idx, 2, s * cs, value=-1)
    scores, pmax = listed_scores_pallas(
        q32, kp, bidx, lengths, num_splits=s, with_scores=return_mask, interpret=interpret
    )
    max_score = jnp.max(pmax, axis=2)[:, :, :g].reshape(b, hq)
    if not return_mask:
        return None, max_score
    scores = scores[:, :, :c, :g].transpose(0, 1, 3, 2, 4).reshape(b, hq, c, bk)
    valid = listed_valid(block_idx, lengths, bk)  # [B, Hkv, C, Bk]
    valid = jnp.broadcast_to(valid[:, :, None], (b, hkv, g, c, bk)).reshape(b, hq, c, bk)
    thr = max_score - jnp.asarray(beta, jnp.float32)
    mask = valid & (scores >= thr[:, :, None, None])
    return mask, max_score
