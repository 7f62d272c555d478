"""refine_attention: the scan -> max pass -> refine protocol gives exact DIPR attention (vs brute force
in f64), Pallas (interpret) vs reference, mask, beta 0..inf, empty rows."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BackendUnavailableError
from pallas_kernels.code_scan import code_scan
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.refine_attention import refine_attention, refine_mask, refine_max
from pallas_kernels.refine_attention.api import IMPLEMENTATIONS
from pallas_kernels.testing import case_betas, make_coded_case, np_dipr

TILE, NS, CAP = 128, 3, 384
SINK, WINDOW = 4, 64
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


@functools.lru_cache(maxsize=None)
def _case(kind, g, d, dtype):
    return make_coded_case(kind, g=g, hkv=2, d=d, dtype=dtype, seed=d + g)


@functools.lru_cache(maxsize=None)
def _scan(sink, window):
    return jax.jit(functools.partial(code_scan, sink=sink, window=window, num_splits=NS, capacity=CAP,
                                     tile_size=TILE))


@functools.lru_cache(maxsize=None)
def _refine(impl, sink, window):
    return jax.jit(functools.partial(refine_attention, sink=sink, window=window, implementation=impl))


@functools.lru_cache(maxsize=None)
def _max(impl, sink, window):
    return jax.jit(functools.partial(refine_max, sink=sink, window=window, implementation=impl))


def _dipr_attention(c, beta, impl, *, sink=SINK, window=WINDOW):
    """The caller's protocol: scan, the max pass over forced ∪ candidates (the exact M), one refine
    with m_base = M."""
    cidx, counts, lb_max, m_sw = _scan(sink, window)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"],
                                                       c["errs"], c["lengths"], jnp.asarray(beta))
    m_lb = jnp.maximum(m_sw, jnp.max(lb_max, axis=-1))
    m = _max(impl, sink, window)(c["q"], c["keys"], cidx, counts, c["lengths"])
    assert np.all(np.asarray(m) >= np.asarray(m_lb) - 1e-5 * np.abs(np.asarray(m_lb)))  # M_lb <= M
    args = (c["q"], c["keys"], c["values"], cidx, counts, c["lengths"])
    out, m_seen, n = _refine(impl, sink, window)(*args, m, jnp.asarray(beta))
    np.testing.assert_array_equal(np.asarray(m_seen), np.asarray(m))  # same scores in both passes
    return out, m_seen, n, (cidx, counts)


def _brute(c, beta, *, sink=SINK, window=WINDOW):
    """f64 DIPR attention over forced ∪ (in range by the kernels' slack rule); returns out, M, mask, near."""
    q64, k64 = c["q64"], c["keys64"]
    v64 = np.asarray(c["values"].astype(jnp.float32), np.float64)
    b, hq, d = q64.shape
    hkv = k64.shape[1]
    g = hq // hkv
    lengths = np.asarray(c["lengths"])
    s, m, _ = np_dipr(q64, k64, lengths, beta, g)
    tol = default_rounding_slack(d) * np.abs(q64).sum(-1)[..., None] * np.repeat(
        np.abs(np.nan_to_num(k64)).max(-1), g, axis=1)
    thr = m - np.asarray(beta, np.float64)
    pos = np.arange(k64.shape[2])
    valid = pos[None] < lengths[:, None]
    forced = valid & ((pos[None] < sink) | (pos[None] >= lengths[:, None] - window))
    inr = valid[:, None] & ~forced[:, None] & (s + tol >= thr[..., None])
    with np.errstate(invalid="ignore"):
        near = np.abs(s + tol - thr[..., None]) <= 1e-4 * (np.abs(thr[..., None]) + tol + 1e-30)
    att = inr | forced[:, None]
    out = np.zeros((b, hq, d))
    vv = np.repeat(np.nan_to_num(v64), g, axis=1)
    scale = 1.0 / math.sqrt(d)
    for i in range(b):
        for h in range(hq):
            a = att[i, h]
            if a.any():
                lg = s[i, h, a] * scale
                w = np.exp(lg - lg.max())
                out[i, h] = (w[:, None] * vv[i, h, a]).sum(0) / w.sum()
    return out, m, inr, near, att.sum(-1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [("gauss", 4, 64, jnp.float32), ("high", 3, 128, jnp.bfloat16), ("ties", 1, 64, jnp.float32),
         ("large", 4, 128, jnp.bfloat16)]


@pytest.mark.parametrize("kind,g,d,dtype", CASES)
def test_protocol_gives_exact_dipr_attention(kind, g, d, dtype):
    c = _case(kind, g, d, dtype)
    beta = case_betas(kind, *c["q"].shape[:2])
    o_np, m_np, inr, near, n_np = _brute(c, beta)
    res = {}
    for impl in IMPLEMENTATIONS:
        out, m_seen, n, (cidx, counts) = _dipr_attention(c, beta, impl)
        assert out.dtype == dtype and out.shape == c["q"].shape and m_seen.dtype == jnp.float32
        assert n.dtype == jnp.int32
        np.testing.assert_allclose(np.asarray(m_seen), m_np, rtol=1e-5, atol=1e-6 * np.abs(m_np).max())
        n = np.asarray(n)
        # keys attended: the brute-force count, up to keys within rounding of the threshold
        assert np.all(np.abs(n - n_np) <= near.sum(-1)), (n, n_np)
        assert _rel(out.astype(jnp.float32), o_np) <= OUT_TOL[dtype]
        mask = np.asarray(refine_mask(c["q"], c["keys"], cidx, counts, m_seen, jnp.asarray(beta)))
        assert mask.shape == inr.shape
        assert not np.any((mask != inr) & ~near)
        res[impl] = (np.asarray(out.astype(jnp.float32)), np.asarray(m_seen), n)
    np.testing.assert_allclose(res["pallas"][1], res["reference"][1], rtol=1e-6, atol=1e-6)
    assert _rel(res["pallas"][0], res["reference"][0]) <= OUT_TOL[dtype]


def test_pallas_matches_reference_on_one_pass_and_empty_rows():
    """One refine at a given m_base (no protocol): β = inf attends every listed candidate; a head
    with nothing forced and no candidate gets out 0, m_seen -inf, 0 keys."""
    c = make_coded_case("gauss", g=3, hkv=2, d=64, dtype=jnp.bfloat16, lengths=(1, 300), seed=5)
    b, hq = c["q"].shape[:2]
    beta = np.resize(np.asarray([np.inf, 0.5, 4.0], np.float32), b * hq).reshape(b, hq)
    cidx, counts, lb_max, m_sw = _scan(1, 8)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                             c["lengths"], jnp.asarray(beta))
    m_base = jnp.maximum(m_sw, jnp.max(lb_max, -1))
    # empty the list of batch 0 (its single key is forced as the sink); then make it un-forced too
    args = (c["q"], c["keys"], c["values"], cidx, counts, c["lengths"], m_base, jnp.asarray(beta))
    r = [np.asarray(x.astype(jnp.float32)) for x in _refine("reference", 1, 8)(*args)]
    p = [np.asarray(x.astype(jnp.float32)) for x in _refine("pallas", 1, 8)(*args)]
    assert _rel(p[0], r[0]) <= OUT_TOL[jnp.bfloat16]
    np.testing.assert_allclose(p[1], r[1], rtol=1e-6)
    np.testing.assert_array_equal(p[2], r[2])
    inf_heads = np.isinf(beta[1])
    np.testing.assert_array_equal(r[2][1][inf_heads], counts[1].sum(-1).repeat(3)[inf_heads] + 8 + 1)
    z_counts = jnp.zeros_like(counts)
    for impl in IMPLEMENTATIONS:
        out, m_seen, n = _refine(impl, 0, 0)(c["q"], c["keys"], c["values"], cidx, z_counts, c["lengths"],
                                             m_base, jnp.asarray(beta))
        assert np.all(np.asarray(out.astype(jnp.float32)) == 0) and np.all(np.asarray(m_seen) == -np.inf)
        assert np.all(np.asarray(n) == 0)


def test_bad_inputs_raise():
    c = _case("gauss", 4, 64, jnp.float32)
    b, hq = c["q"].shape[:2]
    cidx = jnp.zeros((b, 2, NS, 16), jnp.int32)
    counts = jnp.zeros((b, 2, NS), jnp.int32)
    m = jnp.zeros((b, hq))
    kw = dict(sink=4, window=8)
    with pytest.raises(ValueError, match="cand_count"):
        refine_attention(c["q"], c["keys"], c["values"], cidx, counts[:, :, :1], c["lengths"], m, 1.0, **kw)
    with pytest.raises(ValueError, match="values"):
        refine_attention(c["q"], c["keys"], c["values"][:, :, :5], cidx, counts, c["lengths"], m, 1.0, **kw)
    with pytest.raises(ValueError, match="m_base"):
        refine_attention(c["q"], c["keys"], c["values"], cidx, counts, c["lengths"], m[:, :3], 1.0, **kw)
    with pytest.raises(ValueError, match="chunk"):
        refine_attention(c["q"], c["keys"], c["values"], cidx, counts, c["lengths"], m, 1.0, chunk=48,
                         implementation="pallas", **kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(BackendUnavailableError):
            refine_attention(c["q"], c["keys"], c["values"], cidx, counts, c["lengths"], m, 1.0,
                             implementation="pallas", interpret=False, **kw)
