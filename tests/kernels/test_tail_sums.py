"""The estimated tail in the DIPR kernels: the scan's tail sums (Pallas interpret vs the jnp reference on the
kernel's own candidates), the refine's merge (Pallas vs reference, and both vs an f64 numpy evaluation of
out = (Σ_att e^{s·c} v + Σ_rest e^{ŝ·c} V̄_block) / (Σ_att e^{s·c} + Σ_rest e^{ŝ·c}) over rest = every
searched key not attended), an empty rest, a selection of every key; ragged lengths, GQA 4 and 3, NaN past
the lengths (keys, values and the block means of blocks past them)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.code_scan import code_scan
from pallas_kernels.code_scan.api import scan_tile
from pallas_kernels.code_scan.reference import scan_flags_reference, scan_tail_reference
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.refine_attention import refine_attention
from pallas_kernels.refine_attention.reference import attended_candidates
from pallas_kernels.testing import case_betas, make_coded_case

NS = 3
SINK, WINDOW = 4, 64
BK = 64


@functools.lru_cache(maxsize=None)
def _case(kind, g, d, dtype, lengths):
    c = make_coded_case(kind, g=g, hkv=2, d=d, dtype=dtype, seed=d + g + 7, lengths=lengths)
    v = np.asarray(c["values"].astype(jnp.float32), np.float64)  # NaN past the lengths
    b, hkv, s, _ = v.shape
    valid = c["valid"][:, None, :, None]
    n = valid.reshape(b, 1, s // BK, BK, 1).sum(3)
    with np.errstate(invalid="ignore", divide="ignore"):  # blocks past a length: 0/0 = NaN, poisoned on purpose
        vm = np.where(valid, v, 0.0).reshape(b, hkv, s // BK, BK, d).sum(3) / n
    c["value_means"] = jnp.asarray(vm, jnp.float32).astype(dtype)  # in the values' dtype, as the store keeps them
    return c


@functools.lru_cache(maxsize=None)
def _scan_fn(impl, tail):
    return jax.jit(functools.partial(code_scan, sink=SINK, window=WINDOW, num_splits=NS, implementation=impl,
                                     block_size=BK if tail else None))


@functools.lru_cache(maxsize=None)
def _refine_fn(impl, tail):
    return jax.jit(functools.partial(refine_attention, sink=SINK, window=WINDOW, implementation=impl, programs=2,
                                     chunk=16, block_size=BK if tail else None))


def _scan(c, beta, impl, tail=True):
    return _scan_fn(impl, tail)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"], beta,
              value_means=c["value_means"] if tail else None)


def _refine(c, beta, lists, impl, tail=None):
    return _refine_fn(impl, tail is not None)(c["q"], c["keys"], c["values"], *lists, c["lengths"], beta, tail=tail,
              value_means=c["value_means"] if tail is not None else None)


def _listed(cidx, counts, s):
    """bool [B, Hkv, S]: the positions in the scan's lists."""
    cidx, counts = np.asarray(cidx), np.asarray(counts)
    out = np.zeros(cidx.shape[:2] + (s,), bool)
    for i, h, j in np.ndindex(*counts.shape):
        out[i, h, cidx[i, h, j, :counts[i, h, j]]] = True
    return out


CASES = [("gauss", 4, 64, jnp.float32, (3, 513, 1023)), ("gauss", 3, 128, jnp.bfloat16, (70, 1050))]


@pytest.mark.parametrize("kind,g,d,dtype,lengths", CASES)
def test_scan_tail_sums_pallas_vs_reference(kind, g, d, dtype, lengths):
    c = _case(kind, g, d, dtype, lengths)  # (70, 1050): a store of 1088 keys, not a multiple of the tile
    assert kind != "gauss" or lengths != (70, 1050) or c["keys"].shape[2] % scan_tile(c["keys"].shape[2])
    b, hq, _ = c["q"].shape
    hkv, s = c["keys"].shape[1], c["keys"].shape[2]
    beta = jnp.asarray(case_betas(kind, b, hq))
    cidx, counts, m_sw, tail = _scan(c, beta, "pallas")
    _, _, est, _, _ = scan_flags_reference(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                           c["lengths"], beta, sink=SINK, window=WINDOW,
                                           rounding_slack=default_rounding_slack(d))
    cand = _listed(cidx, counts, s)
    # the reference's sums over the kernel's own candidates (near-threshold keys may differ between the two)
    ref = scan_tail_reference(est, jnp.asarray(cand), c["lengths"], m_sw.reshape(b, hkv, g), c["value_means"],
                              sink=SINK, window=WINDOW, num_splits=NS, tile=scan_tile(s), block_size=BK,
                              sm_scale=1 / math.sqrt(d))
    o, l = np.asarray(tail.o)[:, :, :, :g], np.asarray(tail.l)[:, :, :, :g]
    assert np.isfinite(o).all() and np.isfinite(l).all() and (l > 0).any()
    np.testing.assert_allclose(l, np.asarray(ref.l), rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(o, np.asarray(ref.o), rtol=2e-5, atol=2e-5 * np.abs(np.asarray(ref.o)).max())
    e_pal = np.asarray(tail.est)[:, :, :, :g]  # written at the candidates
    e_ref = np.asarray(est)
    np.testing.assert_allclose(e_pal[cand], e_ref[cand], rtol=1e-5, atol=1e-5 * np.abs(e_ref[cand]).max())


def _np_tail_attention(c, beta, lists, est, m_sw):
    """f64: exact over forced ∪ the refine's attended candidates (its own decision, jnp), the estimate over
    every other searched key, values of the rest replaced by their block's mean."""
    q64, k64 = c["q64"], c["keys64"]
    v64 = np.nan_to_num(np.asarray(c["values"].astype(jnp.float32), np.float64))
    vm = np.asarray(c["value_means"], np.float64)
    b, hq, d = q64.shape
    hkv, s = k64.shape[1], k64.shape[2]
    g = hq // hkv
    idx, listed, _, _, att = (np.asarray(x) for x in attended_candidates(
        c["q"], c["keys"], *lists[:2], m_sw, beta, rounding_slack=default_rounding_slack(d)))
    lengths = np.asarray(c["lengths"])
    pos = np.arange(s)
    out = np.zeros((b, hq, d))
    for i in range(b):
        L = int(lengths[i])
        forced = (pos < L) & ((pos < SINK) | (pos >= L - WINDOW))
        searched = (pos < L) & ~forced
        for h in range(hkv):
            for gg in range(g):
                a = forced.copy()
                a[idx[i, h][listed[i, h] & att[i, h, gg]]] = True
                rest = searched & ~a
                sc = np.nan_to_num(k64[i, h]) @ q64[i, h * g + gg] / math.sqrt(d)
                e = np.asarray(est[i, h, :, gg], np.float64) / math.sqrt(d)
                z = np.concatenate([sc[a], e[rest]])
                if z.size == 0:
                    continue
                w = np.exp(z - z.max())
                vals = np.concatenate([v64[i, h][a], vm[i, h][pos[rest] // BK]])
                out[i, h * g + gg] = (w[:, None] * vals).sum(0) / w.sum()
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("kind,g,d,dtype,lengths", CASES[:1])  # (the bf16 G=3 refine: tests/attention/test_tail)
def test_refine_merges_the_tail(kind, g, d, dtype, lengths):
    c = _case(kind, g, d, dtype, lengths)
    b, hq, _ = c["q"].shape
    beta = jnp.asarray(case_betas(kind, b, hq))
    tol = 2e-5 if dtype == jnp.float32 else 1.5e-2
    est = np.asarray(scan_flags_reference(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                          c["lengths"], beta, sink=SINK, window=WINDOW,
                                          rounding_slack=default_rounding_slack(d))[2])  # ŝ of every key
    res = {}
    for impl in ("reference", "pallas"):
        cidx, counts, m_sw, tail = _scan(c, beta, impl)
        out, m, n = _refine(c, beta, (cidx, counts, m_sw), impl, tail)
        plain, m0, n0 = _refine(c, beta, (cidx, counts, m_sw), impl)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(m0))
        np.testing.assert_array_equal(np.asarray(n), np.asarray(n0))
        want = _np_tail_attention(c, beta, (cidx, counts, m_sw), est, m_sw)
        got = np.asarray(out.astype(jnp.float32))
        assert np.isfinite(got).all()
        assert _rel(got, want) <= tol, impl
        assert _rel(got, np.asarray(plain.astype(jnp.float32))) > 10 * tol, "the tail changes the output"
        res[impl] = got
    assert _rel(res["pallas"], res["reference"]) <= max(tol, 1e-4)


def test_an_empty_rest_is_exact_sparse_attention_and_every_key_is_full_attention():
    """β = inf: every searched key is a candidate and attended, so the tail is empty (its sums 0) and the
    output is full attention; a sequence no longer than sink + window has nothing searched."""
    c = _case("gauss", 4, 64, jnp.float32, (3, 513, 1023))
    b, hq, d = c["q"].shape
    beta = jnp.full((b, hq), jnp.inf)
    q64, k64 = c["q64"], c["keys64"]
    v64 = np.asarray(c["values"].astype(jnp.float32), np.float64)
    g = hq // k64.shape[1]
    full = np.zeros((b, hq, d))
    for i, L in enumerate(np.asarray(c["lengths"])):
        for hh in range(hq):
            z = k64[i, hh // g, :L] @ q64[i, hh] / math.sqrt(d)
            w = np.exp(z - z.max())
            full[i, hh] = (w[:, None] * v64[i, hh // g, :L]).sum(0) / w.sum()
    for impl in ("pallas",):  # (the reference's β = inf: tests/attention/test_tail)
        cidx, counts, m_sw, tail = _scan(c, beta, impl)
        assert np.all(np.asarray(tail.l)[:, :, :, :g] == 0) and np.all(np.asarray(tail.o)[:, :, :, :g] == 0)
        out = np.asarray(_refine(c, beta, (cidx, counts, m_sw), impl, tail)[0])
        plain = np.asarray(_refine(c, beta, (cidx, counts, m_sw), impl)[0])
        np.testing.assert_array_equal(out, plain)
        assert _rel(out, full) <= 2e-5
    # finite β on a sequence of 3 (sink 4): no searched key, so the tail changes nothing
    beta = jnp.asarray(case_betas("gauss", b, hq))
    for impl in ("reference", "pallas"):
        cidx, counts, m_sw, tail = _scan(c, beta, impl)
        out = np.asarray(_refine(c, beta, (cidx, counts, m_sw), impl, tail)[0])
        plain = np.asarray(_refine(c, beta, (cidx, counts, m_sw), impl)[0])
        np.testing.assert_array_equal(out[0], plain[0])


def test_the_scan_without_the_tail_is_the_old_kernel():
    """value_means None: the same outputs (3, no ScanTail) and the same lists as with the tail."""
    c = _case("gauss", 4, 64, jnp.float32, (3, 513, 1023))
    beta = jnp.asarray(case_betas("gauss", *c["q"].shape[:2]))
    plain = _scan(c, beta, "pallas", tail=False)
    with_tail = _scan(c, beta, "pallas")
    assert len(plain) == 3 and len(with_tail) == 4
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(with_tail[1]))
    s = c["keys"].shape[2]
    np.testing.assert_array_equal(_listed(plain[0], plain[1], s), _listed(with_tail[0], with_tail[1], s))


def test_bad_tail_arguments_raise():
    c = _case("gauss", 4, 64, jnp.float32, (3, 513, 1023))
    beta = jnp.asarray(case_betas("gauss", *c["q"].shape[:2]))
    with pytest.raises(ValueError, match="value_means"):
        code_scan(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"], beta, sink=SINK,
                  window=WINDOW, num_splits=NS, value_means=c["value_means"], block_size=32)
    cidx, counts, m_sw, tail = _scan(c, beta, "reference")
    with pytest.raises(ValueError, match="value_means"):
        refine_attention(c["q"], c["keys"], c["values"], cidx, counts, m_sw, c["lengths"], beta, sink=SINK,
                         window=WINDOW, tail=tail)
    # a shard's inputs (issue 24): the tail is relative to the row's own M_sw, never combined with M_lb
    with pytest.raises(ValueError, match="sharded store"):
        code_scan(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"], beta, sink=SINK,
                  window=WINDOW, num_splits=NS, value_means=c["value_means"], block_size=BK, m_lb=m_sw)
    with pytest.raises(ValueError, match="sharded store"):
        refine_attention(c["q"], c["keys"], c["values"], cidx, counts, m_sw, c["lengths"], beta, sink=SINK,
                         window=WINDOW, tail=tail, value_means=c["value_means"], block_size=BK,
                         max_reduce=lambda m: m)
