"""The estimated tail: exact attention over the selected keys, the key codes' estimates for the rest.

Every sparse method attends exactly to the keys it selects (``sel``, sink and window included) and,
without a tail, renormalises as if the others had no weight. With the tail the keys not selected
(``rest`` = valid \\ sel) keep the weight their code estimate ``ŝ`` gives them, and their values are
replaced by the mean value ``V̄_b`` of their block (``KVStore.value_means``), which costs no read of
their keys or values::

    out = (Σ_sel e^{s/√d} v + Σ_b w_b V̄_b) / (Σ_sel e^{s/√d} + Σ_b w_b),   w_b = Σ_{rest ∩ b} e^{ŝ/√d}

``ŝ = q′·k̂`` is the estimate the code scan already computes (rotated query against the decoded 4-bit
code, :func:`pallas_kernels.key_codes.estimate`). The two parts are sums relative to their own max,
merged by log-sum-exp (:func:`merge_by_lse`), like every partial of the kernels.

Modes (``AttentionConfig.tail``): :data:`TAIL_MODES` are the user's ("none": exact sparse attention,
today's; "estimate": the formula above). :data:`STUDY_MODES` exist to measure what else could help
(bench/quality_tail.py); they read more than a decode step should and are not offered by the CLI:

- ``estimate-var``: the estimate corrected for its error, as if ``s − ŝ`` were normal with variance
  ``σ² = ‖q′‖²·err²/D`` (``err`` the code's residual norm, spread evenly over the D dimensions):
  ``E e^{s/√d} = e^{ŝ/√d + σ²/(2d)}``;
- ``estimate-restmean``: the block means without the block's selected keys, ``(n_b·V̄_b − Σ_{sel ∩ b} v)
  / |rest ∩ b|`` per query head (the selected values are read anyway; per head and block sums);
- ``estimate-rank1`` / ``estimate-rank2``: each block's values as its mean plus their top 1 or 2 principal
  directions, ``v_i ≈ V̄_b + U_b c_i`` with per-key coefficients ``c_i`` held in int8 (one scale per block
  and direction), so the tail adds ``U_b Σ_{rest ∩ b} e^{ŝ/√d} c_i``: what a store that kept 1 or 2 bytes
  a key (and r·D floats a block) beside the key codes would give (computed here from the values by an
  SVD of every block at every step: a measurement, not a kernel);
- ``estimate-vweighted``: the rest's own values weighted by the estimates, ``Σ_rest e^{ŝ/√d} v``
  (reads every value: the most that better value summaries could give);
- ``exact-scores``: the exact scores of the rest with the block means (reads every key: the most
  that a perfect score estimate could give).

Shapes: q [B, Hq, D]; the store's [B, Hkv, NB, Bk, D] layout; masks [B, Hq, S = NB·Bk] bool.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from alaya_jax.attention.masked import group_size, masked_attention, raw_scores
from alaya_jax.store import kv_store
from alaya_jax.store.kv_store import KVStore
from pallas_kernels.key_codes import estimate, rotate

#: The tail modes a user picks (``AttentionConfig.tail``, ``--tail``, the server's ``tail`` field).
TAIL_MODES = ("none", "estimate")
#: Modes for measurements only (see the module docstring): they read keys or values of the rest.
STUDY_MODES = ("estimate-var", "estimate-restmean", "estimate-rank1", "estimate-rank2", "estimate-vweighted",
               "exact-scores")
#: The default mode, chosen from bench/results/quality_tail/quality_tail.md: "none". The block-mean tail
#: lowers the KL at 4% of the keys (2.6–10×) but raises it 2.4–13× at 2% and raises the perplexity at ≤ 3%
#: in every row measured, so it is opt-in.
DEFAULT_TAIL = "none"


def check_mode(mode: str) -> None:
    if mode not in TAIL_MODES + STUDY_MODES:
        raise ValueError(f"unknown tail mode {mode!r}; choose one of {TAIL_MODES + STUDY_MODES}")


def code_estimates(q: jax.Array, store: KVStore) -> jax.Array:
    """ŝ f32 [B, Hq, S]: every position's score estimated from its code (q·k for the rotated query
    and the decoded code; positions past a length hold anything)."""
    b, hq, d = q.shape
    hkv = store.num_kv_heads
    g = group_size(hq, hkv)
    qr = rotate(q.reshape(b, hkv, g, d).transpose(0, 2, 1, 3), store.rot_signs).transpose(0, 2, 1, 3)
    codes, scale, _ = store.dense_codes()
    return estimate(qr, codes, scale).reshape(b, hq, -1)


def _estimate_sigma2(q: jax.Array, store: KVStore) -> jax.Array:
    """σ² f32 [B, Hq, S] of ``s − ŝ`` under the even-spread model: ‖q‖²·err²/D (the rotation keeps ‖q‖)."""
    b, hq, d = q.shape
    hkv = store.num_kv_heads
    g = hq // hkv
    q2 = jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1).reshape(b, hkv, g, 1)
    err = store.dense_codes()[2].astype(jnp.float32)[:, :, None, :]  # [B, Hkv, 1, S]
    return (q2 * jnp.square(err) / d).reshape(b, hq, -1)


def _low_rank_correction(store: KVStore, p: jax.Array, rank: int) -> jax.Array:
    """Σ_b U_b Σ_{i ∈ b} p_i c_i f32 [B, Hkv, G, D] for weights p [B, Hkv, G, NB, Bk]: U_b the top ``rank``
    principal directions of block b's centred valid values, c_i their coefficients rounded to int8 levels
    (one scale per block and direction)."""
    hi = jax.lax.Precision.HIGHEST
    ok = kv_store.positions_valid(store).reshape(store.batch, 1, store.num_blocks, store.block_size, 1)
    cen = jnp.where(ok, store.values.astype(jnp.float32) - store.value_means.astype(jnp.float32)[:, :, :, None], 0.0)
    _, _, vt = jnp.linalg.svd(cen, full_matrices=False)  # [B, Hkv, NB, min(Bk, D), D]
    u = vt[..., :rank, :]
    c = jnp.einsum("bhnkd,bhnrd->bhnkr", cen, u, precision=hi)
    step = jnp.max(jnp.abs(c), axis=3, keepdims=True) / 127.0
    c = jnp.round(c / jnp.where(step > 0, step, 1.0)) * step
    pc = jnp.einsum("bhgnk,bhnkr->bhgnr", p, c, precision=hi)
    return jnp.einsum("bhgnr,bhnrd->bhgd", pc, u, precision=hi)


def merge_by_lse(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merge P partial softmax-attentions by their log-sum-exp: outs [P, ..., D], lses f32 [P, ...] →
    (out f32 [..., D], lse f32 [...]). A partial with lse -inf contributes nothing (its out may be
    anything, NaN too); when every partial is -inf the result is out 0, lse -inf."""
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    live = lses > -jnp.inf
    w = jnp.where(live, jnp.exp(lses - m_safe), 0.0)  # [P, ...]
    denom = jnp.sum(w, axis=0)
    num = jnp.sum(w[..., None] * jnp.where(live[..., None], outs.astype(jnp.float32), 0.0), axis=0)
    has = denom > 0
    out = jnp.where(has[..., None], num / jnp.where(has, denom, 1.0)[..., None], 0.0)
    return out, jnp.where(has, m_safe + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)


def tail_partial(q: jax.Array, store: KVStore, rest: jax.Array, *, mode: str = "estimate",
                 scores: Optional[jax.Array] = None,
                 estimates: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """The tail's partial attention over the keys of ``rest`` (bool [B, Hq, S], valid positions only):
    ``(out f32 [B, Hq, D], lse f32 [B, Hq])`` with out = Σ_b w_b V̄_b / Σ_b w_b and lse = log Σ_b w_b
    (natural log of the scaled weights; -inf and out 0 for an empty rest). ``scores``: the exact raw
    scores [B, Hq, S] (mode ``exact-scores`` only; computed when None); ``estimates``: the code estimates
    [B, Hq, S] of :func:`code_estimates` (computed when None)."""
    check_mode(mode)
    if mode == "none":
        raise ValueError("tail mode 'none' has no tail partial")
    b, hq, d = q.shape
    hkv, nb, bk = store.num_kv_heads, store.num_blocks, store.block_size
    g = group_size(hq, hkv)
    if mode == "exact-scores":
        s = raw_scores(q, store.dense_keys()) if scores is None else scores
    else:
        s = code_estimates(q, store) if estimates is None else estimates
    z = s * (1.0 / jnp.sqrt(jnp.float32(d)))
    if mode == "estimate-var":
        z = z + _estimate_sigma2(q, store) / (2.0 * d)
    z = jnp.where(rest, z, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(rest, jnp.exp(z - m_safe), 0.0)  # [B, Hq, S]
    l = jnp.sum(p, axis=-1)
    hi = jax.lax.Precision.HIGHEST
    if mode in ("estimate-vweighted", "estimate-restmean"):
        valid = kv_store.positions_valid(store)[:, None, None, :, None]  # [B,1,1,S,1]
        vv = jnp.where(valid[:, :, 0], store.dense_values().astype(jnp.float32), 0.0)  # [B,Hkv,S,D]
    if mode == "estimate-vweighted":
        num = jnp.einsum("bhgs,bhsd->bhgd", p.reshape(b, hkv, g, -1), vv, precision=hi)
    elif mode == "estimate-restmean":
        sel = (kv_store.positions_valid(store)[:, None, :] & ~rest).reshape(b, hkv, g, nb, bk).astype(jnp.float32)
        sel_sum = jnp.einsum("bhgnk,bhnkd->bhgnd", sel, vv.reshape(b, hkv, nb, bk, d), precision=hi)
        n_valid = jnp.sum(kv_store.positions_valid(store).reshape(b, 1, 1, nb, bk), axis=-1, dtype=jnp.float32)
        n_rest = jnp.sum(rest.reshape(b, hkv, g, nb, bk), axis=-1, dtype=jnp.float32)  # [B,Hkv,G,NB]
        block_sum = n_valid[..., None] * store.value_means.astype(jnp.float32)[:, :, None]
        rest_mean = (block_sum - sel_sum) / jnp.maximum(n_rest, 1.0)[..., None]
        w = jnp.sum(p.reshape(b, hkv, g, nb, bk), axis=-1)
        num = jnp.einsum("bhgn,bhgnd->bhgd", w, rest_mean, precision=hi)
    else:
        w = jnp.sum(p.reshape(b, hkv, g, nb, bk), axis=-1)  # [B, Hkv, G, NB] per-block weights
        num = jnp.einsum("bhgn,bhnd->bhgd", w, store.value_means.astype(jnp.float32), precision=hi)
        if mode.startswith("estimate-rank"):
            num = num + _low_rank_correction(store, p.reshape(b, hkv, g, nb, bk), int(mode[-1]))
    has = l > 0
    out = num.reshape(b, hq, d) / jnp.where(has, l, 1.0)[..., None]
    lse = jnp.where(has, m_safe[..., 0] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    return out, lse


def attend_with_tail(q: jax.Array, store: KVStore, selected: jax.Array, *, mode: str,
                     scores: Optional[jax.Array] = None, visible: Optional[jax.Array] = None) -> jax.Array:
    """Attention that is exact over ``selected`` (bool [B, Hq, S]: the method's keys, sink and window
    included) and estimated over the other visible keys → out [B, Hq, D] in q's dtype. ``scores``: the
    exact raw scores [B, Hq, S] when the caller has them; ``visible`` bool [B, S]: the keys the query may
    see (default: the valid positions; a filtered query passes its filter's). Mode "none": exact sparse
    attention alone."""
    check_mode(mode)
    k, v = store.dense_keys(), store.dense_values()
    scores = raw_scores(q, k) if scores is None else scores
    visible = kv_store.positions_valid(store) if visible is None else visible
    selected = selected & visible[:, None, :]
    out_sel, lse_sel = masked_attention(q.astype(jnp.float32), k, v, selected, scores=scores)
    if mode == "none":
        return out_sel.astype(q.dtype)
    rest = visible[:, None, :] & ~selected
    out_tail, lse_tail = tail_partial(q, store, rest, mode=mode, scores=scores)
    out, _ = merge_by_lse(jnp.stack([out_sel, out_tail]), jnp.stack([lse_sel, lse_tail]))
    return out.astype(q.dtype)


__all__ = ["TAIL_MODES", "STUDY_MODES", "DEFAULT_TAIL", "check_mode", "code_estimates", "merge_by_lse", "tail_partial",
           "attend_with_tail"]
