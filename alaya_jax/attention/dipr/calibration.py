"""Self-calibrated DIPR: a β per (layer, query head) chosen at the end of prefill.

At the end of prefill the last ``n_cal`` prompt positions are run once more through the
model with an attention function that does not append (their keys are already in the
cache) and measures, per layer and query head, on a grid of β (:data:`BETA_GRID`):

- ``mass[β]``: the share of the softmax mass *outside* sink and window that the DIPR set
  ``{s : q·k_s ≥ max − β}`` holds, averaged over the calibration queries;
- ``keys[β]``: the fraction of the keys that DIPR ∪ sink ∪ window attends (the
  evaluation's ``keys_fraction``), averaged over the calibration queries.

From these curves (exact scores in jnp, no DIPR kernel):

- mass mode (:func:`betas_for_mass`): the smallest grid β whose gain reaches a fraction M
  of its total;
- budget mode (:func:`betas_for_budget`): a total key budget F (mean over heads and layers
  of ``keys``) shared by water-filling: every step moves the head (or layer) whose next β
  buys the most gain per key.

What the gain is and whether the heads of a layer share a β is the *allocation*
(:data:`ALLOCATIONS`). The default, ``head-recall`` — a β per head, gain = the absolute
softmax mass on DIPR ∪ sink ∪ window — had the lowest KL at equal keys on 3 of the 4
(text, context) pairs of bench/results/quality_calibrated/quality_calibrated.md (``layer-recall`` on the
fourth). A β per head chosen on the share of the mass *outside* sink and window
(``head-mass``, the first try the issue warns about) spends keys on heads whose mass sits
almost all in the sink and window.

The chosen βs [L, B, Hq] go onto the caches (``KVStore.dipr_beta``) and every decode step
of calibrated DIPR uses them (:mod:`alaya_jax.attention.registry`).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention import tail as tail_mod
from alaya_jax.attention.masked import group_size, masked_attention, raw_scores
from alaya_jax.errors import ConfigError
from alaya_jax.store.kv_store import KVStore

# β candidates in raw q·k units (inf: every key). Dense at small β, where peaked heads live.
BETA_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 36,
                      40, 44, 48, 52, 56, 60, 64, 72, 80, 96, 112, 128, 160, 192, 256, np.inf], np.float32)


@dataclasses.dataclass(frozen=True)
class Curves:
    """Calibration curves of every (layer, sequence, query head) on :data:`BETA_GRID`.

    ``mass`` f64 [L, B, Hq, G]: mean share of the softmax mass outside sink and window
    held by DIPR(β); ``keys`` f64 [L, B, Hq, G]: mean fraction of keys attended by
    DIPR(β) ∪ sink ∪ window; ``spread`` f64 [L, B, Hq]: mean over the calibration queries of
    ``sqrt(Σ_s p̃_s ‖v_s − ō‖²)`` over the keys outside sink and window (p̃ their softmax
    renormalised, ō its mean value): how far a dropped value lands from the rest;
    ``recall`` f64 [L, B, Hq, G]: mean softmax mass on DIPR(β) ∪ sink ∪ window (absolute);
    ``vmass`` f64 [L, B, Hq, G]: mean of ``Σ_s p_s ‖v_s − o‖`` over the attended keys (o the full
    output): the value-weighted mass, whose complement bounds the output error ‖o_sparse − o‖·recall;
    ``rows`` int [B]: calibration queries used; ``length`` int [B]: context length;
    ``tail_err`` f64 [L, B, Hq, G] or None: mean over the calibration queries of ‖o_β − o‖₂, o_β the
    output of DIPR(β) ∪ sink ∪ window attended exactly plus the estimated tail (of mode ``tail``) over
    the other keys, o the full output: what a β costs once the tail is added (:func:`tail_error_curve`);
    ``tail_rel``: the same error relative to ‖o‖₂.
    """

    mass: np.ndarray
    keys: np.ndarray
    spread: np.ndarray
    rows: np.ndarray
    length: np.ndarray
    recall: Optional[np.ndarray] = None
    vmass: Optional[np.ndarray] = None
    tail_err: Optional[np.ndarray] = None
    tail_rel: Optional[np.ndarray] = None
    tail: str = "none"
    grid: np.ndarray = dataclasses.field(default_factory=lambda: BETA_GRID.copy())


def layer_curves(q: jax.Array, store: KVStore, positions: jax.Array, row_ok: jax.Array, *, sink: int,
                 window: int, grid: jax.Array):
    """Curves of one layer. q [B,T,Hq,D] at ``positions`` [B,T] (``row_ok`` bool [B,T]: real rows)
    over a store that already holds their keys. Returns (mass [B,Hq,G], keys [B,Hq,G],
    spread [B,Hq], recall [B,Hq,G], vmass [B,Hq,G]) f32, means over the real rows (see :class:`Curves`)."""
    b, t, hq, d = q.shape
    k, v = store.dense_keys(), store.dense_values()  # [B,Hkv,S,D]
    hkv, s = k.shape[1], k.shape[2]
    g = group_size(hq, hkv)
    ng = grid.shape[0]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    sc = jnp.einsum("bthgd,bhsd->bhgts", qg, k.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).reshape(b, hq, t, s)
    kpos = jnp.arange(s)
    pos = positions[:, :, None]
    valid = (kpos <= pos) & (kpos < store.lengths[:, None, None]) & row_ok[:, :, None]  # [B,T,S]
    sw = valid & ((kpos < sink) | (kpos > pos - window))
    out = (valid & ~sw)[:, None]  # [B,1,T,S] keys DIPR may add
    valid = valid[:, None]
    m = jnp.max(jnp.where(valid, sc, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp((sc - m) / jnp.sqrt(jnp.float32(d))), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    # Bin of every key: the first grid β that puts it in range (gap ≤ β).
    gap = jnp.where(out, m - sc, jnp.inf)
    bins = jnp.searchsorted(grid, gap, side="left")  # [B,Hq,T,S] in [0, G]; G = never (not an out key)
    rows = b * hq * t
    seg = (jnp.arange(rows).reshape(b, hq, t, 1) * (ng + 1) + bins).reshape(-1)
    pm = jax.ops.segment_sum(jnp.where(out, p, 0.0).reshape(-1), seg, num_segments=rows * (ng + 1))
    cnt = jax.ops.segment_sum(jnp.broadcast_to(out, (b, hq, t, s)).astype(jnp.float32).reshape(-1), seg,
                              num_segments=rows * (ng + 1))
    pm = jnp.cumsum(pm.reshape(b, hq, t, ng + 1)[..., :ng], axis=-1)
    cnt = jnp.cumsum(cnt.reshape(b, hq, t, ng + 1)[..., :ng], axis=-1)
    p_out = jnp.sum(jnp.where(out, p, 0.0), axis=-1)  # [B,Hq,T]
    mass = jnp.where(p_out[..., None] > 0, pm / jnp.maximum(p_out[..., None], 1e-30), 1.0)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.float32)  # [B,1,T]
    n_sw = jnp.sum(sw, axis=-1).astype(jnp.float32)[:, None]
    keys = (cnt + n_sw[..., None]) / jnp.maximum(n_valid, 1.0)[..., None]
    # Absolute recall: softmax mass on DIPR(β) ∪ sink ∪ window.
    p_sw = jnp.sum(jnp.where(sw[:, None], p, 0.0), axis=-1)  # [B,Hq,T]
    recall = p_sw[..., None] + pm
    # Value distance of every key from the full output: what dropping it costs the output.
    vv = v.astype(jnp.float32)
    pg = p.reshape(b, hkv, g, t, s)
    o = jnp.einsum("bhgts,bhsd->bhgtd", pg, vv, precision=jax.lax.Precision.HIGHEST)  # full output
    vo = jnp.einsum("bhgtd,bhsd->bhgts", o, vv, precision=jax.lax.Precision.HIGHEST)
    v2 = jnp.sum(vv * vv, axis=-1)[:, :, None, None, :]
    o2 = jnp.sum(o * o, axis=-1)[..., None]
    dist = jnp.sqrt(jnp.maximum(v2 - 2 * vo + o2, 0.0)).reshape(b, hq, t, s)  # ‖v_s − o_t‖
    pd = p * dist
    vm = jax.ops.segment_sum(jnp.where(out, pd, 0.0).reshape(-1), seg, num_segments=rows * (ng + 1))
    vm = jnp.cumsum(vm.reshape(b, hq, t, ng + 1)[..., :ng], axis=-1)
    vmass = jnp.sum(jnp.where(sw[:, None], pd, 0.0), axis=-1)[..., None] + vm
    # Value spread of the keys outside sink and window.
    pt = jnp.where(out, p, 0.0) / jnp.maximum(p_out[..., None], 1e-30)  # [B,Hq,T,S]
    ptg = pt.reshape(b, hkv, g, t, s)
    mean_v = jnp.einsum("bhgts,bhsd->bhgtd", ptg, vv, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.einsum("bhgts,bhs->bhgt", ptg, jnp.sum(vv * vv, axis=-1), precision=jax.lax.Precision.HIGHEST)
    spread = jnp.sqrt(jnp.maximum(sq - jnp.sum(mean_v * mean_v, axis=-1), 0.0)).reshape(b, hq, t)
    w = row_ok.astype(jnp.float32)[:, None, :]  # [B,1,T]
    nw = jnp.maximum(jnp.sum(w, axis=-1), 1.0)  # [B,1]
    avg = lambda x: jnp.sum(x * w[..., None], axis=2) / nw[..., None]
    return avg(mass), avg(keys), jnp.sum(spread * w, axis=-1) / nw, avg(recall), avg(vmass)


def tail_error_curve(q: jax.Array, store: KVStore, positions: jax.Array, row_ok: jax.Array, *, sink: int,
                     window: int, grid: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """(err, rel) f32 [B, Hq, G]: per query head and grid β the mean over the real rows of ‖o_β − o‖₂ and of
    ‖o_β − o‖₂ / ‖o‖₂ — o_β the output
    of DIPR(β) ∪ sink ∪ window attended exactly plus the estimated tail of ``mode`` over the other keys,
    o full attention (q [B,T,Hq,D] at ``positions`` [B,T], the store already holding their keys; see
    :class:`Curves`). The rows are folded into the query heads of each KV head so that the tail is the
    decode steps' own (:func:`alaya_jax.attention.tail.tail_partial`); a block's value mean may include
    keys after a row's position (the block's, as the store holds it)."""
    b, t, hq, d = q.shape
    hkv, s = store.num_kv_heads, store.capacity
    g = group_size(hq, hkv)
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv * t * g, d)

    def fold(x):  # [B, Hq, T, S] (query head major) → [B, Hkv·T·G, S]
        return x.reshape(b, hkv, g, t, s).transpose(0, 1, 3, 2, 4).reshape(b, hkv * t * g, s)

    kpos = jnp.arange(s)
    pos = positions[:, :, None]
    visible = (kpos <= pos) & (kpos < store.lengths[:, None, None]) & row_ok[:, :, None]  # [B,T,S]
    sw = visible & ((kpos < sink) | (kpos > pos - window))
    vis = fold(jnp.broadcast_to(visible[:, None], (b, hq, t, s)))
    swf = fold(jnp.broadcast_to(sw[:, None], (b, hq, t, s)))
    k, v = store.dense_keys(), store.dense_values()
    sc = raw_scores(qf, k)
    est = tail_mod.code_estimates(qf, store)
    m = jnp.max(jnp.where(vis, sc, -jnp.inf), axis=-1, keepdims=True)
    gap = jnp.where(vis, m - sc, jnp.inf)
    full, _ = masked_attention(qf, k, v, vis, scores=sc)

    norm = jnp.linalg.norm(full, axis=-1)

    def err_at(beta):
        sel = vis & ((gap <= beta) | swf)
        o_sel, lse_sel = masked_attention(qf, k, v, sel, scores=sc)
        o_t, lse_t = tail_mod.tail_partial(qf, store, vis & ~sel, mode=mode, scores=sc, estimates=est)
        o, _ = tail_mod.merge_by_lse(jnp.stack([o_sel, o_t]), jnp.stack([lse_sel, lse_t]))
        e = jnp.linalg.norm(o - full, axis=-1)  # [B, Hkv·T·G]
        return jnp.stack([e, e / jnp.where(norm > 0, norm, 1.0)])

    err = jax.lax.map(err_at, grid)  # [G, 2, B, Hkv·T·G]
    err = err.reshape(-1, 2, b, hkv, t, g).transpose(1, 2, 3, 5, 4, 0).reshape(2, b, hq, t, -1)  # [2,B,Hq,T,G]
    w = row_ok.astype(jnp.float32)[:, None, :, None]
    mean = jnp.sum(err * w, axis=3) / jnp.maximum(jnp.sum(w, axis=2), 1.0)
    return mean[0], mean[1]


def calibration_inputs(tails: Sequence[Sequence[int]], lengths: np.ndarray):
    """Left-padded rows of the last tokens of every sequence: (tokens int32 [B,T], positions int32
    [B,T], row_ok bool [B,T]). ``tails[b]`` are the last ``len(tails[b])`` tokens of a context of
    ``lengths[b]`` tokens (already in the cache)."""
    t = max(1, max(len(x) for x in tails))
    b = len(tails)
    toks = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    ok = np.zeros((b, t), bool)
    for i, tail in enumerate(tails):
        n = len(tail)
        if n > int(lengths[i]):
            raise ValueError(f"sequence {i}: {n} calibration tokens for a context of {int(lengths[i])}")
        toks[i, t - n:] = tail
        pos[i, t - n:] = np.arange(int(lengths[i]) - n, int(lengths[i]))
        ok[i, t - n:] = True
    return toks, pos, ok


def betas_for_mass(curves: Curves, target: float) -> np.ndarray:
    """Mass mode: per (layer, sequence, head) the smallest grid β whose mean mass ≥ ``target``
    → f32 [L, B, Hq] (inf where only every key reaches it)."""
    if not (0.0 < target <= 1.0):
        raise ValueError(f"mass target must be in (0, 1], got {target}")
    ok = curves.mass >= target - 1e-9
    ok[..., -1] = True  # β = ∞ holds all the mass
    return curves.grid[np.argmax(ok, axis=-1)].astype(np.float32)


def betas_for_budget(curves: Curves, fraction: float, *, weight: Optional[np.ndarray] = None) -> np.ndarray:
    """Budget mode: a β per (layer, head) for each sequence, water-filled so that the mean over
    layers and heads of the calibration ``keys`` fraction is ``fraction`` (at most; within one
    grid step of one head) → f32 [L, B, Hq].

    Every head starts at β = 0; each step moves the head whose next point on the upper hull of
    its (keys, weight·mass) curve buys the most per key; when the hull step of the best head
    no longer fits, smaller (next grid point) steps fill what is left. ``weight`` [L, B, Hq]
    (default 1): the value of one unit of a head's mass."""
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"key budget must be in (0, 1], got {fraction}")
    L, B, H, G = curves.mass.shape
    out = np.empty((L, B, H), np.float32)
    w = np.ones((L, B, H)) if weight is None else np.asarray(weight, np.float64)
    for bi in range(B):
        keys = curves.keys[:, bi].reshape(L * H, G)
        gain = (curves.mass[:, bi] * w[:, bi][..., None]).reshape(L * H, G)
        keys = np.maximum.accumulate(keys, axis=-1)
        floor = keys[:, 0].mean()
        if fraction < floor - 1e-12:
            raise ConfigError(f"key budget {fraction:.2%} is below what sink, window and β = 0 attend "
                             f"({floor:.2%} of this context's keys)")
        budget = fraction * L * H
        cur = np.zeros(L * H, int)
        spent = keys[:, 0].sum()

        def hull_step(h):
            c = cur[h]
            dk = keys[h, c + 1:] - keys[h, c]
            dm = gain[h, c + 1:] - gain[h, c]
            if dk.size == 0:
                return None
            r = np.where(dk > 0, dm / np.maximum(dk, 1e-300), np.where(dm >= 0, np.inf, -np.inf))
            j = int(np.argmax(r))
            return r[j], c + 1 + j

        heap = []
        for h in range(L * H):
            st = hull_step(h)
            if st is not None:
                heapq.heappush(heap, (-st[0], h, st[1]))
        while heap:
            negr, h, j = heapq.heappop(heap)
            if cur[h] >= j:
                continue
            cost = keys[h, j] - keys[h, cur[h]]
            if spent + cost > budget + 1e-12:
                # Too big: try the head's next grid point instead, or drop the head from the heap.
                nxt = cur[h] + 1
                if nxt < j and spent + keys[h, nxt] - keys[h, cur[h]] <= budget + 1e-12:
                    dk = keys[h, nxt] - keys[h, cur[h]]
                    r = (gain[h, nxt] - gain[h, cur[h]]) / dk if dk > 0 else np.inf
                    heapq.heappush(heap, (-r, h, nxt))
                continue
            spent += cost
            cur[h] = j
            st = hull_step(h)
            if st is not None:
                heapq.heappush(heap, (-st[0], h, st[1]))
        out[:, bi] = curves.grid[cur].reshape(L, H)
    return out


def spent_fraction(curves: Curves, betas: np.ndarray) -> np.ndarray:
    """Mean calibration keys fraction per sequence [B] for βs [L, B, Hq] on the grid."""
    idx = np.searchsorted(curves.grid, betas)
    return np.take_along_axis(curves.keys, idx[..., None], axis=-1)[..., 0].mean(axis=(0, 2))


def held_mass(curves: Curves, betas: np.ndarray) -> np.ndarray:
    """Mean calibration mass per (layer, sequence, head) [L, B, Hq] for βs on the grid."""
    idx = np.searchsorted(curves.grid, betas)
    return np.take_along_axis(curves.mass, idx[..., None], axis=-1)[..., 0]


# How curves become βs: "<granularity>-<gain>". granularity: "head" (a β per query head) or "layer" (the
# heads of a layer share one β, chosen on their summed curves); gain: what a key buys — "mass" (share of the
# mass outside sink and window), "spread" (that mass × the head's value spread), "recall" (absolute softmax
# mass), "vdist" (value-weighted mass Σ p‖v − o‖), "tail" (the fall of the output error with the estimated
# tail, ``Curves.tail_err``) or "tailrel" (of that error relative to the output, ``Curves.tail_rel``); the
# tail gains are for budget mode only. Mass mode reads the gain as a fraction of its total.
# bench/results/quality_calibrated/quality_calibrated.md reports what each does to the KL.
ALLOCATIONS = tuple(f"{g}-{k}" for g in ("head", "layer") for k in ("mass", "spread", "recall", "vdist", "tail",
                                                                        "tailrel"))
#: The allocations that need a key budget (their gain is an output error, which has no "fraction of a total").
BUDGET_ONLY_ALLOCATIONS = tuple(a for a in ALLOCATIONS if a.split("-")[1] in ("tail", "tailrel"))
DEFAULT_ALLOCATION = "head-recall"


def gain_curves(curves: Curves, kind: str) -> np.ndarray:
    """[L, B, Hq, G] the gain curve of one kind (see :data:`ALLOCATIONS`)."""
    if kind == "mass":
        return curves.mass
    if kind == "spread":
        return curves.mass * curves.spread[..., None]
    if kind == "recall":
        return curves.recall
    if kind == "vdist":
        return curves.vmass
    if kind in ("tail", "tailrel"):
        if curves.tail_err is None:
            raise ValueError("the tail allocations need curves computed with a tail (calibration_curves(tail=...))")
        return -(curves.tail_err if kind == "tail" else curves.tail_rel)
    raise ValueError(f"unknown gain {kind!r}")


def choose_betas(curves: Curves, *, mass: Optional[float] = None, keys: Optional[float] = None,
                 allocation: str = DEFAULT_ALLOCATION) -> np.ndarray:
    """βs [L, B, Hq] for one mode: ``mass`` (mass mode: the smallest β whose gain reaches this
    fraction of its total) or ``keys`` (budget mode: water-filled), per ``allocation`` (one of
    :data:`ALLOCATIONS`)."""
    if (mass is None) == (keys is None):
        raise ValueError("give exactly one of mass (dipr_mass) and keys (dipr_keys)")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    granularity, kind = allocation.split("-")
    if allocation in BUDGET_ONLY_ALLOCATIONS and mass is not None:
        raise ConfigError("the tail-aware allocation chooses βs for a key budget (dipr_keys), not a mass target")
    gain = gain_curves(curves, kind)
    if granularity == "layer":
        gain = gain.sum(axis=2, keepdims=True)
        c = dataclasses.replace(curves, keys=curves.keys.mean(axis=2, keepdims=True),
                                spread=curves.spread.mean(axis=2, keepdims=True), mass=gain)
    else:
        c = dataclasses.replace(curves, mass=gain)
    if mass is not None:
        c = dataclasses.replace(c, mass=c.mass / np.maximum(c.mass[..., -1:], 1e-30))
        b = betas_for_mass(c, mass)
    else:
        b = betas_for_budget(c, keys)
    return broadcast_heads(b, curves.mass.shape[2]) if granularity == "layer" else b


def broadcast_heads(betas: np.ndarray, num_q_heads: int) -> np.ndarray:
    """βs [L, B, 1] → [L, B, Hq]."""
    return np.broadcast_to(betas, betas.shape[:2] + (num_q_heads,)).copy()


def with_betas(caches: Sequence[KVStore], betas: np.ndarray) -> tuple[KVStore, ...]:
    """The caches with ``dipr_beta`` set per layer from βs [L, B, Hq]."""
    if betas.shape[0] != len(caches):
        raise ValueError(f"βs for {betas.shape[0]} layers, caches have {len(caches)}")
    return tuple(c.replace(dipr_beta=jnp.asarray(betas[i], jnp.float32)) for i, c in enumerate(caches))


def beta_summary(caches: Sequence[KVStore]) -> Optional[list[dict]]:
    """Per layer min / median / max of the calibrated βs (None when not calibrated); inf as None."""
    if caches[0].dipr_beta is None:
        return None
    f = lambda x: None if not np.isfinite(x) else float(x)
    out = []
    for i, c in enumerate(caches):
        bt = np.asarray(c.dipr_beta, np.float64)
        out.append({"layer": i, "min": f(bt.min()), "median": f(np.median(bt)), "max": f(bt.max())})
    return out


__all__ = ["BETA_GRID", "Curves", "layer_curves", "calibration_inputs", "betas_for_mass", "betas_for_budget",
           "spent_fraction", "held_mass", "ALLOCATIONS", "DEFAULT_ALLOCATION", "choose_betas", "gain_curves",
           "broadcast_heads", "with_betas", "beta_summary"]
