"""Engine on a tiny random Llama: prefill/decode equivalence, compile counts, methods, metrics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alaya_jax.attention.config import METHODS, AttentionConfig, KernelConfig
from alaya_jax.runtime.engine import FULL, Engine
from alaya_jax.runtime.evaluation import score_sparse
from alaya_jax.runtime.sampling import SamplingConfig
from models import Llama, tiny
from tests.support.engines import decode_logits, random_tokens

SPARSE = [m for m in METHODS if m not in ("full", "auto")]


def test_chunked_prefill_then_decode_equals_one_forward(engine):
    toks = random_tokens(70)
    # One dense forward over everything (a single 128-bucket chunk).
    big = Engine.__new__(Engine)
    big.__dict__.update(engine.__dict__)
    big.prefill_chunk = 128
    ref = big.score(toks).nll_per_token
    # Chunked prefill of 40 tokens (chunks of 32), then decode steps teacher-forced.
    caches = engine.new_caches(batch=1, capacity=80)
    caches, logits, nll_pre = engine.prefill(caches, [toks[:40]], score_next=True)
    np.testing.assert_allclose(nll_pre[0], ref[:39], rtol=1e-4, atol=1e-4)
    got = [float(-jax.nn.log_softmax(logits[0])[toks[40]])]
    for t in range(40, 69):
        _, logits, caches, _ = engine.decode_step(caches, jnp.asarray([toks[t]]), key=jax.random.PRNGKey(0),
                                                  sampling=SamplingConfig())
        got.append(float(-jax.nn.log_softmax(logits[0])[toks[t + 1]]))
    np.testing.assert_allclose(got, ref[39:], rtol=1e-4, atol=1e-4)


def test_decode_compiles_once_per_sampling_kind_for_50_tokens(engine):
    before = engine.trace_counts["decode_chunk"]
    for seed in (1, 2):  # greedy: one compilation for both prompts and every chunk
        res, _ = engine.generate([random_tokens(11, seed)], sampling=SamplingConfig(max_new_tokens=50))
        assert len(res[0].tokens) == 50
    assert engine.trace_counts["decode_chunk"] - before == 1
    res, _ = engine.generate([random_tokens(11, 2)], sampling=SamplingConfig(max_new_tokens=50, temperature=0.7,
                                                                        top_p=0.9, seed=3))
    assert engine.trace_counts["decode_chunk"] - before == 2


def test_ragged_batch_equals_single_prompts(engine):
    prompts = [random_tokens(5, 3), random_tokens(37, 4), random_tokens(20, 5)]
    s = SamplingConfig(max_new_tokens=12)
    batch, _ = engine.generate(prompts, sampling=s, capacity=64)
    for p, r in zip(prompts, batch):
        single, _ = engine.generate([p], sampling=s, capacity=64)
        assert single[0].tokens == r.tokens


def test_sampling_is_seeded(engine):
    s = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    a, _ = engine.generate([random_tokens(9, 6)], sampling=s)
    b, _ = engine.generate([random_tokens(9, 6)], sampling=s)
    c, _ = engine.generate([random_tokens(9, 6)], sampling=dataclasses.replace(s, seed=8))
    assert a[0].tokens == b[0].tokens and a[0].tokens != c[0].tokens


def test_stop_ids(engine):
    s = SamplingConfig(max_new_tokens=30)
    free, _ = engine.generate([random_tokens(9, 7)], sampling=s)
    stop = free[0].tokens[5]
    first = free[0].tokens.index(stop)
    res, _ = engine.generate([random_tokens(9, 7)], sampling=s, stop_ids=[stop])
    assert res[0].stopped and res[0].tokens == free[0].tokens[:first]


@pytest.mark.parametrize("method", SPARSE)
def test_every_method_generates_and_compiles_once(engine, method):
    cfg = AttentionConfig(method=method, beta=4.0, budget=16, top_p=0.8, sink=2, window=8)
    before = engine.trace_counts["decode_chunk"]
    res, _ = engine.generate([random_tokens(150, 8)], sampling=SamplingConfig(max_new_tokens=20), attention=cfg)
    assert len(res[0].tokens) == 20
    assert engine.trace_counts["decode_chunk"] - before == 1


def test_dipr_infinite_beta_equals_full(engine):
    toks = random_tokens(130, 9)
    full = decode_logits(engine, toks, FULL)
    dipr = decode_logits(engine, toks, AttentionConfig(method="dipr", beta=math.inf, sink=0, window=0))
    np.testing.assert_allclose(dipr, full, rtol=1e-4, atol=1e-4)


def test_streaming_with_covering_window_equals_full(engine):
    toks = random_tokens(100, 10)
    full = decode_logits(engine, toks, FULL)
    stream = decode_logits(engine, toks, AttentionConfig(method="streaming", sink=0, window=200))
    np.testing.assert_allclose(stream, full, rtol=1e-4, atol=1e-4)


def test_eval_metrics_match_numpy_on_tiny_model(engine):
    """kl_to_full, keys_fraction and attention_recall against an independent NumPy computation."""
    toks = random_tokens(60, 11)
    cfg = AttentionConfig(method="topk", budget=5, sink=1, window=3)
    out = score_sparse(engine, toks, attention=cfg, prefill_tokens=50)
    assert out["tokens"] == 9
    # keys attended per head: top-5 ∪ sink(1) ∪ window(3), context t+1 keys at step t.
    # Reconstruct from the per-layer stats: every layer attends between 5 and 9 keys.
    for layer in out["per_layer"]:
        assert 5 <= layer["mean_keys_attended"] <= 9
        assert 0 < layer["attention_recall"] <= 1
    # NumPy recomputation of KL/NLL from the two chains' logits.
    caches = engine.new_caches(batch=1, capacity=60)
    caches, _, _ = engine.prefill(caches, [toks[:50]])
    caches_f = jax.tree.map(jnp.copy, caches)
    kls, fr = [], []
    for t in range(50, 59):
        tok = jnp.asarray([toks[t]])
        s = SamplingConfig()
        _, lm, caches, aux = engine.decode_step(caches, tok, key=jax.random.PRNGKey(0), sampling=s,
                                                attention=dataclasses.replace(cfg, collect_stats=True))
        _, lf, caches_f, _ = engine.decode_step(caches_f, tok, key=jax.random.PRNGKey(0), sampling=s)
        lm, lf = np.asarray(lm[0], np.float64), np.asarray(lf[0], np.float64)
        pm = np.exp(lm - lm.max())
        pm /= pm.sum()
        pf = np.exp(lf - lf.max())
        pf /= pf.sum()
        kls.append(np.sum(pf * (np.log(pf) - np.log(pm))))
        fr.append(np.mean([np.asarray(a["keys_attended"]).mean() for a in aux]) / (t + 1))
    assert out["kl_to_full"] == pytest.approx(np.mean(kls), rel=1e-3, abs=1e-6)
    assert out["keys_fraction"] == pytest.approx(np.mean(fr), rel=1e-6)


def test_recall_matches_numpy(engine):
    """attention_recall: the share of the full softmax mass on the attended keys (NumPy, one layer)."""
    from alaya_jax.attention.store_api import decode_attention
    from alaya_jax.store import kv_store

    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 4, 16)).astype(np.float32)
    k = rng.normal(size=(1, 90, 2, 16)).astype(np.float32)
    v = rng.normal(size=(1, 90, 2, 16)).astype(np.float32)
    st = kv_store.from_dense(jnp.asarray(k), jnp.asarray(v), block_size=8)
    cfg = AttentionConfig(method="topk", budget=7, sink=2, window=5, collect_stats=True)
    _, stats = decode_attention(jnp.asarray(q), st, cfg)
    for h in range(4):
        sc = k[0, :, h // 2].astype(np.float64) @ q[0, h] / 4.0
        p = np.exp(sc - sc.max())
        p /= p.sum()
        keep = set(np.argsort(-sc)[:7]) | {0, 1} | set(range(85, 90))
        assert float(stats["keys_attended"][0, h]) == len(keep)
        assert float(stats["recall"][0, h]) == pytest.approx(p[list(keep)].sum(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="nope"), "unknown attention method"),
        (dict(method="dipr", beta=-1.0), "beta"),
        (dict(method="topk", budget=0), "budget"),
        (dict(method="topp", top_p=0.0), "top_p"),
        (dict(method="dipr", kernel=dict(implementation="cuda")), "implementation"),
    ],
)
def test_bad_attention_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernel = kwargs.pop("kernel", None)
        AttentionConfig(**kwargs, **({} if kernel is None else {"kernel": KernelConfig(**kernel)}))


def test_context_overflow_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="exceed the model's context"):
        engine.generate([random_tokens(1000, 12)], sampling=SamplingConfig(max_new_tokens=100))


def test_xla_prefill_attention_equals_reference(engine):
    """The fused prefill path (jax.nn.dot_product_attention, implementation="xla") gives the reference logits."""
    toks = random_tokens(45, 13)
    cfg = dataclasses.replace(tiny(), max_position_embeddings=1024)
    fused = Engine(Llama(cfg, rngs=nnx.Rngs(0)), block_size=8, prefill_chunk=32, prefill_attention="xla")
    ref = engine.score(toks).nll_per_token
    np.testing.assert_allclose(fused.score(toks).nll_per_token, ref, rtol=1e-4, atol=1e-4)
