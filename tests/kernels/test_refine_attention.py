"""refine_attention: the scan's lists -> score pass -> attend pass give exact DIPR attention (vs f64 brute
force), Pallas (interpret, chunks dealt over several programs) vs reference, empty heads, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BackendUnavailableError
from pallas_kernels.code_scan import code_scan
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.refine_attention import refine_attention
from pallas_kernels.refine_attention.api import IMPLEMENTATIONS
from pallas_kernels.testing import case_betas, make_coded_case, np_dipr

NS = 3
SINK, WINDOW = 4, 64
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


@functools.lru_cache(maxsize=None)
def _case(kind, g, d, dtype):
    return make_coded_case(kind, g=g, hkv=2, d=d, dtype=dtype, seed=d + g)


@functools.lru_cache(maxsize=None)
def _scan(sink, window, ns=NS):
    return jax.jit(functools.partial(code_scan, sink=sink, window=window, num_splits=ns))


@functools.lru_cache(maxsize=None)
def _refine(impl, sink, window, programs=None, chunk=64):
    return jax.jit(functools.partial(refine_attention, sink=sink, window=window, implementation=impl,
                                     programs=programs, chunk=chunk))


def _brute(c, beta, *, sink=SINK, window=WINDOW):
    """f64 DIPR attention over forced ∪ (in range by the kernels' slack rule): out, M, near-threshold
    mask, keys attended."""
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
    for i in range(b):
        for h in range(hq):
            a = att[i, h]
            if a.any():
                lg = s[i, h, a] / math.sqrt(d)
                w = np.exp(lg - lg.max())
                out[i, h] = (w[:, None] * vv[i, h, a]).sum(0) / w.sum()
    return out, m, near, att.sum(-1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [("gauss", 4, 64, jnp.float32), ("high", 3, 128, jnp.bfloat16), ("ties", 1, 64, jnp.float32),
         ("large", 4, 128, jnp.bfloat16)]


@pytest.mark.parametrize("kind,g,d,dtype", CASES)
def test_scan_and_refine_give_exact_dipr_attention(kind, g, d, dtype):
    c = _case(kind, g, d, dtype)
    beta = jnp.asarray(case_betas(kind, *c["q"].shape[:2]))
    o_np, m_np, near, n_np = _brute(c, np.asarray(beta))
    lists = _scan(SINK, WINDOW)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"], beta)
    res = {}
    for impl, programs, chunk in (("reference", None, 64), ("pallas", 4, 16)):  # pallas: several chunks a program
        out, m, n = _refine(impl, SINK, WINDOW, programs, chunk)(c["q"], c["keys"], c["values"], *lists,
                                                                 c["lengths"], beta)
        assert out.dtype == dtype and out.shape == c["q"].shape and m.dtype == jnp.float32 and n.dtype == jnp.int32
        np.testing.assert_allclose(np.asarray(m), m_np, rtol=1e-5, atol=1e-6 * np.abs(m_np).max())
        n = np.asarray(n)
        # keys attended: the brute-force count, up to keys within rounding of the threshold
        assert np.all(np.abs(n - n_np) <= near.sum(-1)), (n, n_np)
        assert _rel(out.astype(jnp.float32), o_np) <= OUT_TOL[dtype]
        res[impl] = (np.asarray(out.astype(jnp.float32)), np.asarray(m), n)
    np.testing.assert_allclose(res["pallas"][1], res["reference"][1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res["pallas"][2], res["reference"][2])
    assert _rel(res["pallas"][0], res["reference"][0]) <= OUT_TOL[dtype]


def test_pallas_matches_reference_with_every_candidate_and_on_empty_heads():
    """β = inf attends every listed candidate; a head with nothing forced and no candidate gets out 0,
    M -inf, 0 keys."""
    c = make_coded_case("gauss", g=3, hkv=2, d=64, dtype=jnp.bfloat16, lengths=(1, 300), seed=5)
    b, hq = c["q"].shape[:2]
    beta = jnp.asarray(np.resize(np.asarray([np.inf, 0.5, 4.0], np.float32), b * hq).reshape(b, hq))
    cidx, counts, m_sw = _scan(1, 8)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                     c["lengths"], beta)
    args = (c["q"], c["keys"], c["values"], cidx, counts, m_sw, c["lengths"], beta)
    r = [np.asarray(x.astype(jnp.float32)) for x in _refine("reference", 1, 8)(*args)]
    p = [np.asarray(x.astype(jnp.float32)) for x in _refine("pallas", 1, 8, 2, 16)(*args)]
    assert _rel(p[0], r[0]) <= OUT_TOL[jnp.bfloat16]
    np.testing.assert_allclose(p[1], r[1], rtol=1e-6)
    np.testing.assert_array_equal(p[2], r[2])
    inf_heads = np.isinf(np.asarray(beta[1]))
    np.testing.assert_array_equal(r[2][1][inf_heads], np.asarray(counts[1]).sum(-1).repeat(3)[inf_heads] + 8 + 1)
    no_forced = jnp.full_like(m_sw, -jnp.inf)
    for impl in IMPLEMENTATIONS:
        out, m, n = _refine(impl, 0, 0)(c["q"], c["keys"], c["values"], cidx, jnp.zeros_like(counts), no_forced,
                                        c["lengths"], beta)
        assert np.all(np.asarray(out.astype(jnp.float32)) == 0) and np.all(np.asarray(m) == -np.inf)
        assert np.all(np.asarray(n) == 0)


def test_many_splits_most_of_them_empty():
    """More splits than tiles (most lists empty) and more than one block of the score pass's split search:
    the concatenated lists are read slot by slot exactly as the reference reads them."""
    c = _case("gauss", 4, 64, jnp.float32)
    beta = jnp.asarray(case_betas("gauss", *c["q"].shape[:2]))
    lists = _scan(SINK, WINDOW, 40)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"],
                                     beta)
    assert int((np.asarray(lists[1]) == 0).sum()) > 40
    args = (c["q"], c["keys"], c["values"], *lists, c["lengths"], beta)
    r = [np.asarray(x) for x in _refine("reference", SINK, WINDOW)(*args)]
    p = [np.asarray(x) for x in _refine("pallas", SINK, WINDOW, 2, 16)(*args)]
    assert _rel(p[0], r[0]) <= OUT_TOL[jnp.float32]
    np.testing.assert_allclose(p[1], r[1], rtol=1e-6)
    np.testing.assert_array_equal(p[2], r[2])


def test_bad_inputs_raise():
    c = _case("gauss", 4, 64, jnp.float32)
    b, hq = c["q"].shape[:2]
    cidx = jnp.zeros((b, 2, NS, 16), jnp.int32)
    counts = jnp.zeros((b, 2, NS), jnp.int32)
    m = jnp.zeros((b, hq))
    kw = dict(sink=4, window=8)
    args = (c["q"], c["keys"], c["values"], cidx, counts, m, c["lengths"], 1.0)
    with pytest.raises(ValueError, match="cand_count"):
        refine_attention(*args[:4], counts[:, :, :1], *args[5:], **kw)
    with pytest.raises(ValueError, match="values"):
        refine_attention(args[0], args[1], args[2][:, :, :5], *args[3:], **kw)
    with pytest.raises(ValueError, match="m_sw"):
        refine_attention(*args[:5], m[:, :3], *args[6:], **kw)
    with pytest.raises(ValueError, match="chunk"):
        refine_attention(*args, chunk=48, implementation="pallas", **kw)
    with pytest.raises(ValueError, match="programs"):
        refine_attention(*args, programs=3, implementation="pallas", **kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(BackendUnavailableError):
            refine_attention(*args, implementation="pallas", interpret=False, **kw)
