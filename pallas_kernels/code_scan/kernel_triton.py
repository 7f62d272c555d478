"""Pallas kernel (Triton lowering) of the code scan: the filter step of filter-refine DIPR.

Grid (B, Hkv, NS). Program (b, h, j):
  1. scores the forced positions (sink + window, gathered by index, padded to F >= 16) exactly
     for the G query heads of the group (rows padded to Gp >= 16 for tl.dot): M_sw and the
     threshold M_sw' - β with M_sw' = max(s - slack·‖q‖₁·‖k‖∞);
  2. walks the tiles [start_j, end_j) of its split (``layout.split_tiles``), reading each tile's
     codes [T, D/2] uint8, scales and errs ONCE for the whole group: nibbles unpacked with
     shifts/masks into f16 (exact ints in [-7, 7]), est = scale·qscale·(q16_lo·lo + q16_hi·hi)
     by two f16 MMAs [Gp, D/2] x [D/2, T] with f32 accumulation, δ by key_codes.bound_from_norms;
  3. compacts the tile's candidates in ascending order with a cumsum (exclusive rank) and a
     scatter to ``count + rank`` (non-candidates get distinct slots after the candidates and a
     False mask, so no two lanes ever target one slot) and keeps the true count (slots past it
     are never written: readers go by the count); tracks max(est - δ) per query row.

A Mosaic GPU port (a file beside this one) would need: the same grid as a
``plgpu.kernel``/``pallas_call`` over (B, Hkv, NS) with TMA (or cp.async) loads of the [T, D/2]
uint8 code tiles and the f16 scales/errs into a multi-stage SMEM pipeline
(``plgpu.emit_pipeline``); the nibble unpack as vector integer ops on registers; the two
[Gp, D/2] x [D/2, T] products as WGMMA with the codes converted to f16 in SMEM (or an
elementwise FMA form for G <= 4, as M = 64 is WGMMA's minimum); the row-gather of the forced
keys (a TMA gather or per-row async copies); and the compaction (cumsum + scatter) as a warp-level
prefix sum (ballot/popc) with plain global stores — Mosaic GPU has no scatter store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.code_scan.layout import forced_positions, searched_end, split_tiles
from pallas_kernels.common import compiler_params
from pallas_kernels.key_codes import bound_from_norms

_HI = jax.lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # a [M, K] · b [N, K]^T


def dot_nt(a, b):
    """a [M, K], b [N, K] -> f32 [M, N]: IEEE f32 (HIGHEST, no TF32) when a is f32, else a 16-bit
    MMA with f32 accumulation (b cast to a's dtype)."""
    if a.dtype == jnp.float32:
        return jax.lax.dot_general(a, b.astype(jnp.float32), _NT, precision=(_HI, _HI),
                                   preferred_element_type=jnp.float32)
    return jax.lax.dot_general(a, b.astype(a.dtype), _NT, preferred_element_type=jnp.float32)


_F16_1024 = 0x6400  # the f16 bit pattern of 1024.0: 0x6400 | n is exactly 1024 + n for 0 <= n < 1024


def unpack_nibbles(c):
    """c int32 [T, D/2] (bytes 0..255) -> (lo, hi) f16 [T, D/2]: the signed levels (c & 15) - 8 and
    (c >> 4) - 8, exact. Each nibble n becomes the f16 1024 + n by OR-ing it into the bit pattern of
    1024.0 and a bitcast, then 1032 is subtracted in f16 (exact: every value is a small integer), so
    the unpack needs integer ops and one f16 subtract instead of an int-to-float conversion (a
    quarter-rate instruction on NVIDIA GPUs)."""
    def level(n):
        bits = (n | _F16_1024).astype(jnp.uint16)
        return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1032.0)

    return level(c & 15), level(c >> 4)


def gather_rows(ref, rows, *, mask=None):
    """ref [N, D], rows int32 [R] (in range) -> [R, D] by an index gather (0 where mask is False)."""
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, ref.shape[1]), 1)
    view = ref.at[rows[:, None], cols]
    if mask is None:
        return plgpu.load(view)
    return plgpu.load(view, mask=mask[:, None], other=0)


def forced_tile(q, qsl, k_ref, length, *, sink: int, window: int, size: int):
    """Exact scores of the forced positions: (pos [F], ok bool [F], s f32 [Gp, F],
    s_lo f32 [Gp, F] = s - qsl·‖k‖∞); keys of entries not ok are read as 0 (never their NaN)."""
    pos, ok = forced_positions(length, sink=sink, window=window, size=size)
    pos = jnp.minimum(pos, k_ref.shape[0] - 1)
    k = gather_rows(k_ref, pos, mask=ok)
    s = dot_nt(q, k)
    kinf = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=1)[None, :]
    return pos, ok, s, s - qsl[:, None] * kinf


def _scan_kernel(
    len_ref,  # [1] int32
    q_ref,  # [Gp, D] score dtype (exact q, for the forced scores)
    qsl_ref,  # [Gp] f32: rounding_slack·‖q‖₁
    qlo_ref,  # [Gp, D/2] f16: q16[:, :D/2]
    qhi_ref,  # [Gp, D/2] f16: q16[:, D/2:]
    qs_ref,  # [Gp] f32: qscale (q' ≈ qscale·q16)
    l1_ref,  # [Gp] f32: ‖q'‖₁
    l2_ref,  # [Gp] f32: ‖q'‖₂
    beta_ref,  # [Gp] f32
    k_ref,  # [S, D] keys
    c_ref,  # [S, D/2] uint8 codes
    sc_ref,  # [S] f16 scales
    er_ref,  # [S] f16 errs
    cidx_ref,  # [C] int32 (out): candidates, ascending (slots past the count: not written)
    cnt_ref,  # [1] int32 (out): true candidate count of the split
    lb_ref,  # [Gp] f32 (out): max(est - δ) over the split's searched keys
    msw_ref,  # [Gp] f32 (out): exact max over the forced positions
    *,
    g: int,
    sink: int,
    window: int,
    tile: int,
    num_splits: int,
    capacity: int,
    fsize: int,
    ablate: str = "none",
):
    gp = q_ref.shape[0]
    head_dim = 2 * c_ref.shape[1]
    length = len_ref[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (gp, 1), 0) < g  # real query rows

    _, ok, s_f, s_lo = forced_tile(q_ref[...], qsl_ref[...], k_ref, length, sink=sink, window=window,
                                   size=fsize)
    okr = ok[None, :]
    msw_ref[...] = jnp.max(jnp.where(okr, s_f, -jnp.inf), axis=1)
    thr = (jnp.max(jnp.where(okr, s_lo, -jnp.inf), axis=1) - beta_ref[...])[:, None]  # [Gp, 1]

    t_start, t_end = split_tiles(length, pl.program_id(2), sink=sink, window=window, tile=tile,
                                 num_splits=num_splits)
    hi_end = searched_end(length, sink=sink, window=window)
    qlo, qhi = qlo_ref[...], qhi_ref[...]
    qs = qs_ref[...][:, None]
    l1 = l1_ref[...][:, None]
    l2 = l2_ref[...][:, None]
    lanes = jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def body(t, carry):
        count, lbm = carry
        base = t * tile
        c = c_ref[pl.ds(base, tile), :].astype(jnp.int32)  # [T, D/2]
        sc = sc_ref[pl.ds(base, tile)].astype(jnp.float32)[None, :]  # [1, T]
        er = er_ref[pl.ds(base, tile)].astype(jnp.float32)[None, :]
        if ablate == "load_only":  # diagnostics only (bench/diag/scan_ablation.py): wrong results
            return count, jnp.maximum(lbm, jnp.max(c).astype(jnp.float32) + jnp.max(sc) + jnp.max(er))
        lo, hi = unpack_nibbles(c)
        est = ((dot_nt(qlo, lo) + dot_nt(qhi, hi)) * qs) * sc  # [Gp, T]
        if ablate == "estimate_only":
            return count, jnp.maximum(lbm, jnp.max(est + er, axis=1))
        delta = bound_from_norms(l1, l2, sc, er, head_dim)
        pos = base + lanes
        searched = (pos >= sink) & (pos < hi_end)  # [T]
        hit = jnp.logical_not(est + delta < thr) & rows  # NaN (vacuous bound) is a hit
        cand = searched & (jnp.max(hit.astype(jnp.int32), axis=0) > 0)
        lb = est - delta
        lb = jnp.where(searched[None, :] & (lb == lb), lb, -jnp.inf)
        lbm = jnp.maximum(lbm, jnp.max(lb, axis=1))
        ci = cand.astype(jnp.int32)
        if ablate == "no_compaction":
            return count + jnp.sum(ci), lbm
        crank = jnp.cumsum(ci) - ci  # exclusive rank among the tile's candidates
        nc = jnp.sum(ci)
        dest = jnp.where(cand, count + crank, count + nc + (lanes - crank))  # a permutation
        plgpu.store(cidx_ref.at[dest], pos, mask=cand & (dest < capacity))
        return count + nc, lbm

    count, lbm = jax.lax.fori_loop(t_start, t_end, body,
                                   (jnp.int32(0), jnp.full((gp,), -jnp.inf, jnp.float32)))
    lb_ref[...] = lbm
    cnt_ref[...] = jnp.full((1,), count, jnp.int32)
    # Slots from min(count, capacity) on are left unwritten: readers go by the count.


def code_scan_pallas(
    lengths,  # [B] int32
    q,  # [B, Hkv, Gp, D] score dtype
    qslack,  # [B, Hkv, Gp] f32
    q16,  # [B, Hkv, Gp, D] f16
    qscale,  # [B, Hkv, Gp] f32
    l1,  # [B, Hkv, Gp] f32
    l2,  # [B, Hkv, Gp] f32
    beta,  # [B, Hkv, Gp] f32
    keys,  # [B, Hkv, Sp, D]  (Sp a multiple of tile)
    codes,  # [B, Hkv, Sp, D/2] uint8
    scales,  # [B, Hkv, Sp] f16
    errs,  # [B, Hkv, Sp] f16
    *,
    g: int,
    sink: int,
    window: int,
    tile: int,
    num_splits: int,
    capacity: int,
    fsize: int,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 3,
):
    """Returns (cand_idx [B,Hkv,NS,C] i32, counts [B,Hkv,NS] i32, lb [B,Hkv,NS,Gp] f32,
    m_sw [B,Hkv,NS,Gp] f32 (equal over NS))."""
    static = dict(g=g, sink=sink, window=window, tile=tile, num_splits=num_splits, capacity=capacity, fsize=fsize)
    return _scan_call((lengths, q, qslack, q16, qscale, l1, l2, beta, keys, codes, scales, errs), static,
                      interpret=interpret, num_warps=num_warps, num_stages=num_stages, ablate="none")


#: Parts of the scan that :func:`ablated_code_scan_pallas` can cut away.
ABLATIONS = ("load_only", "estimate_only", "no_compaction")


def ablated_code_scan_pallas(*operands, ablate: str, interpret: bool, num_warps: int = 4, num_stages: int = 3,
                             **static):
    """Diagnostics only (``bench/diag/scan_ablation.py``; wrong results): :func:`code_scan_pallas`
    (same operands and knobs) with parts cut away — "load_only" (read the tiles, nothing else),
    "estimate_only" (+ unpack and the two MMAs), "no_compaction" (+ bound and candidate test, no
    cumsum/scatter)."""
    if ablate not in ABLATIONS:
        raise ValueError(f"ablated_code_scan_pallas: ablate must be one of {ABLATIONS}, got {ablate!r}")
    return _scan_call(operands, static, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                      ablate=ablate)


def _scan_call(operands: tuple, static: dict, *, interpret: bool, num_warps: int, num_stages: int, ablate: str):
    """The scan's ``pallas_call`` on the operands of :func:`code_scan_pallas` (in its order) with its
    static knobs (``ablate``: "none", or one of :data:`ABLATIONS`)."""
    lengths, q, qslack, q16, qscale, l1, l2, beta, keys, codes, scales, errs = operands
    g, sink, window, tile = static["g"], static["sink"], static["window"], static["tile"]
    num_splits, capacity, fsize = static["num_splits"], static["capacity"], static["fsize"]
    b, hkv, gp, d = q.shape
    sp = keys.shape[2]
    dh = d // 2
    ns = num_splits
    kernel = functools.partial(_scan_kernel, g=g, sink=sink, window=window, tile=tile, num_splits=ns,
                               capacity=capacity, fsize=fsize, ablate=ablate)
    row = lambda i, h, j: (i, h, 0)  # noqa: E731
    mat = lambda i, h, j: (i, h, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, ns),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (i,)),
            pl.BlockSpec((None, None, gp, d), mat),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, gp, dh), mat),
            pl.BlockSpec((None, None, gp, dh), lambda i, h, j: (i, h, 0, 1)),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, gp), row),
            pl.BlockSpec((None, None, sp, d), mat),
            pl.BlockSpec((None, None, sp, dh), mat),
            pl.BlockSpec((None, None, sp), row),
            pl.BlockSpec((None, None, sp), row),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, capacity), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, 1), lambda i, h, j: (i, h, j)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, ns, capacity), jnp.int32),
            jax.ShapeDtypeStruct((b, hkv, ns), jnp.int32),
            jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="code_scan",
    )(lengths, q, qslack, q16, q16, qscale, l1, l2, beta, keys, codes, scales, errs)
