"""Pallas kernel for the block upper bound.

Grid (B, Hkv, NB/T): one program reads a tile of T block summaries of one KV
head once and bounds them for the whole GQA group (Gp = next pow2 of G query
heads, padded rows are zero). Element-wise in f32 (no dot: this is a
max-plus product); shapes are powers of two for the Triton lowering.
layout="rows" (default) loops over the G query heads on [T, D] tiles;
layout="3d" forms one [Gp, T, D] product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import compiler_params, next_pow2, pad_axis


def _kernel(
    nvb_ref,  # [1] int32 (this batch row's valid block count)
    q_ref,  # [Gp, D] f32
    kmin_ref,  # [T, D] f32
    kmax_ref,  # [T, D] f32
    ub_ref,  # [Gp, T] f32 (out)
    *,
    rel_slack: float,
    tile: int,
    rows,
):
    t = pl.program_id(2)
    if rows is None:  # one [Gp, T, D] product
        q = q_ref[...][:, None, :]  # [Gp, 1, D]
        lo = kmin_ref[...].astype(jnp.float32)[None, :, :]  # [1, T, D]
        hi = kmax_ref[...].astype(jnp.float32)[None, :, :]
        ub = jnp.sum(jnp.maximum(q * hi, q * lo), axis=-1)  # [Gp, T]
        mag = jnp.sum(jnp.abs(q) * jnp.maximum(jnp.abs(lo), jnp.abs(hi)), axis=-1)
        ub = ub + jnp.float32(rel_slack) * mag
        blk = t * tile + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
        ub_ref[...] = jnp.where(blk < nvb_ref[0], ub, -jnp.inf)
    else:  # [T, D] tiles, one query head of the group at a time (static loop)
        lo = kmin_ref[...].astype(jnp.float32)  # summaries may be stored in 16 bits
        hi = kmax_ref[...].astype(jnp.float32)
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        blk = t * tile + jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
        ok = blk < nvb_ref[0]
        for gi in range(rows):
            qg = q_ref[gi][None, :]  # [1, D]
            ub = jnp.sum(jnp.maximum(qg * hi, qg * lo), axis=1)
            mag = jnp.sum(jnp.abs(qg) * amax, axis=1)
            ub_ref[gi] = jnp.where(ok, ub + jnp.float32(rel_slack) * mag, -jnp.inf)


def block_bounds_pallas(
    q: jax.Array,  # [B, Hq, D]
    kmin: jax.Array,  # [B, Hkv, NB, D] f32
    kmax: jax.Array,  # [B, Hkv, NB, D] f32
    num_valid_blocks: jax.Array,  # [B] int32
    *,
    rel_slack: float,
    interpret: bool,
    tile: int | None = None,
    num_warps: int = 4,
    layout: str = "rows",
    ub_dtype=jnp.float32,
) -> jax.Array:  # [B, Hq, NB] f32
    b, hq, d = q.shape
    _, hkv, nb, _ = kmin.shape
    g = hq // hkv
    gp = next_pow2(g)
    dp = next_pow2(d)
    if layout not in ("rows", "3d"):
        raise ValueError(f"layout must be 'rows' or '3d', got {layout!r}")
    if tile is None:
        # keep the temporaries near 8K elements per program
        tile = max(1, min(64, 8192 // ((gp if layout == "3d" else 1) * dp)))
    tile = min(tile, next_pow2(nb))
    nbp = -(-nb // tile) * tile

    q32 = q.astype(jnp.float32).reshape(b, hkv, g, d)
    q32 = pad_axis(pad_axis(q32, 2, gp), 3, dp)
    # f32 or 16-bit summaries are read as stored (cast to f32 in the kernel): no f32 copy.
    lo = pad_axis(pad_axis(kmin, 2, nbp), 3, dp)
    hi = pad_axis(pad_axis(kmax, 2, nbp), 3, dp)
    nvb = num_valid_blocks.astype(jnp.int32).reshape(b)

    kernel = functools.partial(_kernel, rel_slack=float(rel_slack), tile=tile,
                               rows=g if layout == "rows" else None)
    ub = pl.pallas_call(
        kernel,
        grid=(b, hkv, nbp // tile),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, t: (i,)),
            pl.BlockSpec((None, None, gp, dp), lambda i, h, t: (i, h, 0, 0)),
            pl.BlockSpec((None, None, tile, dp), lambda i, h, t: (i, h, t, 0)),
            pl.BlockSpec((None, None, tile, dp), lambda i, h, t: (i, h, t, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, gp, tile), lambda i, h, t: (i, h, 0, t)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, gp, nbp), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=1),
        name="block_bounds",
    )(nvb, q32, lo, hi)
    return ub[:, :, :g, :nb].reshape(b, hq, nb)
