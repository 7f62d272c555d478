"""Multi-token decoding on the device (alaya_jax.runtime.decode_loop through Engine.generate and
Engine.decode_chunk) against one host-driven decode step at a time (tests/support/engines.py:
stepwise_generate): the same tokens, greedy and sampled, ragged batches, stop ids and token limits
mid-chunk, finished rows frozen, streaming order, calibrated DIPR re-calibration at a chunk cut."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.runtime.engine import Engine, host_key
from alaya_jax.runtime.sampling import SamplingConfig
from models import Llama, tiny
from tests.support.engines import random_tokens, stepwise_generate

CAP = 64  # one capacity for every call: one compilation per (batch, sampling kind)


@pytest.fixture(scope="module")
def small_chunks():
    """The tiny model with chunks of 1, 2, 4, 4, ... tokens (every generation crosses chunk boundaries),
    its weights scaled up 10x so that greedy decoding does not repeat one token (as it does at the
    initial scale) and every comparison below sees varied tokens."""
    cfg = dataclasses.replace(tiny(), max_position_embeddings=1024)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: 10.0 * x, nnx.state(model, nnx.Param)))
    return Engine(model, block_size=8, prefill_chunk=32, max_chunk=4, first_chunk=1)


def test_host_key_is_prngkey():
    for seed in (0, 7, 2**32 - 1, 2**40 + 3, -5):
        np.testing.assert_array_equal(host_key(seed), np.asarray(jax.random.PRNGKey(seed)))


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=11),
                                      SamplingConfig(max_new_tokens=11, temperature=0.8, top_p=0.9, seed=4),
                                      SamplingConfig(max_new_tokens=11, temperature=1.3, seed=5)],
                         ids=["greedy", "nucleus", "temperature"])
def test_chunks_give_the_tokens_of_one_step_at_a_time(small_chunks, sampling):
    prompt = random_tokens(13, 1)
    got, _ = small_chunks.generate([prompt], sampling=sampling, capacity=CAP)
    assert got[0].tokens == stepwise_generate(small_chunks, [prompt], sampling, capacity=CAP)[0]
    assert len(got[0].tokens) == 11 and got[0].decode_chunks == 4  # 10 steps in chunks of 1, 2, 4, 3
    assert len(set(got[0].tokens)) > 3


def test_ragged_batch_stop_id_mid_chunk_and_streaming_order(small_chunks):
    prompts = [random_tokens(5, 3), random_tokens(21, 4), random_tokens(12, 5)]
    s = SamplingConfig(max_new_tokens=12)
    free = stepwise_generate(small_chunks, prompts, s, capacity=CAP)
    stop = free[1][6]  # row 1 stops at its 7th token: inside the chunk of steps 3..6
    want = stepwise_generate(small_chunks, prompts, s, stop_ids=[stop], capacity=CAP)
    assert want[1] == free[1][:6] and len(set(free[1])) > 6
    seen = []
    got, caches = small_chunks.generate(prompts, sampling=s, stop_ids=[stop], capacity=CAP,
                                        on_token=lambda j, t: seen.append((j, t)))
    assert [r.tokens for r in got] == want
    assert [r.stopped for r in got] == [stop in free[j][:12] for j in range(3)]
    for j in range(3):  # each row's tokens stream in order
        assert [t for i, t in seen if i == j] == want[j]
    # A finished row appends nothing more: prompt + the tokens it fed (all emitted but a last
    # one that reached the limit, which is never fed).
    lengths = np.asarray(caches[0].lengths)
    for j, r in enumerate(got):
        assert lengths[j] == len(prompts[j]) + len(r.tokens) - (0 if r.stopped else 1)


def test_token_limits_per_row_mid_chunk(small_chunks):
    """decode_chunk with a different limit per row (what the server's requests have): a row that
    reaches its limit inside the chunk emits nothing more while the others go on."""
    prompt = random_tokens(9, 6)
    caches = small_chunks.new_caches(batch=2, capacity=CAP)
    caches, logits, _ = small_chunks.prefill(caches, [prompt, prompt])
    keys = np.stack([host_key(0), host_key(0)])
    knobs = dict(temperature=np.zeros(2, np.float32), top_p=np.ones(2, np.float32), sampled=False, nucleus=False)
    first, state = small_chunks.first_tokens(logits, keys, max_new=[3, 6], **knobs)
    toks, lengths, state, caches = small_chunks.decode_chunk(caches, state, steps=4, **knobs)
    ref = stepwise_generate(small_chunks, [prompt], SamplingConfig(max_new_tokens=6), capacity=CAP)[0]
    toks = np.asarray(toks)
    assert np.asarray(first).tolist() == [ref[0], ref[0]]
    assert toks[0].tolist() == ref[1:3] + [-1, -1] and toks[1].tolist() == ref[1:5]
    assert np.asarray(lengths).tolist() == [9 + 2, 9 + 4] and np.asarray(state.done).tolist() == [True, False]
    toks, lengths, state, caches = small_chunks.decode_chunk(caches, state, steps=4, **knobs)
    assert np.asarray(toks).tolist() == [[-1] * 4, [ref[5], -1, -1, -1]]  # row 1 reached 6; the chunk ended
    assert np.asarray(lengths).tolist() == [11, 14] and bool(np.asarray(state.done).all())


def test_calibrated_dipr_recalibrates_at_a_chunk_cut(small_chunks):
    toks = random_tokens(40, 7)
    att = AttentionConfig(method="dipr", sink=2, window=4,
                          calibration=CalibrationConfig(dipr_keys=0.6, n_cal=8, recalibrate_growth=1.25))
    s = SamplingConfig(max_new_tokens=16)
    n0 = small_chunks.recalibrations
    got, _ = small_chunks.generate([toks], sampling=s, attention=att, capacity=CAP)
    assert small_chunks.recalibrations == n0 + 1  # at 50 = 1.25 x 40 positions, step 10: inside a chunk of 4
    assert got[0].tokens == stepwise_generate(small_chunks, [toks], s, attention=att, capacity=CAP)[0]
