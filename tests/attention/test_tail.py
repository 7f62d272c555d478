"""The estimated tail (alaya_jax.attention.tail): its formula, and what it must reduce to in every
key-selecting method (small stores, fast)."""

import numpy as np
import pytest
import jax.numpy as jnp

from alaya_jax.attention import tail
from alaya_jax.attention.store_api import decode_attention
from alaya_jax.attention.config import AttentionConfig, KernelConfig
from alaya_jax.cli import build_parser
from alaya_jax.errors import ConfigError
from alaya_jax.store import kv_store
from pallas_kernels.key_codes import decode, rotate

B, HKV, G, D, BK, CAP = 2, 2, 3, 16, 16, 128
LENGTHS = (90, 53)
SELECTING = {"dipr": dict(beta=3.0), "topk": dict(budget=20), "topp": dict(top_p=0.6), "quest": dict(budget=32),
             "infllm": dict(budget=32), "streaming": {}}


def make(*, flat_blocks=False, seed=0):
    """A ragged GQA store (lengths 90 and 53; keys and values NaN past them) and queries [B, Hq, D]."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, CAP, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, CAP, HKV, D)).astype(np.float32)
    if flat_blocks:  # one value per block: the block means are the values
        v = np.repeat(v[:, ::BK], BK, axis=1)
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray(LENGTHS), block_size=BK)
    bad = ~np.asarray(kv_store.positions_valid(st)).reshape(B, 1, CAP // BK, BK, 1)
    st = st.replace(keys=jnp.where(bad, jnp.nan, st.keys), values=jnp.where(bad, jnp.nan, st.values))
    q = jnp.asarray(rng.standard_normal((B, HKV * G, D)).astype(np.float32) * 0.8)
    return st, q


def cfg(method, t, sink=2, window=8, **kw):
    return AttentionConfig(method=method, sink=sink, window=window, tail=t, **kw)


def test_tail_partial_is_the_formula():
    st, q = make()
    rng = np.random.default_rng(1)
    valid = np.asarray(kv_store.positions_valid(st))[:, None, :]
    rest = valid & (rng.random((B, HKV * G, CAP)) < 0.7)
    out, lse = (np.asarray(x, np.float64) for x in tail.tail_partial(q, st, jnp.asarray(rest)))
    # The same in float64 numpy: estimates from the decoded codes, block means of the valid values.
    codes, scale, _ = st.dense_codes()
    khat = np.asarray(decode(codes, scale), np.float64)  # [B, Hkv, S, D] rotated
    qr = np.asarray(rotate(q.reshape(B, HKV, G, D).transpose(0, 2, 1, 3), st.rot_signs), np.float64)
    est = np.einsum("bghd,bhsd->bhgs", qr, khat).reshape(B, HKV * G, CAP)
    z = np.where(rest, est / np.sqrt(D), -np.inf)
    m = z.max(-1, keepdims=True)
    w = np.exp(z - m).reshape(B, HKV, G, CAP // BK, BK).sum(-1)  # per-block weights
    vals = np.asarray(st.values, np.float64)
    ok = valid[:, :, :, None].reshape(B, 1, CAP // BK, BK, 1)
    means = np.where(ok, vals, 0).sum(3) / np.maximum(ok.sum(3), 1)  # [B, Hkv, NB, D]
    want = (np.einsum("bhgn,bhnd->bhgd", w, means) / w.sum(-1)[..., None]).reshape(B, HKV * G, D)
    np.testing.assert_allclose(out, want, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(lse, m[..., 0] + np.log(w.sum(-1)).reshape(B, HKV * G), rtol=2e-3, atol=2e-3)
    # An empty rest has no tail.
    out0, lse0 = tail.tail_partial(q, st, jnp.zeros(rest.shape, bool))
    assert np.all(np.asarray(lse0) == -np.inf) and np.all(np.asarray(out0) == 0)


@pytest.mark.parametrize("method", list(SELECTING))
def test_a_tail_over_an_empty_rest_is_exact_sparse_attention(method):
    """Sequence 1 (53 keys, sink 2 + window 64 cover them all) has an empty rest: the tail changes
    nothing there; sequence 0 (90 keys) has a rest, and the tail changes its output."""
    st, q = make()
    kw = SELECTING[method]
    off, _ = decode_attention(q, st, cfg(method, "none", window=64, **kw))
    on, _ = decode_attention(q, st, cfg(method, "estimate", window=64, **kw))
    off, on = np.asarray(off), np.asarray(on)
    assert np.isfinite(on).all()
    np.testing.assert_allclose(on[1], off[1], rtol=1e-5, atol=1e-6)
    assert np.abs(on[0] - off[0]).max() > 1e-3


@pytest.mark.parametrize("method,kw", [("dipr", dict(beta=float("inf"))), ("topk", dict(budget=CAP)),
                                       ("topp", dict(top_p=1.0)), ("quest", dict(budget=CAP))])
def test_a_selection_of_every_key_is_full_attention(method, kw):
    st, q = make()
    full, _ = decode_attention(q, st, AttentionConfig(method="full"))
    for mode in tail.TAIL_MODES + tail.STUDY_MODES:
        out, _ = decode_attention(q, st, cfg(method, mode, **kw))
        np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-5, atol=1e-6, err_msg=mode)


def test_the_kernels_tail_is_the_reference_tail(beta=2.0):
    """DIPR + tail through filter-refine in Pallas (interpret: the scan's sums, the refine's rejected
    candidates, the merge) against the jnp reference (brute-force DIPR set, estimates of the decoded code):
    the same definition up to the scan's int8 query planes (ŝ within ~2^-14 relative) and the refine's
    rounding slack; with a filter the kernels refuse the tail loudly."""
    st, q = make()
    pallas = KernelConfig(implementation="pallas")
    ref, _ = decode_attention(q, st, cfg("dipr", "estimate", beta=beta))
    ker, _ = decode_attention(q, st, cfg("dipr", "estimate", beta=beta, kernel=pallas))
    plain, _ = decode_attention(q, st, cfg("dipr", "none", beta=beta, kernel=pallas))
    ref, ker, plain = (np.asarray(x, np.float64) for x in (ref, ker, plain))
    err = np.linalg.norm(ker - ref) / np.linalg.norm(ref)
    assert err <= 3e-4, err
    # ... far below what the tail changes
    assert np.linalg.norm(ker - plain) / np.linalg.norm(ref) > 30 * max(err, 1e-5)
    from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
    with pytest.raises(ValueError, match="key_mask"):
        dipr_store_attention(q, st, beta=beta, tail="estimate", implementation="pallas",
                             key_mask=kv_store.positions_valid(st))


def test_exact_scores_over_flat_blocks_is_full_attention():
    """With one value per block the block means are exact, so the exact-score tail is full attention for
    any selection, and the estimated tail weighs the rest's own values exactly as vweighted does."""
    st, q = make(flat_blocks=True)
    full, _ = decode_attention(q, st, AttentionConfig(method="full"))
    for method, kw in SELECTING.items():
        out, _ = decode_attention(q, st, cfg(method, "exact-scores", **kw))
        np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-4, atol=1e-5, err_msg=method)
        est, _ = decode_attention(q, st, cfg(method, "estimate", **kw))
        vw, _ = decode_attention(q, st, cfg(method, "estimate-vweighted", **kw))
        np.testing.assert_allclose(np.asarray(est), np.asarray(vw), rtol=1e-4, atol=1e-5, err_msg=method)


def test_config_and_cli_name_the_modes():
    assert AttentionConfig().tail == tail.DEFAULT_TAIL and AttentionConfig(method="full").effective_tail == "none"
    assert AttentionConfig(method="topk", tail="none").effective_tail == "none"
    with pytest.raises(ConfigError, match="unknown tail 'bogus'"):
        AttentionConfig(tail="bogus")
    pallas = KernelConfig(implementation="pallas")
    with pytest.raises(ConfigError, match="study tail 'exact-scores'"):
        AttentionConfig(method="dipr", tail="exact-scores", kernel=pallas)
    AttentionConfig(method="dipr", tail="estimate", kernel=pallas)
    AttentionConfig(method="dipr", tail="none", kernel=pallas)
    AttentionConfig(method="topk", tail="estimate", kernel=pallas)  # the masked baselines are jnp
    for cmd in ("eval", "generate", "serve"):
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[cmd]._actions
                      if a.dest == "tail")
        assert tuple(action.choices) == tail.TAIL_MODES == ("none", "estimate") and action.default == tail.DEFAULT_TAIL


def test_tail_error_curve_is_the_decode_steps_error():
    """Calibration's tail error at a grid β equals ‖attend_with_tail − full‖ of a decode query at that β;
    β = ∞ selects every key (error 0); the tail allocation water-fills a budget and refuses a mass target."""
    from alaya_jax.attention.dipr import calibration as cal
    from alaya_jax.attention.dipr.brute_force import range_mask_from_scores
    from alaya_jax.attention.masked import raw_scores, sink_window_mask

    st, q1 = make()
    st = kv_store.truncate(st, 53)  # both rows 53 keys: calibration rows at positions 51, 52
    q = jnp.stack([q1, q1 * 0.5], axis=1)  # [B, T=2, Hq, D]
    pos = jnp.asarray([[51, 52]] * B)
    grid = jnp.asarray(cal.BETA_GRID)
    err, rel = (np.asarray(x) for x in cal.tail_error_curve(q, st, pos, jnp.asarray([[False, True]] * B), sink=2,
                                                            window=8, grid=grid, mode="estimate"))
    assert err.shape == (B, HKV * G, len(cal.BETA_GRID)) and np.all(err[..., -1] < 1e-5)
    qq, bi = q[:, 1], 12
    valid = kv_store.positions_valid(st)
    sel = range_mask_from_scores(raw_scores(qq, st.dense_keys()), valid, grid[bi])
    sel = sel | sink_window_mask(st.lengths, st.capacity, sink=2, window=8)[:, None, :]
    full = tail.attend_with_tail(qq, st, jnp.broadcast_to(valid[:, None, :], sel.shape), mode="none")
    want = np.linalg.norm(np.asarray(tail.attend_with_tail(qq, st, sel, mode="estimate") - full), axis=-1)
    np.testing.assert_allclose(err[..., bi], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rel[..., bi], want / np.linalg.norm(np.asarray(full), axis=-1), rtol=1e-4, atol=1e-5)
    curves = cal.Curves(mass=np.ones((1,) + err.shape), keys=np.broadcast_to(np.linspace(0.1, 1, err.shape[-1]),
                                                                            (1,) + err.shape).copy(),
                        spread=np.ones((1,) + err.shape[:2]), rows=np.ones(B), length=np.full(B, 53),
                        tail_err=np.asarray(err, np.float64)[None], tail="estimate")
    betas = cal.choose_betas(curves, keys=0.5, allocation="head-tail")
    assert betas.shape == (1, B, HKV * G) and cal.spent_fraction(curves, betas).max() <= 0.5 + 1e-9
    with pytest.raises(ConfigError, match="key budget"):
        cal.choose_betas(curves, mass=0.9, allocation="head-tail")
