"""Shared-reference scoring (alaya_jax.runtime.evaluation) on a tiny random Llama."""

import math

import numpy as np
import pytest

from alaya_jax.attention.config import AttentionConfig
from alaya_jax.runtime.evaluation import prepare_reference, score_against, score_sparse
from tests.support.engines import random_tokens


def test_shared_reference_equals_one_shot(engine):
    toks = random_tokens(72, 3)
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
    toks = random_tokens(50, 4)
    ref = prepare_reference(engine, toks, prefill_tokens=40)
    out = score_against(engine, ref, AttentionConfig(method="full"))
    assert out["kl_to_full"] == pytest.approx(0.0, abs=1e-6)
    assert out["keys_fraction"] == pytest.approx(1.0)
    assert out["attention_recall"] == pytest.approx(1.0, abs=1e-5)
    assert out["top1_agreement"] == 1.0
    assert out["nll"] == pytest.approx(out["nll_full"], abs=1e-6)


def test_reference_from_prefilled_caches(engine):
    toks = random_tokens(50, 5)
    caches = engine.new_caches(batch=1, capacity=50)
    caches, _, _ = engine.prefill(caches, [toks[:40]])
    a = prepare_reference(engine, toks, prefill_tokens=40, caches=caches)
    b = prepare_reference(engine, toks, prefill_tokens=40)
    np.testing.assert_allclose(np.asarray(a.logits_full), np.asarray(b.logits_full), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="need 39 tokens"):
        prepare_reference(engine, toks, prefill_tokens=39, caches=caches)
    with pytest.raises(ValueError, match="prefill_tokens must be"):
        prepare_reference(engine, toks, prefill_tokens=49)
