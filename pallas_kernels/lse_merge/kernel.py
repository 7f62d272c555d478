"""Pallas kernel for the LSE merge: grid over row tiles, loop over the P partials."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import compiler_params, next_pow2, pad_axis


def _kernel(o_ref, l_ref, out_ref, lse_ref):
    # o_ref [P, R, D], l_ref [P, R] f32 -> out_ref [R, D], lse_ref [R]
    p = o_ref.shape[0]
    lses = l_ref[...]
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(m > -jnp.inf, m, 0.0)
    num = jnp.zeros(out_ref.shape, jnp.float32)
    den = jnp.zeros(lse_ref.shape, jnp.float32)
    for i in range(p):  # P is small and static
        li = l_ref[i]
        live = li > -jnp.inf
        w = jnp.where(live, jnp.exp(li - m_safe), 0.0)
        o = jnp.where(live[:, None], o_ref[i].astype(jnp.float32), 0.0)
        num = num + w[:, None] * o
        den = den + w
    has = den > 0
    den1 = jnp.where(has, den, 1.0)
    out_ref[...] = jnp.where(has[:, None], num / den1[:, None], 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has, m_safe + jnp.log(den1), -jnp.inf)


def merge_attention_pallas(outs, lses, *, interpret: bool, rows: int = 16):
    p = outs.shape[0]
    lead = outs.shape[1:-1]
    d = outs.shape[-1]
    n = 1
    for x in lead:
        n *= x
    dp = next_pow2(d)
    rows = min(rows, next_pow2(n))
    npad = -(-n // rows) * rows
    pp = next_pow2(p)
    o = pad_axis(pad_axis(pad_axis(outs.reshape(p, n, d), 2, dp), 1, npad), 0, pp)
    l = pad_axis(pad_axis(lses.astype(jnp.float32).reshape(p, n), 1, npad, -jnp.inf), 0, pp, -jnp.inf)
    out, lse = pl.pallas_call(
        _kernel,
        grid=(npad // rows,),
        in_specs=[
            pl.BlockSpec((pp, rows, dp), lambda r: (0, r, 0)),
            pl.BlockSpec((pp, rows), lambda r: (0, r)),
        ],
        out_specs=[
            pl.BlockSpec((rows, dp), lambda r: (r, 0)),
            pl.BlockSpec((rows,), lambda r: (r,)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((npad, dp), outs.dtype),
            jax.ShapeDtypeStruct((npad,), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, num_warps=4, num_stages=1),
        name="lse_merge",
    )(o, l)
    return out[:n, :d].reshape(*lead, d), lse[:n].reshape(lead)
