"""code_scan: reference vs brute force (zero false negatives, arg-max kept, layout), the bound of the
int8-plane estimate against f64 for every key, Pallas (interpret) vs reference (equal lists up to
near-threshold keys), lists that hold every key, errors."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BackendUnavailableError
from pallas_kernels.code_scan import code_scan
from pallas_kernels.code_scan import arithmetic as ar
from pallas_kernels.code_scan.api import IMPLEMENTATIONS, list_size, scan_tile
from pallas_kernels.code_scan.layout import split_of_position, split_tiles
from pallas_kernels.code_scan.reference import scan_flags_reference
from pallas_kernels.common import default_rounding_slack
from pallas_kernels.key_codes import rotate, rotation_signs
from pallas_kernels.testing import case_betas, make_coded_case, np_dipr

NS = 3
SINK, WINDOW = 4, 64


@functools.lru_cache(maxsize=None)
def _case(kind, g, d, dtype, lengths=(3, 513, 1023)):
    # the window holds a copy of head h·g's best key: the threshold is tight, so a bound too
    # small would drop keys (a test that can fail); the other heads of the group are looser
    return make_coded_case(kind, g=g, hkv=2, d=d, dtype=dtype, seed=d + g, lengths=lengths,
                           max_in_window=kind != "ties")


@functools.lru_cache(maxsize=None)
def _scan_fn(impl, sink, window, ns):
    return jax.jit(functools.partial(code_scan, sink=sink, window=window, num_splits=ns, implementation=impl))


def _run(c, beta, impl, *, sink=SINK, window=WINDOW, ns=NS):
    out = _scan_fn(impl, sink, window, ns)(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                            c["lengths"], jnp.asarray(beta))
    return [np.asarray(x) for x in out]


def _check_against_brute_force(c, beta, out, *, sink=SINK, window=WINDOW, ns=NS):
    cidx, counts, m_sw = out
    b, hq, d = c["q"].shape
    hkv, s = c["keys"].shape[1], c["keys"].shape[2]
    g = hq // hkv
    tile = scan_tile(s)
    lengths = np.asarray(c["lengths"])
    assert cidx.shape == (b, hkv, ns, list_size(s, ns)) and cidx.dtype == np.int32
    assert counts.shape == (b, hkv, ns) and counts.dtype == np.int32 and m_sw.shape == (b, hq)
    scores, m64, dipr = np_dipr(c["q64"], c["keys64"], lengths, beta, g)
    pos = np.arange(s)
    for i in range(b):
        L = int(lengths[i])
        forced = (pos < sink) | (pos >= L - window)
        searched = (pos < L) & ~forced
        split = np.asarray(split_of_position(pos, L, sink=sink, window=window, tile=tile, num_splits=ns))
        for hh in range(hq):  # the exact forced max
            fm = scores[i, hh][forced & (pos < L)].max() if (forced & (pos < L)).any() else -np.inf
            if np.isfinite(fm):
                np.testing.assert_allclose(m_sw[i, hh], fm, rtol=1e-5, atol=1e-5 * np.abs(scores[i, hh][pos < L]).max())
            else:
                assert m_sw[i, hh] == -np.inf
        for h in range(hkv):
            union = np.zeros(s, bool)
            for j in range(ns):
                lst = cidx[i, h, j, :int(counts[i, h, j])]  # slots past the count are undefined
                assert np.all(np.diff(lst) > 0), "candidates ascending, distinct"
                assert np.all(searched[lst]) and np.all(split[lst] == j), "candidates are searched keys of the split"
                union[lst] = True
            for gg in range(g):
                hh = h * g + gg
                # zero false negatives: every searched DIPR key is a candidate of its KV head
                missed = dipr[i, hh] & searched & ~union
                assert not missed.any(), f"false negatives at b={i} head={hh}: {np.flatnonzero(missed)[:10]}"
                if L > 0:  # the arg-max is forced or a candidate
                    top = np.flatnonzero(scores[i, hh] == m64[i, hh])
                    assert np.any(forced[top] | union[top])


COMBOS = [(1, 64, jnp.float32), (3, 128, jnp.bfloat16), (4, 64, jnp.bfloat16), (4, 128, jnp.float32)]


@pytest.mark.parametrize("kind,g,d,dtype", [(k, *COMBOS[(i + j) % 4]) for i, k in enumerate(
    ["gauss", "high", "ties", "large"]) for j in (0, 2)])
def test_reference_vs_brute_force(kind, g, d, dtype):
    c = _case(kind, g, d, dtype)
    beta = case_betas(kind, *c["q"].shape[:2])
    _check_against_brute_force(c, beta, _run(c, beta, "reference"))


@pytest.mark.parametrize("kind,scale", [("gauss", 1.0), ("high", 1.0), ("large", 1.0), ("gauss", 1e-30),
                                        ("gauss", 1e12)])
def test_int8_plane_estimate_is_bounded_for_every_key(kind, scale):
    """|s - est| <= δ in f64 for every valid key and head (the plane term included), and the planes'
    dq bounds the query's residual; tiny and huge queries included."""
    c = _case(kind, 4, 128, jnp.bfloat16)
    q = (c["q"].astype(jnp.float32) * scale).astype(jnp.bfloat16)
    b, hq, d = q.shape
    hkv = c["keys"].shape[1]
    signs = rotation_signs(hkv, d, seed=1)  # make_coded_case's rotation
    q_rot = rotate(q.reshape(b, hkv, 4, d).swapaxes(1, 2), signs).swapaxes(1, 2).reshape(b, hq, d)
    qr = q_rot.reshape(b, hkv, 4, d)
    n1, n2, s1, s2, dq = (np.asarray(x, np.float64) if not isinstance(x, list) else
                          np.concatenate([np.asarray(y, np.float64) for y in x], -1)
                          for x in ar.split_query([qr[..., :d // 2], qr[..., d // 2:]], d))
    res = np.asarray(qr, np.float64) - s1[..., None] * n1 - s2[..., None] * n2
    assert np.all(np.linalg.norm(res, axis=-1) <= dq)
    assert np.all(np.abs(n1) <= 127) and np.all(np.abs(n2) <= 127)
    _, _, est, delta, _ = scan_flags_reference(q, q_rot, c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"],
                                               jnp.zeros((b, hq)), sink=SINK, window=WINDOW,
                                               rounding_slack=default_rounding_slack(d))
    est, delta = np.asarray(est, np.float64), np.asarray(delta, np.float64)  # [B, Hkv, S, G]
    q64 = np.asarray(q.astype(jnp.float32), np.float64).reshape(b, hkv, 4, d)
    exact = np.einsum("bhgd,bhsd->bhsg", q64, np.nan_to_num(c["keys64"]))
    valid = c["valid"][:, None, :, None]
    gap = np.where(valid, np.abs(exact - est) - delta, -np.inf)
    assert np.all(gap <= 0), f"bound violated by {gap.max()}"
    assert np.all(delta[np.broadcast_to(valid, delta.shape)] > 0)


PALLAS_CASES = [("gauss", 4, 64, jnp.float32, (3, 513, 1023)), ("high", 3, 128, jnp.bfloat16, (3, 513, 1023)),
                ("ties", 1, 64, jnp.float32, (3, 513, 1023)), ("large", 4, 128, jnp.bfloat16, (70, 1050))]


@pytest.mark.parametrize("kind,g,d,dtype,lengths", PALLAS_CASES)
def test_pallas_vs_reference(kind, g, d, dtype, lengths):
    c = _case(kind, g, d, dtype, lengths)  # lengths up to 1050: a store of 1088 keys, not a multiple of the tile
    beta = case_betas(kind, *c["q"].shape[:2])
    ref = _run(c, beta, "reference")
    pal = _run(c, beta, "pallas")
    _check_against_brute_force(c, beta, pal)
    b, hq, d = c["q"].shape
    hkv, s = c["keys"].shape[1], c["keys"].shape[2]
    _, _, est, delta, thr = scan_flags_reference(c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"],
                                                 c["lengths"], jnp.asarray(beta), sink=SINK, window=WINDOW,
                                                 rounding_slack=default_rounding_slack(d))
    est, delta, thr = (np.asarray(x, np.float64) for x in (est, delta, thr))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: junk codes past a length
        margin = np.nanmax(np.where(np.isnan(est + delta), np.inf, est + delta - thr[:, :, None, :]), axis=-1)
        scale = np.nanmax(np.abs(est) + delta + np.abs(np.where(np.isfinite(thr), thr, 0))[:, :, None, :], axis=-1)
    for i in range(b):
        for h in range(hkv):
            for j in range(NS):
                r_set, p_set = ref[0][i, h, j, :ref[1][i, h, j]], pal[0][i, h, j, :pal[1][i, h, j]]
                diff = np.setxor1d(r_set, p_set)
                # only keys within a few f32 ulps of the threshold may differ
                assert np.all(np.abs(margin[i, h, diff]) <= 1e-5 * scale[i, h, diff]), (i, h, j, diff)
    np.testing.assert_allclose(pal[2], ref[2], rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(np.where(
        np.isfinite(ref[2]), ref[2], 0))))
    if kind == "large":
        assert s % scan_tile(s), "this case covers a store that is not a multiple of the tile"


def test_lists_hold_every_key():
    c = _case("gauss", 3, 64, jnp.bfloat16)
    b, hq = c["q"].shape[:2]
    beta = np.full((b, hq), np.inf, np.float32)  # every searched key is a candidate
    lengths = np.asarray(c["lengths"])
    tile = scan_tile(c["keys"].shape[2])
    for impl in IMPLEMENTATIONS:
        cidx, counts, _ = _run(c, beta, impl)
        for i in range(b):
            L = int(lengths[i])
            for j in range(NS):
                t0, t1 = (int(x) for x in split_tiles(L, j, sink=SINK, window=WINDOW, tile=tile, num_splits=NS))
                want = np.arange(max(t0 * tile, SINK), min(t1 * tile, max(L - WINDOW, SINK)))
                np.testing.assert_array_equal(counts[i, :, j], len(want))
                for h in range(c["keys"].shape[1]):
                    np.testing.assert_array_equal(cidx[i, h, j, :len(want)], want)


def test_no_forced_positions_length_one_and_a_tiny_store():
    c = make_coded_case("gauss", g=4, hkv=1, d=64, dtype=jnp.float32, lengths=(1, 200), seed=3)
    beta = np.full((2, 4), 2.0, np.float32)
    for impl in IMPLEMENTATIONS:
        cidx, counts, m_sw = _run(c, beta, impl, sink=0, window=0, ns=2)
        assert np.all(m_sw == -np.inf)  # nothing forced: threshold -inf, all searched keys kept
        np.testing.assert_array_equal(counts.sum(-1)[:, 0], [1, 200])
    tiny = {k: (v[:, :, :8] if k in ("keys", "values", "codes", "scales", "errs") else v) for k, v in c.items()}
    tiny["lengths"] = jnp.asarray([1, 8], jnp.int32)
    outs = [_run(tiny, np.full((2, 4), np.inf, np.float32), impl, sink=1, window=2, ns=1) for impl in IMPLEMENTATIONS]
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(outs[0][1][:, 0, 0], [0, 5])  # B=0: nothing searched; B=1: keys 1..5


def test_split_layout_covers_the_searched_range_once_and_balanced():
    tile = 128
    for L in (0, 3, 5, 68, 69, 513, 1023):
        for ns in (1, 3, 7):
            hi = max(L - WINDOW, SINK)
            seen = []
            for j in range(ns):
                t0, t1 = (int(x) for x in split_tiles(L, j, sink=SINK, window=WINDOW, tile=tile, num_splits=ns))
                seen.append(np.arange(t0 * tile, t1 * tile))
            allpos = np.concatenate(seen)
            want = np.arange(SINK, hi) if hi > SINK else np.arange(0)
            assert np.all(np.isin(want, allpos)) and len(np.unique(allpos)) == len(allpos)
            sizes = [len(x) for x in seen]
            assert max(sizes) - min(sizes) <= tile
            sp = np.asarray(split_of_position(want, L, sink=SINK, window=WINDOW, tile=tile, num_splits=ns))
            for j in range(ns):
                assert np.all(np.isin(want[sp == j], seen[j]))


def test_bad_inputs_raise():
    c = _case("gauss", 4, 64, jnp.float32)
    args = [c[k] for k in ("q", "q_rot", "keys", "codes", "scales", "errs", "lengths")] + [jnp.float32(1.0)]
    kw = dict(sink=4, window=8, num_splits=2)
    with pytest.raises(ValueError, match="codes must be uint8"):
        code_scan(*args[:3], args[3].astype(jnp.int32), *args[4:], **kw)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        code_scan(args[0][:, :7], args[1][:, :7], *args[2:], **kw)
    with pytest.raises(ValueError, match="num_splits"):
        code_scan(*args, sink=4, window=8, num_splits=0)
    with pytest.raises(ValueError, match="implementation"):
        code_scan(*args, implementation="xla", **kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(BackendUnavailableError):
            code_scan(*args, implementation="pallas", interpret=False, **kw)
