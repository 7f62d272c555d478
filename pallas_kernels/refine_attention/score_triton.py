"""Pallas kernel (Triton lowering) of the refine's score pass: the exact score of every listed candidate.

Grid (B, Hkv, P). The scan's per-split lists of one (b, KV head) are read as ONE list of ``total`` slots
(the splits' counts, prefix-summed in registers: slot r lies in split j with prefix_j <= r < prefix_{j+1}),
cut into chunks of R slots dealt round-robin to the P programs: program p takes chunks p, p + P, ...,
so a split crowded with candidates (the most recent one usually is) does not serialise the pass. Per
chunk it gathers the R candidates' exact keys (each key is read once in the whole refine), scores them
for the group's rows with one MMA ([R, D] x [D, Gr], 16-bit products, f32 sums: the refine's exact-score
arithmetic) and stores, by slot, the position (-1 for a candidate a filter dropped: not scored), the G scores and ‖k‖∞,
for the attend pass; the running
max is kept elementwise ([R, Gr]) and reduced once after the loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.code_scan.kernel_triton import dot_rows, gather_rows, query_tile
from pallas_kernels.common import compiler_params, next_pow2


SEARCH_BLOCK = 32  # splits compared with a chunk's slots at a time (bounds the live [R, block] tensors)


def chunk_slots(cnt_ref, chunk: int, programs: int):
    """(total, first chunk, number of chunks) of this program: the splits' counts (a [NS] block, read
    padded to a power of two) as one list of ``total`` slots, dealt in chunks round-robin."""
    ns = cnt_ref.shape[0]
    j = jax.lax.broadcasted_iota(jnp.int32, (next_pow2(ns),), 0)
    total = jnp.sum(plgpu.load(cnt_ref.at[jnp.minimum(j, ns - 1)], mask=j < ns, other=0))
    p = pl.program_id(2)
    nch = (total + chunk - 1) // chunk
    mine = jnp.where(nch > p, (nch - p + programs - 1) // programs, 0)
    return total, p, mine


def slot_split(cnt_ref, slots):
    """(split, offset in its list) i32 [R] of each slot of the concatenated lists: split = the last j
    whose prefix_j = Σ_{i<j} count_i is <= slot (empty splits share the prefix of the next one, so the last
    such j is the non-empty split holding the slot); the splits are compared a block at a time."""
    ns = cnt_ref.shape[0]
    sb = min(SEARCH_BLOCK, next_pow2(ns))
    j = jax.lax.broadcasted_iota(jnp.int32, (sb,), 0)

    def block(i, carry):
        before, part, base = carry  # slots of the splits before this block; running split and its prefix
        jj = i * sb + j
        counts = plgpu.load(cnt_ref.at[jnp.minimum(jj, ns - 1)], mask=jj < ns, other=0)
        prefix = before + jnp.cumsum(counts) - counts
        le = (prefix[None, :] <= slots[:, None]) & (jj < ns)[None, :]  # [R, block]
        part = part + jnp.sum(le.astype(jnp.int32), axis=1)
        base = jnp.maximum(base, jnp.max(jnp.where(le, prefix[None, :], 0), axis=1))
        return before + jnp.sum(counts), part, base

    zero = jnp.zeros(slots.shape, jnp.int32)
    _, part, base = jax.lax.fori_loop(0, -(-ns // sb), block, (jnp.int32(0), zero - 1, zero))
    return jnp.clip(part, 0, ns - 1), slots - base


def _score_kernel(cnt_ref, lists_ref, q_ref, k_ref, idx_ref, s_ref, kinf_ref, mx_ref, *, g: int, rows: int,
                  chunk: int, programs: int):
    lsize = lists_ref.shape[1]
    gi = s_ref.shape[1]
    total, p, mine = chunk_slots(cnt_ref, chunk, programs)
    qt = query_tile(q_ref, rows, g).T  # [D, Gr]
    lanes = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)

    def body(k, mx):
        slots = (p + k * programs) * chunk + lanes
        valid = slots < total
        part, off = slot_split(cnt_ref, slots)
        idx = plgpu.load(lists_ref.at[part, jnp.clip(off, 0, lsize - 1)], mask=valid, other=-1)
        listed = valid & (idx >= 0)  # -1: a candidate dropped by a filter (never scored)
        kk = gather_rows(k_ref, jnp.where(listed, idx, 0), mask=listed)  # [R, D], 0 where not listed
        s = dot_rows(kk, qt)  # [R, Gr] f32
        plgpu.store(idx_ref.at[slots], idx, mask=valid)  # (masked stores: indices never clamped)
        plgpu.store(kinf_ref.at[slots], jnp.max(jnp.abs(kk.astype(jnp.float32)), axis=1), mask=valid)
        plgpu.store(s_ref.at[slots[:, None], cols], s, mask=valid[:, None] & (cols < gi))
        return jnp.maximum(mx, jnp.where(listed[:, None], s, -jnp.inf))

    mx = jax.lax.fori_loop(0, mine, body, jnp.full((chunk, rows), -jnp.inf, jnp.float32))
    mx_ref[...] = jnp.max(mx, axis=0)


def score_pallas(counts, lists, q, keys, *, g: int, chunk: int, programs: int, interpret: bool, num_warps: int = 4,
                 num_stages: int = 2):
    """counts i32 [B, Hkv, NS], lists i32 [B, Hkv, NS, L] (code_scan's), q [B, Hkv, Gi, D] (score dtype),
    keys [B, Hkv, S, D] -> (idx i32 [B, Hkv, S'], s f32 [B, Hkv, S', Gi], kinf f32 [B, Hkv, S'], mx f32
    [B, Hkv, P, Gr]) with S' = the slots (>= every candidate; slots >= total unwritten) and mx the
    program's max score per row (-inf if it scored nothing)."""
    b, hkv, ns, lsize = lists.shape
    gi, d = q.shape[2], q.shape[3]
    s_cap = keys.shape[2]
    sl = -(-s_cap // chunk) * chunk
    rows = max(8, gi)
    kernel = functools.partial(_score_kernel, g=g, rows=rows, chunk=chunk, programs=programs)
    whole = lambda i, h, j: (i, h, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, programs),
        in_specs=[pl.BlockSpec((None, None, ns), whole),
                  pl.BlockSpec((None, None, ns, lsize), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, gi, d), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, s_cap, d), lambda i, h, j: (i, h, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, sl), whole),
                   pl.BlockSpec((None, None, sl, gi), lambda i, h, j: (i, h, 0, 0)),
                   pl.BlockSpec((None, None, sl), whole),
                   pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, sl), jnp.int32),
                   jax.ShapeDtypeStruct((b, hkv, sl, gi), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, sl), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, programs, rows), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=num_warps, num_stages=num_stages),
        name="refine_score",
    )(counts, lists, q, keys)
