"""Self-calibrated DIPR: curves against NumPy, mass and budget modes, β per head through the store
path and the engine, snapshots carrying the βs, and the bad-value errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints as ck
from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.attention.dipr import calibration as cal
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
from alaya_jax.cli import main as cli_main
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.store import kv_store
from tests.support.dipr_cases import np_dipr_mask, store_case
from tests.support.engines import decode_logits, random_tokens


def np_curves(q, k, v, pos, length, *, sink, window, grid):
    """NumPy: q [T,Hq,D] at positions pos [T], k/v [S,Hkv,D] → mass, keys, recall, vmass [Hq,G], spread [Hq]."""
    t, hq, d = q.shape
    g = hq // k.shape[1]
    mass = np.zeros((hq, len(grid)))
    keys = np.zeros((hq, len(grid)))
    recall = np.zeros((hq, len(grid)))
    vmass = np.zeros((hq, len(grid)))
    spread = np.zeros(hq)
    for h in range(hq):
        for r in range(t):
            n = pos[r] + 1
            sc = k[:n, h // g].astype(np.float64) @ q[r, h].astype(np.float64)
            p = np.exp((sc - sc.max()) / math.sqrt(d))
            p /= p.sum()
            idx = np.arange(n)
            sw = (idx < sink) | (idx > pos[r] - window)
            out = ~sw
            vv = v[:n, h // g].astype(np.float64)
            dist = np.linalg.norm(vv - p @ vv, axis=-1)
            for j, b in enumerate(grid):
                inr = out & (sc >= sc.max() - b)
                mass[h, j] += (p[inr].sum() / p[out].sum() if out.any() else 1.0) / t
                keys[h, j] += (inr.sum() + sw.sum()) / n / t
                recall[h, j] += p[inr | sw].sum() / t
                vmass[h, j] += (p * dist)[inr | sw].sum() / t
            pt = np.where(out, p, 0) / p[out].sum()
            mv = pt @ vv
            spread[h] += math.sqrt(max(pt @ (vv * vv).sum(-1) - mv @ mv, 0.0)) / t
    return mass, keys, spread, recall, vmass


def test_layer_curves_match_numpy():
    rng = np.random.default_rng(0)
    s, hq, hkv, d, t = 300, 4, 2, 16, 7
    k = rng.normal(size=(1, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(1, s, hkv, d)).astype(np.float32)
    q = (rng.normal(size=(1, t, hq, d)) * 2).astype(np.float32)
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), jnp.asarray([s]), block_size=16)
    pos = np.arange(s - t, s)
    grid = cal.BETA_GRID
    got = cal.layer_curves(jnp.asarray(q), st, jnp.asarray(pos[None]), jnp.ones((1, t), bool),
                           sink=3, window=10, grid=jnp.asarray(grid))
    want = np_curves(q[0], k[0], v[0], pos, s, sink=3, window=10, grid=grid)
    for name, x, y in zip(("mass", "keys", "spread", "recall", "vmass"), got, want):
        np.testing.assert_allclose(np.asarray(x)[0], y, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def tiny_curves(engine):
    toks = random_tokens(300, 1)
    caches = engine.new_caches(batch=1, capacity=320)
    caches, _, _ = engine.prefill(caches, [toks])
    return engine, caches, toks, engine.calibration_curves(caches, [toks[-16:]], sink=2, window=8)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("allocation", [a for a in cal.ALLOCATIONS if a not in cal.BUDGET_ONLY_ALLOCATIONS])
def test_mass_mode_reaches_its_target_on_the_calibration_queries(tiny_curves, target, allocation):
    _, _, _, curves = tiny_curves
    betas = cal.choose_betas(curves, mass=target, allocation=allocation)  # [L,1,Hq]
    granularity, kind = allocation.split("-")
    gain = cal.gain_curves(curves, kind)
    idx = np.searchsorted(curves.grid, betas)
    if granularity == "layer":  # heads of a layer share β: the layer's summed gain reaches the target
        assert (betas == betas[:, :, :1]).all()
        gain, idx = gain.sum(axis=2, keepdims=True), idx[:, :, :1]
    frac = gain / gain[..., -1:]
    held = np.take_along_axis(frac, idx[..., None], axis=-1)[..., 0]
    assert (held >= target - 1e-9).all()
    # ... and it is the smallest grid β that does: one grid step lower misses the target.
    lower = np.take_along_axis(frac, np.maximum(idx - 1, 0)[..., None], axis=-1)[..., 0]
    assert ((lower < target) | (idx == 0)).all()
    assert (curves.rows == 16).all()


@pytest.mark.parametrize("allocation", cal.BUDGET_ONLY_ALLOCATIONS)
def test_a_tail_allocation_refuses_a_mass_target(tiny_curves, allocation):
    with pytest.raises(ConfigError, match="key budget"):
        cal.choose_betas(tiny_curves[3], mass=0.8, allocation=allocation)


def test_engine_calibrate_puts_the_default_allocation_on_the_caches(tiny_curves):
    engine, caches, toks, curves = tiny_curves
    cfg = AttentionConfig(method="dipr", sink=2, window=8, calibration=CalibrationConfig(dipr_mass=0.8, n_cal=16))
    got, c2 = engine.calibrate(caches, [toks], cfg)
    want = cal.choose_betas(curves, mass=0.8)
    np.testing.assert_array_equal(np.stack([np.asarray(c.dipr_beta) for c in got]), want)


def _synthetic_curves(layers=30, heads=9, seed=0):
    """Smooth, head-dependent saturating curves on the β grid (like SmolLM2's)."""
    rng = np.random.default_rng(seed)
    grid = cal.BETA_GRID
    gfin = np.where(np.isfinite(grid), grid, 1e9)
    scale = rng.uniform(4, 60, size=(layers, 1, heads, 1))
    width = rng.uniform(0.005, 0.03, size=(layers, 1, heads, 1))
    floor = 68 / 4096
    mass = 1 - np.exp(-gfin / scale)
    keys = floor + (1 - floor) * (1 - np.exp(-gfin * width / scale * 3)) ** 1.5
    mass[..., -1] = keys[..., -1] = 1.0
    return cal.Curves(mass=mass, keys=keys, spread=np.ones((layers, 1, heads)), rows=np.array([64]),
                      length=np.array([4096]), recall=0.8 + 0.2 * mass, vmass=mass * 3)


@pytest.mark.parametrize("fraction", [0.02, 0.03, 0.04, 0.1])
@pytest.mark.parametrize("allocation", ["head-mass", "head-recall", "layer-recall", "layer-vdist"])
def test_budget_mode_spends_its_budget_within_one_percent(fraction, allocation):
    curves = _synthetic_curves()
    betas = cal.choose_betas(curves, keys=fraction, allocation=allocation)
    spent = float(cal.spent_fraction(curves, betas)[0])
    assert spent <= fraction * (1 + 1e-9)
    assert spent >= fraction * 0.99, (spent, fraction)
    # the βs differ between heads or layers (a shared budget, not a uniform β)
    assert len(np.unique(betas)) > 3


def test_budget_mode_on_the_model_spends_within_one_percent(engine):
    toks = random_tokens(500, 2)
    caches = engine.new_caches(batch=1, capacity=520)
    caches, _, _ = engine.prefill(caches, [toks])
    cfg = AttentionConfig(method="dipr", sink=2, window=8, calibration=CalibrationConfig(dipr_keys=0.5, n_cal=32))
    caches, curves = engine.calibrate(caches, [toks], cfg)
    betas = np.stack([np.asarray(c.dipr_beta) for c in caches])
    spent = float(cal.spent_fraction(curves, betas)[0])
    # tiny model: 2 layers x 4 heads, so one grid step of one head is the granularity
    steps = np.diff(curves.keys[:, 0], axis=-1).max() / curves.keys.shape[0]  # one layer's step
    assert 0.5 - steps <= spent <= 0.5 + 1e-9


def test_budget_below_sink_and_window_is_an_error():
    with pytest.raises(ValueError, match="below what sink, window"):
        cal.betas_for_budget(_synthetic_curves(), 0.01)


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_beta_per_head_reaches_the_kernels(implementation):
    """A β per query head gives each head the mask of its own β (brute force per head)."""
    q, k, v, ln, st = store_case([200, 513], 6, 2, 64, 32, seed=11)
    betas = np.array([[0.0, 2.0, 8.0, 30.0, math.inf, 5.0], [40.0, 0.5, 3.0, 0.0, 12.0, math.inf]], np.float32)
    _, _, mask = dipr_store_attention(jnp.asarray(q), st, beta=jnp.asarray(betas), sink=0, window=0,
                                      with_mask=True, implementation=implementation)
    got = np.asarray(mask)[:, :, : k.shape[1]]
    want = np.zeros_like(got)
    for i in range(2):
        for h in range(6):
            want[i, h] = np_dipr_mask(q, k, float(betas[i, h]), ln)[i, h]
    np.testing.assert_array_equal(got, want)
    # the per-head masks differ: the test would fail with one β for all heads
    assert len({int(got[0, h].sum()) for h in range(6)}) > 2
    # a [Hq] vector broadcasts over the batch
    _, _, m2 = dipr_store_attention(jnp.asarray(q), st, beta=jnp.asarray(betas[0]), sink=0, window=0,
                                    with_mask=True, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(m2)[0, :, : k.shape[1]], want[0])


def test_bad_beta_arrays():
    q, k, v, ln, st = store_case([100], 4, 2, 16, 16, seed=1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        dipr_store_attention(jnp.asarray(q), st, beta=np.array([1.0, -1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        dipr_store_attention(jnp.asarray(q), st, beta=np.ones(3))


def _decode(engine, caches, cfg, steps=4):
    return decode_logits(engine, None, cfg, steps=steps, caches=caches)


def test_engine_decodes_with_the_stored_betas(engine):
    """Calibrated DIPR decodes with the βs on the caches: all βs = 3 is uniform β = 3; other βs differ."""
    toks = random_tokens(200, 3)
    caches = engine.new_caches(batch=1, capacity=220)
    caches, _, _ = engine.prefill(caches, [toks])
    hq = engine.config.num_heads
    L = engine.config.num_layers
    calcfg = AttentionConfig(method="dipr", sink=2, window=8, calibration=CalibrationConfig(dipr_mass=0.9))
    same = _decode(engine, cal.with_betas(caches, np.full((L, 1, hq), 3.0, np.float32)), calcfg)
    uni = _decode(engine, caches, AttentionConfig(method="dipr", beta=3.0, sink=2, window=8))
    np.testing.assert_array_equal(same, uni)
    mixed = np.full((L, 1, hq), 3.0, np.float32)
    mixed[:, :, 0] = 0.0
    assert not np.allclose(_decode(engine, cal.with_betas(caches, mixed), calcfg), uni)
    with pytest.raises(ValueError, match="needs the βs chosen at the end of prefill"):
        _decode(engine, caches, calcfg, steps=1)


def test_generate_calibrates_and_needs_the_cachedrandom_tokens(engine):
    toks = random_tokens(300, 4)
    cfg = AttentionConfig(method="dipr", sink=2, window=8, calibration=CalibrationConfig(dipr_keys=0.5, n_cal=16))
    res, caches = engine.generate([toks], sampling=SamplingConfig(max_new_tokens=3), attention=cfg)
    assert len(res[0].tokens) == 3 and caches[0].dipr_beta is not None
    pre = engine.new_caches(batch=1, capacity=320)
    pre, _, _ = engine.prefill(pre, [toks[:290]])
    with pytest.raises(ValueError, match="pass context_tokens"):
        engine.generate([toks[290:]], sampling=SamplingConfig(max_new_tokens=3), attention=cfg,
                        caches=jax.tree.map(jnp.copy, pre))
    res2, c2 = engine.generate([toks[290:]], sampling=SamplingConfig(max_new_tokens=3), attention=cfg,
                               caches=pre, context_tokens=[toks[:290]])
    assert res2[0].tokens == res[0].tokens
    for a, b in zip(c2, caches):
        np.testing.assert_array_equal(np.asarray(a.dipr_beta), np.asarray(b.dipr_beta))


def test_generate_recalibrates_when_the_context_has_grown(engine):
    """The βs are chosen again, from the most recent tokens in the caches, once the context has
    grown by ``recalibrate_growth``; never with None."""
    toks = random_tokens(40, 5)
    sampling = SamplingConfig(max_new_tokens=30)
    base = dict(method="dipr", sink=2, window=4)
    cal = dict(dipr_keys=0.6, n_cal=8)
    n0 = engine.recalibrations
    res_off, c_off = engine.generate([toks], sampling=sampling, attention=AttentionConfig(
        **base, calibration=CalibrationConfig(**cal, recalibrate_growth=None)))
    assert engine.recalibrations == n0
    res_on, c_on = engine.generate([toks], sampling=sampling, attention=AttentionConfig(
        **base, calibration=CalibrationConfig(**cal, recalibrate_growth=1.5)))
    assert engine.recalibrations == n0 + 1  # at 60 tokens (1.5 x 40); the next would be at 90 > 70
    grown = 60
    hist = toks + res_on[0].tokens  # the generated tokens before the recalibration are the same in both runs
    assert hist[:grown] == (toks + res_off[0].tokens)[:grown]
    pre = engine.new_caches(batch=1, capacity=80)
    pre, _, _ = engine.prefill(pre, [hist[:grown]])
    want, _ = engine.calibrate(pre, [hist[:grown]], AttentionConfig(**base, calibration=CalibrationConfig(**cal)))
    for a, w, off in zip(c_on, want, c_off):
        np.testing.assert_allclose(np.asarray(a.dipr_beta), np.asarray(w.dipr_beta), rtol=1e-5)
    assert any(not np.allclose(np.asarray(a.dipr_beta), np.asarray(o.dipr_beta)) for a, o in zip(c_on, c_off))
    with pytest.raises(ValueError, match="recalibrate_growth"):
        AttentionConfig(**base, calibration=CalibrationConfig(**cal, recalibrate_growth=1.0))


def test_snapshots_round_trip_the_betas(tmp_path):
    rng = np.random.default_rng(0)
    caches = []
    for i in range(3):
        k = jnp.asarray(rng.standard_normal((1, 70, 2, 8), np.float32))
        v = jnp.asarray(rng.standard_normal((1, 70, 2, 8), np.float32))
        caches.append(kv_store.from_dense(k, v, block_size=16, capacity=100))
    fp = dict(model_fingerprint="m", tokenizer_fingerprint="t")
    ck.save_snapshot(tmp_path / "plain", caches, list(range(70)), **fp)
    betas = rng.uniform(0, 50, size=(3, 1, 4)).astype(np.float32)
    betas[1, 0, 2] = np.inf
    ck.save_snapshot(tmp_path / "cal", cal.with_betas(caches, betas), list(range(70)), **fp)
    plain, _, _ = ck.load_snapshot(tmp_path / "plain", capacity=100)
    assert all(c.dipr_beta is None for c in plain)  # a snapshot without βs loads as before
    got, _, _ = ck.load_snapshot(tmp_path / "cal", capacity=100)
    np.testing.assert_array_equal(np.stack([np.asarray(c.dipr_beta) for c in got]), betas)
    # the βs are covered by the checksums
    with open(tmp_path / "cal" / ck.snapshot.BETA_FILE, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ck.CorruptSnapshotError):
        ck.load_snapshot(tmp_path / "cal")


@pytest.mark.parametrize(
    "method,calibration,match",
    [
        ("dipr", dict(dipr_mass=0.0), "dipr_mass must be in"),
        ("dipr", dict(dipr_mass=1.5), "dipr_mass must be in"),
        ("dipr", dict(dipr_keys=-0.1), "dipr_keys must be in"),
        ("dipr", dict(dipr_keys=1.01), "dipr_keys must be in"),
        ("dipr", dict(dipr_mass=0.9, dipr_keys=0.03), "not both"),
        ("topk", dict(dipr_mass=0.9), "cannot be used with method 'topk'"),
        ("dipr", dict(dipr_keys=0.03, n_cal=0), "n_cal"),
    ],
)
def test_bad_calibration_config(method, calibration, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(method=method, calibration=CalibrationConfig(**calibration))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--attention", "dipr", "--dipr-mass", "0.9", "--dipr-keys", "0.03"], "not both"),
        (["--attention", "topp", "--dipr-keys", "0.03"], "use them with --attention dipr"),
    ],
)
def test_cli_calibration_errors(tmp_path, capsys, flags, match):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert cli_main(["eval", "--text-file", str(text), *flags]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_cli_rejects_out_of_range_targets(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "--text-file", "x", "--attention", "dipr", "--dipr-mass", value])
    assert e.value.code == 2
    assert "--dipr-mass" in capsys.readouterr().err
