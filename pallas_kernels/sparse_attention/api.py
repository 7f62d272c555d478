"""Public wrapper: sparse_decode_attention(q, keys, values, block_idx, lengths, threshold, *, ...)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    DEFAULT_SCORE_MODE, check_implementation, next_pow2, pad_axis, query_slack, resolve_interpret,
    resolve_rounding_slack, score_operand_dtype,
)
from pallas_kernels.lse_merge import merge_attention
from pallas_kernels.range_mask.api import check_listed_args
from pallas_kernels.sparse_attention.reference import sparse_decode_attention_reference


def sparse_decode_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    block_idx: jax.Array,
    lengths: jax.Array,
    threshold: jax.Array,
    *,
    sink: int = 0,
    window: int = 0,
    num_splits: int = 1,
    sm_scale: Optional[float] = None,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
    score_mode: str = DEFAULT_SCORE_MODE,
    return_max: bool = False,
    blocks_per_step: Optional[int] = None,
    rounding_slack: Optional[float] = None,
):
    """Decode attention over the listed blocks of each KV head, token-masked.

    Args:
      q: [B, Hq, D]; keys, values: [B, Hkv, NB, Bk, D]; block_idx: [B, Hkv, C] int32
        (listed blocks first, then -1; no duplicates); lengths: [B] int32;
      threshold: f32 [B, Hq] in raw-score units (-inf = attend all listed valid tokens).
        A token is in range when ``s + rounding_slack·‖q‖₁·‖k‖∞ >= threshold``.
      sink, window: positions p < sink or p >= length - window of listed blocks are
        attended whatever their score.
      num_splits: split each block list into this many partials (split-K), merged
        exactly by log-sum-exp (Pallas; the reference computes it in one piece).
      sm_scale: softmax scale (default 1/sqrt(D)).
      score_mode: Pallas only; as in dipr_range_mask (use the same value in both).
        Suggested num_splits: pallas_kernels.suggest_num_splits(B, Hkv, C).
      return_max: also return the max raw score (q·k, the kernel's arithmetic) over the
        valid tokens of the listed blocks, attended or not: f32 [B, Hq] (-inf if none).
      blocks_per_step: Pallas only; None: the original kernel (splits of ceil(C/S)
        slots). An int U: the balanced kernel — split s takes slots
        [s*n//S, (s+1)*n//S) of the n listed blocks and each loop step issues the loads
        of U blocks before using them (latency hiding). return_max needs it (default 4).
      rounding_slack: widens the threshold compare by this times ‖q‖₁·‖k‖∞, a bound on
        how far two f32 summation orders of q·k can differ, so that a threshold taken
        from another computation (the range-max kernel) never drops a key it put in
        range — on the H100 it once dropped a beta = 0 arg-max. None (default):
        2·D·2^-24; 0: the plain compare.
    Returns:
      (out [B, Hq, D] in q.dtype, lse f32 [B, Hq]); rows with no token: 0, -inf.
      With return_max: (out, lse, max_score).
    """
    check_implementation(implementation, "sparse_decode_attention")
    g = check_listed_args("sparse_decode_attention", q, keys, block_idx, lengths)
    if values.shape != keys.shape:
        raise ValueError(
            f"sparse_decode_attention: values{tuple(values.shape)} must match keys{tuple(keys.shape)}"
        )
    b, hq, d = q.shape
    if tuple(threshold.shape) != (b, hq):
        raise ValueError(
            f"sparse_decode_attention: threshold must be [B, Hq]={(b, hq)}, got {tuple(threshold.shape)}"
        )
    if int(num_splits) < 1:
        raise ValueError(f"sparse_decode_attention: num_splits must be >= 1, got {num_splits}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    block_idx = jnp.asarray(block_idx, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    threshold = jnp.asarray(threshold, jnp.float32)
    slack = resolve_rounding_slack(rounding_slack, d, "sparse_decode_attention")
    if implementation == "reference":
        out, lse = sparse_decode_attention_reference(
            q, keys, values, block_idx, lengths, threshold,
            sink=int(sink), window=int(window), sm_scale=sm_scale, rounding_slack=slack,
        )
        if not return_max:
            return out, lse
        from pallas_kernels.range_mask.reference import listed_scores

        sc, _ = listed_scores(q, keys, block_idx, lengths)  # [B,Hq,C,Bk], -inf where invalid
        return out, lse, jnp.max(sc.reshape(b, hq, -1), axis=-1)
    interpret = resolve_interpret(interpret, "sparse_decode_attention")
    from pallas_kernels.sparse_attention.kernel import sparse_attention_partials_pallas

    _, hkv, nb, bk, _ = keys.shape
    c = block_idx.shape[-1]
    s = int(num_splits)
    if return_max and blocks_per_step is None:
        blocks_per_step = 4
    if blocks_per_step is not None:
        from pallas_kernels.sparse_attention.kernel import sparse_attention_balanced_pallas

        u = int(blocks_per_step)
        if u < 1:
            raise ValueError(f"sparse_decode_attention: blocks_per_step must be >= 1, got {blocks_per_step}")
        gp, dp = max(16, next_pow2(g)), next_pow2(d)
        qdt = score_operand_dtype(q.dtype, keys.dtype, score_mode)
        q32 = pad_axis(pad_axis(q.astype(qdt).reshape(b, hkv, g, d), 2, gp), 3, dp)
        thr = pad_axis(threshold.reshape(b, hkv, g), 2, gp, value=-jnp.inf)
        qsl = pad_axis(query_slack(q, slack).reshape(b, hkv, g), 2, gp)
        kp, vp = pad_axis(keys, 4, dp), pad_axis(values, 4, dp)
        bidx = pad_axis(block_idx, 2, next_pow2(c), value=-1)
        outs, lses, maxes = sparse_attention_balanced_pallas(
            q32, kp, vp, bidx, lengths, thr, qsl, num_splits=s, unroll=u, sink=sink, window=window,
            sm_scale=sm_scale, interpret=interpret,
        )
        outs = outs[:, :, :, :g, :d].reshape(s, b, hq, d)
        lses = lses[:, :, :, :g].reshape(s, b, hq)
        mx = jnp.max(maxes[:, :, :, :g].reshape(s, b, hq), axis=0)
        if s == 1:
            out, lse = outs[0], lses[0]
        else:
            out, lse = merge_attention(outs, lses)
        out = out.astype(q.dtype)
        return (out, lse, mx) if return_max else (out, lse)
    cs = -(-c // s)
    gp, dp = max(16, next_pow2(g)), next_pow2(d)  # tl.dot needs M >= 16
    qdt = score_operand_dtype(q.dtype, keys.dtype, score_mode)
    q32 = pad_axis(pad_axis(q.astype(qdt).reshape(b, hkv, g, d), 2, gp), 3, dp)
    thr = pad_axis(threshold.reshape(b, hkv, g), 2, gp, value=-jnp.inf)
    qsl = pad_axis(query_slack(q, slack).reshape(b, hkv, g), 2, gp)
    kp, vp = pad_axis(keys, 4, dp), pad_axis(values, 4, dp)
    bidx = pad_axis(block_idx, 2, s * cs, value=-1)
    outs, lses = sparse_attention_partials_pallas(
        q32, kp, vp, bidx, lengths, thr, qsl, num_splits=s, sink=sink, window=window,
        sm_scale=sm_scale, interpret=interpret,
    )
    outs = outs[:, :, :, :g, :d].reshape(s, b, hq, d)
    lses = lses[:, :, :, :g].reshape(s, b, hq)
    if s == 1:
        return outs[0].astype(q.dtype), lses[0]
    out, lse = merge_attention(outs, lses)
    return out.astype(q.dtype), lse
