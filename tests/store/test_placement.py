"""KV placement (alaya_jax.store.placement): values / keys in pinned host memory give the same stores,
DIPR outputs, generated tokens, context-DB sessions and chunked prefills as everything on the device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention.config import AttentionConfig, KernelConfig
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.store import kv_store
from alaya_jax.store.context_db import ContextDB
from alaya_jax.store.placement import HOST_MEMORY_KIND, PLACEMENTS
from tests.support.dipr_cases import store_case
from tests.support.engines import random_tokens
from tests.support.stores import assert_bitwise_equal

ON_HOST = [p for p in PLACEMENTS if p != "device"]


def kind(x):
    """The memory kind of array ``x``; its sharding and its aval (what jit traces) must agree."""
    on_host = jax.typeof(x).memory_space == jax.memory.Space.Host
    assert on_host == (x.sharding.memory_kind == HOST_MEMORY_KIND), (x.sharding, jax.typeof(x))
    return x.sharding.memory_kind


def kinds(store):
    return kind(store.keys), kind(store.values), kind(store.codes)


def test_place_moves_only_the_exact_fields_and_reads_are_refused_where_jnp_would_gather():
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 8)), jnp.float32) for _ in range(2))
    base = kv_store.from_dense(k, v, block_size=16)
    vh = kv_store.place(base, "values-on-host")
    assert kinds(vh) == ("device", HOST_MEMORY_KIND, "device") and vh.host_fields == ("values",)
    kvh = kv_store.place(vh, "keys-and-values-on-host")
    assert kinds(kvh) == (HOST_MEMORY_KIND, HOST_MEMORY_KIND, "device")
    assert kvh.dense_values().sharding.memory_kind == "device"  # the explicit whole-array transfer
    assert kvh.dense_values_in_place().sharding.memory_kind == HOST_MEMORY_KIND
    assert_bitwise_equal(kv_store.place(kvh, "device"), base)
    # The host arrays are real host arrays: a jitted jnp gather from one is refused, as on a GPU.
    with pytest.raises(ValueError, match="memory_space"):
        jax.jit(lambda s: jnp.take(s.values, jnp.array([0, 3]), axis=3))(kvh)
    with pytest.raises(ConfigError, match="unknown KV placement"):
        kv_store.place(base, "values-on-disk")
    with pytest.raises(ConfigError, match="unknown KV placement"):
        KernelConfig(kv_placement="host")


@pytest.mark.parametrize("placement", ON_HOST)
def test_append_and_shape_ops_match_the_device_store_bit_for_bit(placement):
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.standard_normal((2, 100, 2, 8)), jnp.float32) for _ in range(2))
    base = kv_store.from_dense(k, v, jnp.array([37, 60]), block_size=16, capacity=120)
    one = [jnp.asarray(rng.standard_normal((2, 1, 2, 8)), jnp.float32) for _ in range(2)]
    many = [jnp.asarray(rng.standard_normal((2, 40, 2, 8)), jnp.float32) for _ in range(2)]
    app = jax.jit(kv_store.append)

    def steps(s):
        s = app(s, *one, jnp.array([1, 0]))  # a ragged decode step
        s = app(s, *many, jnp.array([40, 33]))  # a ragged prefill chunk straddling blocks
        return app(s, *many, jnp.array([40, 40]))  # sequence 1 runs past the capacity: rows dropped

    want, got = steps(base), steps(kv_store.place(base, placement))
    assert got.placement == placement and kinds(got)[1] == HOST_MEMORY_KIND
    assert [int(x) for x in got.lengths] == [118, 133]  # capacity 128
    assert_bitwise_equal(kv_store.place(got, "device"), want)
    for op in (lambda s: kv_store.fit_blocks(s, 12), lambda s: kv_store.take_rows(s, jnp.array([1, 1, 0])),
               lambda s: kv_store.place_row(s, 0, kv_store.take_rows(s, jnp.array([1])))):
        a, b = op(want), jax.jit(op)(got)
        assert b.placement == placement and kinds(b)[1] == HOST_MEMORY_KIND
        assert_bitwise_equal(kv_store.place(b, "device"), a)


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_dipr_is_identical_in_every_placement(implementation):
    """GQA 3, ragged lengths, NaN past the lengths: the scan, the refine and the found mask give the
    same bits with the host fields (device copies here: only GPU Pallas reads them in place)."""
    q, _, _, _, store = store_case([97, 140], 6, 2, 16, 16, seed=3)
    q = jnp.asarray(q)
    beta = jnp.float32(2.5)
    outs = {}
    for placement in PLACEMENTS:
        f = jax.jit(lambda q, s: dipr_store_attention(q, s, beta=beta, implementation=implementation,
                                                      with_mask=True))
        out, stats, mask = f(q, kv_store.place(store, placement))
        outs[placement] = [np.asarray(x) for x in (out, mask, stats.candidates, stats.max_score)]
    assert outs["device"][1].any() and np.isfinite(outs["device"][0]).all()
    for placement in ON_HOST:
        for a, b in zip(outs["device"], outs[placement]):
            np.testing.assert_array_equal(a, b)


def _attention(placement, method="dipr"):
    return AttentionConfig(method=method, beta=4.0, kernel=KernelConfig(implementation="reference",
                                                                        kv_placement=placement))


def test_generation_is_token_for_token_identical_and_chunked_prefill_writes_the_host(engine):
    """A 75-token prompt prefilled in chunks of 32 into values / keys and values on the host: the
    host stores hold what the device prefill built, and the sampled tokens are the same."""
    prompt = [random_tokens(75, 11)]
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3)
    ref, ref_caches = engine.generate(prompt, sampling=s, attention=_attention("device"), capacity=88)
    assert len(set(ref[0].tokens)) > 2
    for placement in ON_HOST:
        got, caches = engine.generate(prompt, sampling=s, attention=_attention(placement), capacity=88)
        assert got[0].tokens == ref[0].tokens, placement
        assert caches[0].placement == placement and kinds(caches[-1])[1] == HOST_MEMORY_KIND
        for a, b in zip(ref_caches, caches):
            assert_bitwise_equal(kv_store.place(b, "device"), a)


@pytest.mark.parametrize("placement", ON_HOST)
def test_lazy_restore_from_the_pinned_host_tier(tmp_path, monkeypatch, engine, placement):
    """A session served from the pinned-host tier moves the device fields only: its host fields are
    host arrays of its own; generation from it equals generation after a full prefill."""
    context, question = random_tokens(70, 21), random_tokens(6, 22)
    prompt = context + question
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=4)
    att = _attention(placement)
    ref, _ = engine.generate([prompt], sampling=s, attention=att, capacity=96)
    db = ContextDB(tmp_path / "db", model_fingerprint="tiny", tokenizer_fingerprint="ids", dtype=engine.dtype,
                   block_size=engine.block_size, memory_budget_bytes=1 << 30, memory_kind=HOST_MEMORY_KIND,
                   kv_placement=placement)
    caches, _, _ = engine.prefill(engine.new_caches(batch=1, capacity=70), [context])
    db.import_(context, caches)
    monkeypatch.setattr(ContextDB, "_load", lambda *a, **k: pytest.fail("read the disk"))
    resident = db.memory_tier.peek(db.snapshot_id(context)).caches
    for _ in range(2):  # the second serve checks that the first session left the resident copy intact
        session, todo = db.create_session(prompt, capacity=96)
        assert session.source == f"memory:{HOST_MEMORY_KIND}" and session.reused_tokens == 64
        c = session.caches[0]
        assert c.placement == placement and kinds(c)[1:] == (HOST_MEMORY_KIND, "device")
        assert kinds(c)[0] == (HOST_MEMORY_KIND if "keys" in c.host_fields else "device")
        assert c.values.unsafe_buffer_pointer() != resident[0].values.unsafe_buffer_pointer()
        got, _ = engine.generate([todo], sampling=s, attention=att, caches=session.caches, capacity=96)
        assert got[0].tokens == ref[0].tokens


def test_memory_estimate_splits_device_and_host_bytes():
    from alaya_jax.runtime.memory_estimate import estimate_memory
    from models import llama3_8b

    cfg = llama3_8b(dtype="bfloat16")
    est = {p: estimate_memory(cfg, context=1 << 20, placement=p) for p in PLACEMENTS}
    kv = 2 * 32 * 8 * 128 * 2 * (1 << 20)  # bf16 K + V of 32 layers, 8 KV heads, D 128, 1M tokens
    assert est["device"].kv_host_bytes == 0 and est["device"].kv_bytes == est["device"].kv_device_bytes
    assert {p: e.kv_bytes for p, e in est.items()} == {p: est["device"].kv_bytes for p in PLACEMENTS}
    assert est["values-on-host"].kv_host_bytes == kv // 2
    assert est["keys-and-values-on-host"].kv_host_bytes == kv
    # on the device: keys 256 B, code 68 B and the block means 128·2/64 B a token (of K + V's 512)
    assert est["values-on-host"].kv_device_bytes / kv == pytest.approx((256 + 68 + 4) / 512, rel=1e-4)
    assert "host" in est["values-on-host"].describe()
    assert dataclasses.replace(est["device"]).total_bytes == est["device"].weights_bytes + est["device"].kv_bytes


def test_gather_positions_is_the_store_of_the_gathered_keys():
    """What bench/beyond_gpu.py tiles contexts with: the codes move with their keys."""
    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.standard_normal((1, 48, 2, 8)), jnp.float32) for _ in range(2))
    idx = jnp.asarray(np.concatenate([np.arange(4), 4 + np.arange(56) % 40, np.arange(44, 48)]), jnp.int32)
    got = kv_store.gather_positions(kv_store.from_dense(k, v, block_size=16), idx)
    assert_bitwise_equal(got, kv_store.from_dense(k[:, idx], v[:, idx], block_size=16))
    with pytest.raises(ValueError, match="multiple of the block size"):
        kv_store.gather_positions(got, idx[:50])
