"""Benchmark-only Pallas kernels: the code scan built up stage by stage, and a minimal load-only kernel.

``stage_call(stage, ...)`` runs a kernel with the grid, split layout and operands of the production scan
(``pallas_kernels.code_scan.kernel_triton.scan_pallas``), built from that module's own helpers, that stops
after one stage of the work (wrong results below "flags"; nothing is dead code: each folds its last value
into an elementwise carry that is stored once):

- ``load``: the tile loop reads each tile's codes, scales and errs (xor-folded);
- ``unpack``: + the int8 operands of the codes;
- ``prologue``: the program's prologue alone (sink/window scores, M_sw, the query planes), no loop;
- ``estimate``: prologue + loop with the two int8 MMAs and est;
- ``test``: + the bound and the candidate test (counts folded);
- ``flags``: + the flag store (the production kernel without its epilogue compaction).

The production kernel itself is the "full" row of the stage table. ``load_only`` is our own minimal
load-only kernel over the same code bytes (the TB/s reference, as ``../shared/probes/scan_load_probe.py``):
a static number of tiles a program, 68 bytes a key read, an xor fold, no reduction, no dynamic bounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.code_scan import arithmetic as ar
from pallas_kernels.code_scan import kernel_triton as kt
from pallas_kernels.code_scan.layout import searched_end, split_tiles
from pallas_kernels.common import compiler_params

STAGES = ("load", "unpack", "prologue", "estimate", "test", "flags")


def _stage_kernel(len_ref, q_ref, qr_ref, beta_ref, k_ref, c_ref, sc_ref, er_ref, fold_ref, *, stage: str, g: int,
                  rows: int, sink: int, window: int, tile: int, num_splits: int, rounding_slack: float):
    length = len_ref[0]
    s_cap, w = c_ref.shape
    t_start, t_end = split_tiles(length, pl.program_id(2), sink=sink, window=window, tile=tile,
                                 num_splits=num_splits)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
    hi_end = searched_end(length, sink=sink, window=window)
    inv = None
    if stage not in ("load", "unpack"):
        inv = kt.scan_setup(length, q_ref, qr_ref, beta_ref, k_ref, g=g, rows=rows, sink=sink, window=window,
                            rounding_slack=rounding_slack)
    if stage == "prologue":
        fold_ref[...] = jnp.full((tile,), jnp.sum(inv["m_sw"] + inv["ce"]) + jnp.sum(inv["q_lo"].astype(jnp.float32)))
        return

    def body(t, acc):  # elementwise carries: no reduction inside the loop
        base = kt.tile_base(t, tile=tile, capacity=s_cap)
        c = c_ref[pl.ds(base, tile), :]
        sc16, er16 = sc_ref[pl.ds(base, tile)], er_ref[pl.ds(base, tile)]
        if stage == "load":
            bits = (jax.lax.bitcast_convert_type(sc16, jnp.uint16) ^ jax.lax.bitcast_convert_type(er16, jnp.uint16))
            return acc[0] ^ c, acc[1] ^ bits
        if stage == "unpack":
            lo, hi = ar.code_operands(c)
            return acc[0] ^ lo ^ hi, acc[1] + sc16.astype(jnp.float32) + er16.astype(jnp.float32)
        est = kt.tile_estimate(inv, c, sc16, rows=rows)
        if stage == "estimate":
            return jnp.maximum(acc, est + er16.astype(jnp.float32)[:, None])
        hit = kt.tile_hits(inv, est, sc16, er16)
        pos = base + lanes
        return acc + ((pos >= sink) & (pos < hi_end) & (jnp.max(hit.astype(jnp.int32), axis=1) > 0)).astype(
            jnp.float32)

    init = {"load": (jnp.zeros((tile, w), jnp.uint8), jnp.zeros((tile,), jnp.uint16)),
            "unpack": (jnp.zeros((tile, w), jnp.int8), jnp.zeros((tile,), jnp.float32)),
            "estimate": jnp.full((tile, rows), -jnp.inf, jnp.float32),
            "test": jnp.zeros((tile,), jnp.float32)}[stage]
    acc = jax.lax.fori_loop(t_start, t_end, body, init)
    if stage in ("load", "unpack"):
        fold_ref[...] = jnp.sum(acc[0].astype(jnp.float32), axis=1) + acc[1].astype(jnp.float32)
    elif stage == "estimate":
        fold_ref[...] = jnp.max(acc, axis=1)
    else:
        fold_ref[...] = acc


def stage_call(stage, lengths, q, q_rot, beta, keys, codes, scales, errs, *, g: int, sink: int, window: int,
               tile: int, num_splits: int, rounding_slack: float, interpret: bool, num_warps: int = 4,
               num_stages: int = 3):
    """The operands of ``kernel_triton.scan_pallas``; returns the stage's fold f32 [B, Hkv, NS, tile]
    (for "flags": also the flags u8 [B, Hkv, S])."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    b, hkv, gi, d = q.shape
    s_cap = keys.shape[2]
    flags = stage == "flags"
    kernel = functools.partial(_flag_kernel if flags else functools.partial(_stage_kernel, stage=stage), g=g,
                               rows=max(8, gi), sink=sink, window=window, tile=tile, num_splits=num_splits,
                               rounding_slack=float(rounding_slack))

    row = lambda i, h, j: (i, h, 0)  # noqa: E731
    mat = lambda i, h, j: (i, h, 0, 0)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, None, tile), lambda i, h, j: (i, h, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, num_splits, tile), jnp.float32)]
    if flags:
        out_specs.append(pl.BlockSpec((None, None, s_cap), row))
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, s_cap), jnp.uint8))
    return pl.pallas_call(
        kernel, grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((1,), lambda i, h, j: (i,)), pl.BlockSpec((None, None, gi, d), mat),
                  pl.BlockSpec((None, None, gi, d), mat), pl.BlockSpec((None, None, gi), row),
                  pl.BlockSpec((None, None, s_cap, d), mat), pl.BlockSpec((None, None, s_cap, d // 2), mat),
                  pl.BlockSpec((None, None, s_cap), row), pl.BlockSpec((None, None, s_cap), row)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name=f"scan_stage_{stage}",
    )(lengths, q, q_rot, beta, keys, codes, scales, errs)


def _flag_kernel(len_ref, q_ref, qr_ref, beta_ref, k_ref, c_ref, sc_ref, er_ref, fold_ref, flags_ref, *, g, rows,
                 sink, window, tile, num_splits, rounding_slack):
    """The "flags" stage: the production kernel's prologue and tile loop (its helpers), no epilogue."""
    length = len_ref[0]
    inv = kt.scan_setup(length, q_ref, qr_ref, beta_ref, k_ref, g=g, rows=rows, sink=sink, window=window,
                        rounding_slack=rounding_slack)
    kt.scan_tiles(inv, length, c_ref, sc_ref, er_ref, flags_ref, rows=rows, sink=sink, window=window, tile=tile,
                  num_splits=num_splits)
    fold_ref[...] = jnp.zeros((tile,), jnp.float32) + jnp.sum(inv["m_sw"])


def _load_kernel(c_ref, sc_ref, er_ref, oc_ref, os_ref, *, tile: int, steps: int):
    j = pl.program_id(2)

    def body(t, acc):
        ac, as_ = acc
        base = pl.multiple_of((j * steps + t) * tile, tile)
        bits = (jax.lax.bitcast_convert_type(sc_ref[pl.ds(base, tile)], jnp.uint16)
                ^ jax.lax.bitcast_convert_type(er_ref[pl.ds(base, tile)], jnp.uint16))
        return ac ^ c_ref[pl.ds(base, tile), :], as_ ^ bits

    ac, as_ = jax.lax.fori_loop(0, steps, body, (jnp.zeros((tile, c_ref.shape[1]), c_ref.dtype),
                                                 jnp.zeros((tile,), jnp.uint16)))
    oc_ref[...] = ac
    os_ref[...] = as_


def load_only(codes, scales, errs, *, tile: int, splits: int, warps: int, stages: int, interpret: bool):
    """codes [B, Hkv, S, W] (uint8 bytes or uint32 words of the same codes), scales/errs f16 [B, Hkv, S] (S a
    multiple of splits·tile; a longer store is read up to the last whole part) -> the xor folds."""
    b, hkv, s, w = codes.shape
    steps = s // (splits * tile)
    if steps < 1:
        raise ValueError(f"load_only: S={s} is shorter than splits·tile = {splits * tile}")
    row = lambda i, h, j: (i, h, 0)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_load_kernel, tile=tile, steps=steps),
        grid=(b, hkv, splits),
        in_specs=[pl.BlockSpec((None, None, s, w), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, s), row), pl.BlockSpec((None, None, s), row)],
        out_specs=[pl.BlockSpec((None, None, None, tile, w), lambda i, h, j: (i, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, tile), lambda i, h, j: (i, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, tile, w), codes.dtype),
                   jax.ShapeDtypeStruct((b, hkv, splits, tile), jnp.uint16)],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=warps, num_stages=stages),
        name="load_only",
    )(codes, scales, errs)
