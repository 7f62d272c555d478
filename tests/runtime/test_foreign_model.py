"""A model that is not ours (``tests/support/gpt2.py``: learned positions, no GQA, heads before
tokens, its own decode loop) through the public store API only: with method ``full`` and with
DIPR at β = ∞ its logits equal those of its own dense attention; its contexts are stored in and
reused from a ContextDB through a ``Session``; a filtered query equals its own attention over the
filtered keys."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alaya_jax
from alaya_jax import AttentionConfig, ContextDB, Session
from checkpoints import fingerprint
from tests.support import gpt2

CFG = gpt2.GPT2Config()
PARAMS = gpt2.init_params(CFG, seed=3)
P = 60  # every prompt has 60 tokens: one compilation of each step serves all tests
N_NEW = 6
FULL = AttentionConfig(method="full", sink=4, window=8)  # sink and window: seen under a filter
DIPR_INF = AttentionConfig(method="dipr", beta=math.inf, sink=4, window=8)
EVERYTHING = jnp.ones((CFG.n_ctx,), bool)
# Filters are always passed as two [start, end) ranges (this one: every position), so that the
# filtered and unfiltered runs share one compilation of each step.
NO_FILTER = jnp.asarray([[0, 10**6], [0, 0]], jnp.int32)


@jax.jit
def _own(params, ids, start, caches, key_mask):
    return gpt2.forward(params, CFG, ids, start, caches, gpt2.own_attention(start, key_mask))


@functools.lru_cache(maxsize=None)
def _alaya(attention):
    @jax.jit
    def step(params, ids, start, stores, positions):
        return gpt2.forward(params, CFG, ids, start, stores, gpt2.alaya_attention(attention, positions))

    return step


def own_step():
    """GPT-2 with its own attention: ``step(ids, start, key_mask=everything)``."""
    state = {"c": gpt2.own_caches(CFG)}

    def step(ids, start, key_mask=EVERYTHING):
        logits, state["c"] = _own(PARAMS, ids, jnp.int32(start), state["c"], key_mask)
        return logits

    return step


def alaya_step(attention):
    """GPT-2 with alaya's functional API: ``step(ids, start, positions=None)``."""
    state = {"c": gpt2.alaya_stores(CFG, capacity=P + 16)}
    fn = _alaya(attention)

    def step(ids, start, positions=NO_FILTER):
        logits, state["c"] = fn(PARAMS, ids, jnp.int32(start), state["c"], positions)
        return logits

    return step


def session_step(session, positions=None):
    def step(ids, start):
        session.feed(np.asarray(ids)[0])
        logits, _ = gpt2.forward(PARAMS, CFG, ids, start, [None] * CFG.n_layer,
                                 gpt2.session_attention(session, positions))
        return logits

    return step


def prompt_ids(seed, n=P):
    return np.random.default_rng(seed).integers(0, CFG.vocab, size=n).tolist()


def assert_same_run(got, want):
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_full_and_dipr_at_infinite_beta_equal_its_own_dense_attention():
    prompt = prompt_ids(0)
    want = gpt2.greedy(own_step(), prompt, N_NEW)
    assert len(set(want[0])) > 1  # the random model does not just repeat one token
    for attention in (FULL, DIPR_INF):
        assert_same_run(gpt2.greedy(alaya_step(attention), prompt, N_NEW), want)


def _db(path):
    fp = fingerprint("gpt2-test", CFG, jax.tree_util.tree_leaves(PARAMS))
    return ContextDB(path, model_fingerprint=fp, tokenizer_fingerprint="gpt2-test-ids", dtype="float32",
                     block_size=16)


def test_session_stores_and_reuses_a_context_through_the_context_db(tmp_path):
    context, question = prompt_ids(1, 48), prompt_ids(2, P - 48)
    kw = dict(num_layers=CFG.n_layer, num_kv_heads=CFG.n_head, head_dim=CFG.head_dim, layout="bhtd",
              attention=DIPR_INF)
    db = _db(tmp_path)
    first, todo = Session.from_db(db, context, capacity=P + N_NEW, **kw)
    assert first.reused_tokens == 0 and todo == context
    session_step(first)(jnp.asarray([context], jnp.int32), 0)
    sid = first.save(name="context")
    assert db.store(first) == sid  # the same tokens: the same snapshot
    # Another process's DB instance finds the stored prefix and the model goes on from it.
    second, todo = Session.from_db(_db(tmp_path), context + question, capacity=P + N_NEW, **kw)
    assert (second.reused_tokens, second.snapshot_id, todo) == (48, sid, question)
    step = session_step(second)
    got = [step(jnp.asarray([todo], jnp.int32), 48)[0, -1]]
    out = []
    for i in range(N_NEW):
        out.append(int(jnp.argmax(got[-1])))
        if i + 1 < N_NEW:
            got.append(step(jnp.asarray([[out[-1]]], jnp.int32), P + i)[0, -1])
    assert_same_run((out, np.stack([np.asarray(x) for x in got])), gpt2.greedy(own_step(), context + question, N_NEW))
    assert second.tokens == context + question + out[:-1]


def test_session_refuses_what_would_break_the_stored_context(tmp_path):
    s = Session.new(num_layers=2, num_kv_heads=CFG.n_head, head_dim=CFG.head_dim, capacity=32, block_size=16,
                    layout="bhtd", db=_db(tmp_path))
    k = jnp.zeros((1, CFG.n_head, 3, CFG.head_dim))
    with pytest.raises(ValueError, match="call feed"):
        s.update(0, k, k)
    s.feed([1, 2, 3])
    s.update(0, k, k)
    with pytest.raises(ValueError, match=r"layers \[1\] hold \[0\] positions"):
        s.save()
    with pytest.raises(ValueError, match="layer must be"):
        s.update(2, k, k)
    with pytest.raises(ValueError, match="capacity"):
        s.feed(range(40))
    with pytest.raises(ValueError, match="batch 1"):
        Session([alaya_jax.new_store(batch=2, num_kv_heads=1, head_dim=16, capacity=8)])


def test_a_filtered_query_equals_its_own_attention_over_the_filtered_keys():
    # A stored context of three "documents" of 20 tokens, then a question that sees only document 2,
    # itself and what is generated after it — and, as configured, the sink and the window.
    context, question = prompt_ids(4), prompt_ids(5, 6)
    ranges = jnp.asarray([[20, 40], [P, 10**6]], jnp.int32)
    pos = jnp.arange(CFG.n_ctx)

    def visible(start, t):  # the filter, the first 4 and the last 8 positions once the rows are in
        return ((pos >= 20) & (pos < 40)) | (pos >= P) | (pos < DIPR_INF.sink) | (pos >= start + t - DIPR_INF.window)

    own = own_step()
    own(jnp.asarray([context], jnp.int32), 0)
    want = gpt2.greedy(lambda ids, start: own(ids, start, visible(start, ids.shape[1])), question, N_NEW, start=P)
    for attention in (FULL, DIPR_INF):
        alaya = alaya_step(attention)
        alaya(jnp.asarray([context], jnp.int32), 0)
        assert_same_run(gpt2.greedy(lambda ids, start: alaya(ids, start, ranges), question, N_NEW, start=P), want)
    own = own_step()
    own(jnp.asarray([context], jnp.int32), 0)
    unfiltered = gpt2.greedy(own, question, N_NEW, start=P)
    assert np.abs(unfiltered[1] - want[1]).max() > 0.1  # the filter changes what the model sees
