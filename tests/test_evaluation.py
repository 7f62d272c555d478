"""Shared-reference scoring (alaya_jax.evaluation) on a tiny random Llama."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alaya_jax.engine import Engine
from alaya_jax.evaluation import prepare_reference, score_against, score_sparse
from alaya_jax.methods import AttentionConfig
from models import Llama, tiny


@pytest.fixture(scope="module")
def engine():
    cfg = dataclasses.replace(tiny(), max_position_embeddings=1024)
    return Engine(Llama(cfg, rngs=nnx.Rngs(0)), block_size=8, prefill_chunk=32)


def _tokens(n, seed=0, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def test_shared_reference_equals_one_shot(engine):
    toks = _tokens(72, 3)
    ref = prepare_reference(engine, toks, prefill_tokens=60)
    assert ref.steps == 11 and ref.logits_full.shape[0] == 11
    for cfg in (AttentionConfig(method="dipr", beta=4.0, sink=1, window=4),
                AttentionConfig(method="topk", budget=6, sink=1, window=4)):
        shared = score_against(engine, ref, cfg)
        one = score_sparse(engine, toks, attention=cfg, prefill_tokens=60)
        for k in ("nll", "nll_full", "kl_to_full", "keys_fraction", "attention_recall", "mean_keys_attended"):
            assert math.isclose(shared[k], one[k], rel_tol=1e-5, abs_tol=1e-7), k
    # The reference's caches are not consumed by scoring.
    assert int(np.asarray(ref.caches[0].lengths)[0]) == 60


def test_full_against_reference_is_exact(engine):
    toks = _tokens(50, 4)
    ref = prepare_reference(engine, toks, prefill_tokens=40)
    out = score_against(engine, ref, AttentionConfig(method="full"))
    assert out["kl_to_full"] == pytest.approx(0.0, abs=1e-6)
    assert out["keys_fraction"] == pytest.approx(1.0)
    assert out["attention_recall"] == pytest.approx(1.0, abs=1e-5)
    assert out["top1_agreement"] == 1.0
    assert out["nll"] == pytest.approx(out["nll_full"], abs=1e-6)


def test_reference_from_prefilled_caches(engine):
    toks = _tokens(50, 5)
    caches = engine.new_caches(batch=1, capacity=50)
    caches, _, _ = engine.prefill(caches, [toks[:40]])
    a = prepare_reference(engine, toks, prefill_tokens=40, caches=caches)
    b = prepare_reference(engine, toks, prefill_tokens=40)
    np.testing.assert_allclose(np.asarray(a.logits_full), np.asarray(b.logits_full), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="need 39 tokens"):
        prepare_reference(engine, toks, prefill_tokens=39, caches=caches)
    with pytest.raises(ValueError, match="prefill_tokens must be"):
        prepare_reference(engine, toks, prefill_tokens=49)
