"""Pallas kernel (Triton lowering) of the code scan: the filter step of filter-refine DIPR.

Grid (B, Hkv, NS). Program (b, h, j) serves the G query heads of KV head h (rows padded to Gr >= 8):

1. **prologue** (once per program, no XLA op before it but the query rotation): the exact scores of the
   forced positions (sink and window rows of the keys, gathered by index, one MMA), their max M_sw and
   the candidate threshold; the two int8 planes of the rotated query and the bound's coefficients
   (``arithmetic``);
2. **tile loop** over the tiles [start_j, end_j) of its split (``layout.split_tiles``; the last tile of the
   store is moved back to end at S, so S need not be a multiple of the tile: the overlap is scanned twice
   and flagged identically): per tile of T keys, the codes [T, D/2] uint8, scales and errs (one tile
   ahead, a register double buffer) are read once for the group; the nibbles become int8 MMA operands
   with one AND (and an XOR) per byte; two int8 MMAs [T, D/2] x [D/2, 2·Gr] give exact int32 sums of
   both query planes; est, δ and the test are elementwise, the group's "any" is a reduction inside a
   thread and the flag byte of each key is stored elementwise (no reduction across warps, no carried
   offset: nothing serialises the loop);
3. **epilogue**: after a CTA barrier the program reads its own flags back (chunks of C keys, L2-resident)
   and compacts them into its split's list (an exclusive cumsum and a scatter a chunk; the offset is
   carried per chunk of C, not per tile): the split's candidates in ascending order and their count.

The refine kernels (``pallas_kernels.refine_attention``) share this file's helpers: the forced scores
(identical code, so both kernels compute them the same way), the row gathers and the query-row loads.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.code_scan import arithmetic as ar
from pallas_kernels.code_scan.layout import forced_positions, searched_end, split_tiles
from pallas_kernels.common import compiler_params

_HI = jax.lax.Precision.HIGHEST
_NN = (((1,), (0,)), ((), ()))  # a [M, K] · b [K, N]
_TN = (((0,), (0,)), ((), ()))  # a [K, M]^T · b [K, N]


def dot_rows(k, qt):
    """k [N, D] · qt [D, R] -> f32 [N, R] (keys on the MMA's M): IEEE f32 (HIGHEST, no TF32) when qt is f32,
    else a 16-bit MMA with f32 accumulation (k cast to qt's dtype)."""
    if qt.dtype == jnp.float32:
        return jax.lax.dot_general(k.astype(jnp.float32), qt, _NN, precision=(_HI, _HI),
                                   preferred_element_type=jnp.float32)
    return jax.lax.dot_general(k.astype(qt.dtype), qt, _NN, preferred_element_type=jnp.float32)


def dot_tn(v, p):
    """v [N, D], p f32 [N, R] -> f32 [D, R] = vᵀ·p (16-bit values: p in their dtype, f32 accumulation)."""
    if v.dtype == jnp.float32:
        return jax.lax.dot_general(v, p, _TN, precision=(_HI, _HI), preferred_element_type=jnp.float32)
    return jax.lax.dot_general(v, p.astype(v.dtype), _TN, preferred_element_type=jnp.float32)


def gather_rows(ref, rows, *, mask=None):
    """ref [N, D], rows int32 [R] (in range) -> [R, D] by an index gather (0 where mask is False)."""
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, ref.shape[1]), 1)
    view = ref.at[rows[:, None], cols]
    if mask is None:
        return plgpu.load(view)
    return plgpu.load(view, mask=mask[:, None], other=0)


def query_tile(ref, rows: int, g: int, *, col0: int = 0, cols: int = None):
    """The group's query rows of a [Gi, D] block as a [rows, cols] tile (rows >= G are 0): row r reads
    row min(r, Gi - 1) of the block, so no padded copy of the query is needed in XLA."""
    gi = ref.shape[0]
    cols = ref.shape[1] if cols is None else cols
    r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    c = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1)
    x = plgpu.load(ref.at[jnp.minimum(r, gi - 1), c])
    return jnp.where(r < g, x, jnp.zeros((), x.dtype))


def row_vector(ref, rows: int, g: int, fill):
    """A [Gi] block as a [rows] vector (rows >= G are ``fill``)."""
    r = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    x = plgpu.load(ref.at[jnp.minimum(r, ref.shape[0] - 1)])
    return jnp.where(r < g, x, jnp.asarray(fill, x.dtype))


def store_rows(ref, x, g: int):
    """Store the first min(G, Gi) entries of x [rows] into a [Gi] block. (A masked store never clamps its
    indices: masked-out lanes may point past the block, they write nothing; clamped, they would alias a
    written slot, which interpret mode's scatter does not order.)"""
    r = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    plgpu.store(ref.at[r], x, mask=r < min(g, ref.shape[0]))


def store_transposed(ref, xt, g: int):
    """Store xᵀ [D, Gr] into the first min(G, Gi) rows of a [Gi, D] block."""
    gi = ref.shape[0]
    rr = jax.lax.broadcasted_iota(jnp.int32, (1, xt.shape[1]), 1)
    dd = jax.lax.broadcasted_iota(jnp.int32, (xt.shape[0], 1), 0)
    plgpu.store(ref.at[rr, dd], xt, mask=rr < min(g, gi))


def forced_scores_tile(q, k_ref, length, *, sink: int, window: int, size: int):
    """Exact scores of the forced positions: (pos int32 [F], ok bool [F], s f32 [F, Gr]); q [Gr, D] in the
    score dtype. Keys of entries not ok are read as 0 (never their NaN)."""
    pos, ok = forced_positions(length, sink=sink, window=window, size=size)
    pos = jnp.minimum(pos, k_ref.shape[0] - 1)
    return pos, ok, dot_rows(gather_rows(k_ref, pos, mask=ok), q.T)


def forced_size(sink: int, window: int) -> int:
    """Padded count of forced positions a program scores (a power of two >= 16, the MMA's M)."""
    n = int(sink) + int(window)
    return max(16, 1 << max(0, (n - 1).bit_length()))


def scan_setup(length, q_ref, qr_ref, beta_ref, k_ref, *, g: int, rows: int, sink, window, rounding_slack: float,
               size: Optional[int] = None, mlb_ref=None):
    """The program's loop invariants: a dict of the int8 operands (``q_lo``, ``q_hi`` int8 [D/2, 2·Gr]),
    ``colscale`` [2·Gr], ``k_off``, ``ca``, ``cb``, ``ce``, ``thr``, ``m_sw`` f32 [Gr] and ``live`` bool [Gr]
    (the rows < G)."""
    d = q_ref.shape[1]
    dh = d // 2
    q = query_tile(q_ref, rows, g)  # [Gr, D] score dtype
    q_l1 = jnp.sum(jnp.abs(q.astype(jnp.float32)), axis=1)
    size = forced_size(sink, window) if size is None else size  # None: sink and window are the static ints
    _, ok_f, s_f = forced_scores_tile(q, k_ref, length, sink=sink, window=window, size=size)
    live = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < g
    m_sw = jnp.max(jnp.where(ok_f[:, None], s_f, -jnp.inf), axis=0)
    m_thr = m_sw if mlb_ref is None else jnp.maximum(m_sw, row_vector(mlb_ref, rows, g, -jnp.inf))
    thr = m_thr - row_vector(beta_ref, rows, g, 0.0)
    parts = [query_tile(qr_ref, rows, g, col0=0, cols=dh), query_tile(qr_ref, rows, g, col0=dh, cols=dh)]
    (n1_lo, n1_hi), (n2_lo, n2_hi), s1, s2, dq = ar.split_query(parts, d)
    l1 = jnp.sum(jnp.abs(parts[0]), axis=1) + jnp.sum(jnp.abs(parts[1]), axis=1)
    l2 = jnp.sqrt(jnp.sum(parts[0] * parts[0], axis=1) + jnp.sum(parts[1] * parts[1], axis=1))
    ca, cb, ce = ar.row_coefficients(l1, l2, dq, q_l1, head_dim=d, rounding_slack=rounding_slack)

    def operand(n1, n2):  # [Gr, D/2] x2 -> int8 [D/2, 2·Gr] (the planes side by side)
        return ar.side_by_side(n1.T, n2.T).astype(jnp.int8)

    return dict(q_lo=operand(n1_lo, n2_lo), q_hi=operand(n1_hi, n2_hi),
                colscale=ar.side_by_side(s1 / 16.0, s2 / 16.0), k_off=ar.plane_offset(n1_lo, n2_lo, s1, s2),
                ca=ca, cb=cb, ce=ce, thr=jnp.where(live, thr, jnp.inf), m_sw=m_sw, live=live)


def tile_estimate(inv, c, sc16, *, rows: int):
    """est f32 [T, Gr] of a code tile c uint8 [T, D/2] with scales f16 [T]."""
    lo, hi = ar.code_operands(c)
    a = (16 * jax.lax.dot_general(lo, inv["q_lo"], _NN, preferred_element_type=jnp.int32)
         + jax.lax.dot_general(hi, inv["q_hi"], _NN, preferred_element_type=jnp.int32))  # [T, 2·Gr] exact
    return ar.estimate(a, inv["colscale"][None, :], inv["k_off"][None, :], sc16.astype(jnp.float32)[:, None],
                       rows=rows)


def tile_hits(inv, est, sc16, er16):
    """bool [T, Gr]: not(est + δ < thr) per key and query row."""
    delta = ar.key_bound(inv["ca"][None, :], inv["cb"][None, :], inv["ce"][None, :], sc16[:, None], er16[:, None])
    return ar.is_candidate(est, delta, inv["thr"][None, :])


def tile_base(t, *, tile: int, capacity: int):
    """First position of tile t; when the capacity is not a multiple of the tile, the store's last tile is
    moved back to end at the capacity (static: no clamp in the common case)."""
    if capacity % tile == 0:
        return pl.multiple_of(t * tile, tile)
    align = math.gcd(tile, capacity)
    return pl.multiple_of(jnp.minimum(t * tile, capacity - tile), align & -align)


def scan_tiles(inv, length, c_ref, sc_ref, er_ref, flags_ref, *, rows: int, sink, window, tile: int,
               num_splits: int, tail=None):
    """The tile loop of program (b, h, j): stores the flag byte of every key of its split's tiles; returns the
    split's (first tile, end tile), and with ``tail`` (a dict of ``tail_setup``) also the split's tail sums
    (``tail_tile``): (oᵀ f32 [D, Gr], l f32 [Gr])."""
    s_cap = c_ref.shape[0]
    t_start, t_end = split_tiles(length, pl.program_id(2), sink=sink, window=window, tile=tile,
                                 num_splits=num_splits)
    hi_end = searched_end(length, sink=sink, window=window)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def meta(t):
        base = tile_base(t, tile=tile, capacity=s_cap)
        return sc_ref[pl.ds(base, tile)], er_ref[pl.ds(base, tile)]

    def body(t, carry):
        sc16, er16 = carry[0] if tail is not None else carry  # this tile's scales and errs, loaded one ahead
        base = tile_base(t, tile=tile, capacity=s_cap)
        c = c_ref[pl.ds(base, tile), :]
        ahead = meta(jnp.minimum(t + 1, t_end - 1))
        est = tile_estimate(inv, c, sc16, rows=rows)
        hit = tile_hits(inv, est, sc16, er16)
        pos = base + lanes
        cand = (pos >= sink) & (pos < hi_end) & (jnp.max(hit.astype(jnp.int32), axis=1) > 0)
        flags_ref[pl.ds(base, tile)] = cand.astype(jnp.uint8)
        if tail is None:
            return ahead
        # searched non-candidates, each counted once (a tile moved back to end at S skips what the tile
        # before it covered)
        rest = (pos >= jnp.maximum(sink, t * tile)) & (pos < hi_end) & ~cand
        return (ahead, *tail_tile(tail, inv, est, pos, rest, cand, carry[1], carry[2], base=base, tile=tile,
                                  capacity=s_cap))

    first = meta(jnp.maximum(jnp.minimum(t_start, t_end - 1), 0))
    if tail is None:
        jax.lax.fori_loop(t_start, t_end, body, first)
        return t_start, t_end
    d = tail["vm_ref"].shape[1]
    init = (first, jnp.zeros((d, rows), jnp.float32), jnp.zeros((rows,), jnp.float32))
    _, ot, lt = jax.lax.fori_loop(t_start, t_end, body, init)
    return t_start, t_end, ot, lt


def tail_setup(inv, vm_ref, est_ref, *, block_size: int, sm_scale: float):
    """The estimated tail's invariants: the reference m_sw (0 where -inf: then every searched key is a
    candidate and the scan's tail is empty) — a searched non-candidate has est + δ < M_sw − β, so its
    weight exp((est − M_sw)·scale) is < 1 with no running max."""
    ref = jnp.where(inv["m_sw"] > -jnp.inf, inv["m_sw"], 0.0)
    return dict(vm_ref=vm_ref, est_ref=est_ref, ref=ref, bk=int(block_size), sm_scale=float(sm_scale))


def tail_tile(tail, inv, est, pos, rest, cand, ot, lt, *, base, tile: int, capacity: int):
    """One tile's part of the estimated tail: stores the candidates' estimates (the attend pass weighs the
    candidates it rejects by them) and adds the weights w = exp((est − M_sw)·scale) of the ``rest`` keys
    [T] to l [Gr] and Σ_b w_b·V̄_b to oᵀ [D, Gr], block by block (V̄ rows of the value means [NB, D])."""
    est_ref, vm_ref, bk = tail["est_ref"], tail["vm_ref"], tail["bk"]
    gi = est_ref.shape[1]
    rows = est.shape[1]
    nb, d = vm_ref.shape
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    plgpu.store(est_ref.at[pos[:, None], cols], est, mask=cand[:, None] & (cols < gi))
    live = inv["live"][None, :]
    w = jnp.where(rest[:, None] & live, jnp.exp((est - tail["ref"][None, :]) * tail["sm_scale"]), 0.0)  # [T, Gr]
    blk = pos // bk
    b0 = base // bk
    aligned = capacity % tile == 0 and tile % bk == 0
    dd = jax.lax.broadcasted_iota(jnp.int32, (d,), 0)
    for j in range(tile // bk if aligned else (tile + bk - 1) // bk + 1):  # the blocks the tile touches
        wj = jnp.sum(jnp.where((blk == b0 + j)[:, None], w, 0.0), axis=0)  # [Gr] = w_b
        bj = jnp.minimum(b0 + j, nb - 1)
        vbar = plgpu.load(vm_ref.at[jnp.full((d,), bj, jnp.int32), dd]).astype(jnp.float32)  # [D]
        vbar = jnp.where(jnp.sum(wj) > 0, vbar, 0.0)  # a block with no weight: never its (maybe NaN) mean
        ot = ot + vbar[:, None] * wj[None, :]
        lt = lt + wj
    return ot, lt


def _scan_kernel(len_ref, sink_ref, win_ref, q_ref, qr_ref, beta_ref, mlb_ref, k_ref, c_ref, sc_ref, er_ref, *refs,
                 g: int, rows: int, forced: int, tile: int, num_splits: int, chunk: int, rounding_slack: float,
                 interpret: bool, tail_kw=None):
    if tail_kw is None:
        flags_ref, lists_ref, cnt_ref, msw_ref = refs
    else:
        vm_ref, flags_ref, lists_ref, cnt_ref, msw_ref, est_ref, to_ref, tl_ref = refs
    length, sink, window = len_ref[0], sink_ref[0], win_ref[0]  # the row's own forced counts (<= the static ones)
    s_cap = c_ref.shape[0]
    inv = scan_setup(length, q_ref, qr_ref, beta_ref, k_ref, g=g, rows=rows, sink=sink, window=window, size=forced,
                     rounding_slack=rounding_slack, mlb_ref=mlb_ref)
    if tail_kw is None:
        t_start, t_end = scan_tiles(inv, length, c_ref, sc_ref, er_ref, flags_ref, rows=rows, sink=sink,
                                    window=window, tile=tile, num_splits=num_splits)
    else:
        t_start, t_end, ot, lt = scan_tiles(inv, length, c_ref, sc_ref, er_ref, flags_ref, rows=rows, sink=sink,
                                            window=window, tile=tile, num_splits=num_splits,
                                            tail=tail_setup(inv, vm_ref, est_ref, **tail_kw))
        store_transposed(to_ref, ot, g)
        store_rows(tl_ref, lt, g)
    store_rows(msw_ref, inv["m_sw"], g)

    # ------------------------------------------------ epilogue: the split's flags -> its candidate list
    if not interpret:  # the flags written above by the other threads of this CTA must be visible
        plgpu.debug_barrier()
    p0 = t_start * tile
    p1 = jnp.minimum(t_end * tile, s_cap)
    nch = jnp.where(t_end > t_start, (p1 - p0 + chunk - 1) // chunk, 0)
    cl = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

    def compact(ch, count):
        pos = p0 + ch * chunk + cl
        inr = pos < p1
        f = plgpu.load(flags_ref.at[jnp.minimum(pos, s_cap - 1)], mask=inr, other=0)
        ok = inr & (f != 0)
        ci = ok.astype(jnp.int32)
        rank = jnp.cumsum(ci) - ci  # exclusive rank among the chunk's candidates
        n = jnp.sum(ci)
        dest = count + jnp.where(ok, rank, n + (cl - rank))  # a permutation of [count, count + C)
        plgpu.store(lists_ref.at[dest], pos, mask=ok)
        return count + n

    count = jax.lax.fori_loop(0, nch, compact, jnp.int32(0))
    cnt_ref[...] = jnp.full((1,), count, jnp.int32)


def scan_pallas(lengths, sinks, windows, q, q_rot, beta, m_lb, keys, codes, scales, errs, *, g: int, sink: int,
                window: int, tile: int, num_splits: int, list_size: int, chunk: int, rounding_slack: float,
                interpret: bool, num_warps: int = 4, num_stages: int = 3, value_means=None, block_size: int = 0,
                sm_scale: float = 0.0):
    """The raw kernel call on validated operands.

    lengths, sinks, windows [B] i32 (each row's forced counts, <= the static ``sink`` / ``window``); q
    [B, Hkv, Gi, D] (score dtype), q_rot f32 [B, Hkv, Gi, D], beta and m_lb (a lower bound of M, -inf: none)
    f32 [B, Hkv, Gi] (Gi >= G a power of two; rows >= G are ignored); keys [B, Hkv, S, D]; codes uint8 [B, Hkv, S, D/2];
    scales, errs f16 [B, Hkv, S]; S >= tile. Returns (flags uint8 [B, Hkv, S] (inside the splits' tiles:
    1 for a candidate), lists i32 [B, Hkv, NS, list_size] (the split's candidates ascending in the first
    count slots; the other slots unwritten), counts i32 [B, Hkv, NS], m_sw f32 [B, Hkv, Gi] (rows >= G
    unwritten)).

    ``value_means`` [B, Hkv, S / block_size, D] (the store's dtype; static switch: None compiles the kernel without the
    tail): also the estimated tail, appended to the outputs: est f32 [B, Hkv, S, Gi] (the estimates, written
    at the candidates only), o_tail f32 [B, Hkv, NS, Gi, D] = Σ_b w_b·V̄_b and l_tail f32 [B, Hkv, NS, Gi] =
    Σ w over the split's searched non-candidates, w = exp((est − M_sw)·sm_scale) (M_sw 0 where -inf)."""
    b, hkv, gi, d = q.shape
    s_cap = keys.shape[2]
    rows = max(8, gi)
    tail = value_means is not None
    tail_kw = dict(block_size=int(block_size), sm_scale=float(sm_scale)) if tail else None
    kernel = functools.partial(_scan_kernel, g=g, rows=rows, forced=forced_size(sink, window), tile=tile,
                               num_splits=num_splits, chunk=chunk, rounding_slack=float(rounding_slack),
                               interpret=interpret, tail_kw=tail_kw)
    row = lambda i, h, j: (i, h, 0)  # noqa: E731
    mat = lambda i, h, j: (i, h, 0, 0)  # noqa: E731
    split = lambda i, h, j: (i, h, j, 0)  # noqa: E731
    per_row = pl.BlockSpec((1,), lambda i, h, j: (i,))
    in_specs = [
        per_row, per_row, per_row,
        pl.BlockSpec((None, None, gi, d), mat),
        pl.BlockSpec((None, None, gi, d), mat),
        pl.BlockSpec((None, None, gi), row),
        pl.BlockSpec((None, None, gi), row),
        pl.BlockSpec((None, None, s_cap, d), mat),
        pl.BlockSpec((None, None, s_cap, d // 2), mat),
        pl.BlockSpec((None, None, s_cap), row),
        pl.BlockSpec((None, None, s_cap), row),
    ]
    out_specs = [
        pl.BlockSpec((None, None, s_cap), row),
        pl.BlockSpec((None, None, None, list_size), split),
        pl.BlockSpec((None, None, 1), lambda i, h, j: (i, h, j)),
        pl.BlockSpec((None, None, gi), row),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, s_cap), jnp.uint8),
        jax.ShapeDtypeStruct((b, hkv, num_splits, list_size), jnp.int32),
        jax.ShapeDtypeStruct((b, hkv, num_splits), jnp.int32),
        jax.ShapeDtypeStruct((b, hkv, gi), jnp.float32),
    ]
    operands = [lengths, sinks, windows, q, q_rot, beta, m_lb, keys, codes, scales, errs]
    if tail:
        in_specs.append(pl.BlockSpec((None, None, value_means.shape[2], d), mat))
        operands.append(value_means)
        out_specs += [pl.BlockSpec((None, None, s_cap, gi), mat),
                      pl.BlockSpec((None, None, None, gi, d), lambda i, h, j: (i, h, j, 0, 0)),
                      pl.BlockSpec((None, None, None, gi), split)]
        out_shape += [jax.ShapeDtypeStruct((b, hkv, s_cap, gi), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, num_splits, gi, d), jnp.float32),
                      jax.ShapeDtypeStruct((b, hkv, num_splits, gi), jnp.float32)]
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="code_scan_tail" if tail else "code_scan",
    )(*operands)
