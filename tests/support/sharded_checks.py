"""Checks of the sequence-sharded store and attention, run in a process of its own with emulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set before jax is imported), by
``tests/attention/test_sharded.py``: ``python -m tests.support.sharded_checks NAME...``.

Each check raises AssertionError on a mismatch and prints one line when it passes.
"""

from __future__ import annotations

import os
import sys

DEVICES = 4
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alaya_jax.attention import dense  # noqa: E402
from alaya_jax.attention.dipr import brute_force  # noqa: E402
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention  # noqa: E402
from alaya_jax.store import kv_store, sharding  # noqa: E402
from tests.support.dipr_cases import store_case  # noqa: E402

BK = 16
SINK, WINDOW = 2, 8


def _sharded(st, n):
    mesh = sharding.seq_mesh(n)
    return sharding.shard_store(st, mesh), mesh


def check_devices():
    assert len(jax.devices()) == DEVICES, jax.devices()
    try:
        sharding.seq_mesh(DEVICES + 1)
    except ValueError as e:
        assert f"{DEVICES + 1} devices were asked for" in str(e), e
    else:
        raise AssertionError("a mesh larger than the devices was accepted")
    from alaya_jax.cli import main  # --devices past the devices: a usage error (status 2), before any model loads
    assert main(["--cache-dir", "off", "generate", "--prompt", "hi", "--devices", str(DEVICES + 1)]) == 2
    assert main(["--cache-dir", "off", "generate", "--prompt", "hi", "--devices", "2", "--attention", "dipr",
                 "--implementation", "pallas", "--tail", "estimate"]) == 2  # the kernels' tail, sharded


def check_layout():
    """Blocks split in equal contiguous ranges; codes, keys and values of a block on one device."""
    st = kv_store.empty(batch=2, num_kv_heads=2, head_dim=16, capacity=8 * BK, block_size=BK)
    sh, mesh = _sharded(st, 4)
    for f in ("keys", "values", "codes", "code_scale", "code_err"):
        shards = getattr(sh, f).addressable_shards
        assert len(shards) == 4
        for s in shards:
            i = list(mesh.devices.flat).index(s.device)
            assert s.index[2] == slice(2 * i, 2 * i + 2), (f, s.index)
    assert sh.lengths.sharding.is_fully_replicated
    try:
        sharding.shard_store(kv_store.empty(batch=1, num_kv_heads=2, head_dim=16, capacity=6 * BK, block_size=BK),
                             mesh)
    except ValueError as e:
        assert "equal shards" in str(e)
    else:
        raise AssertionError("6 blocks were split over 4 devices")
    assert sharding.sharded_capacity(100, block_size=BK, devices=4) == 128


def check_append():
    """Appends (a prefill chunk straddling shards, then single steps) land where the unsharded ones do."""
    rng = np.random.default_rng(1)
    b, hkv, d, cap = 3, 2, 16, 8 * BK
    st = kv_store.empty(batch=b, num_kv_heads=hkv, head_dim=d, capacity=cap, block_size=BK)
    sh, mesh = _sharded(st, 4)
    app = jax.jit(lambda s, k, v, n: sharding.append(s, k, v, n, mesh=mesh))
    plain = jax.jit(kv_store.append)
    for t, num in ((40, [40, 3, 0]), (1, [1, 1, 1]), (40, [37, 30, 5]), (1, [1, 0, 1])):
        k = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
        st = plain(st, k, v, jnp.asarray(num))
        sh = app(sh, k, v, jnp.asarray(num))
    for f in ("keys", "values", "codes", "code_scale", "code_err", "value_means", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(sh, f)), np.asarray(getattr(st, f)), err_msg=f)
    assert sh.value_means.sharding.spec == sharding.store_specs(sh).value_means, sh.value_means.sharding
    assert sh.keys.sharding.spec == sharding.store_specs(sh).keys, sh.keys.sharding
    try:
        sharding.append(sh, k[:, :1].repeat(cap, 1), v[:, :1].repeat(cap, 1), mesh=mesh)
    except ValueError as e:
        assert "capacity" in str(e)
    else:
        raise AssertionError("an append past the capacity was accepted")


def _dipr_cases():
    # capacity 8 blocks of 16 = 128 positions; 4 shards of 32: lengths leave shards of unequal fill: a full
    # store, sequences within shard 0 only (shards 1-3 empty), one ending on a shard boundary, windows
    # straddling two shards; GQA 3 (6 query heads over 2 KV heads).
    return [((128, 37, 64, 69, 5, 20, 100, 33), 6, 2)]


_JITTED = {}


def _jitted(mesh, implementation):
    """One compiled sharded DIPR per (mesh size, backend, store shape): β is traced."""
    key = (len(mesh.devices.flat), implementation)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda q_, s_, b_: dipr_store_attention(
            q_, s_, beta=b_, sink=SINK, window=WINDOW, with_mask=True, implementation=implementation, mesh=mesh))
    return _JITTED[key]


def check_dipr(implementation="reference", cases=None, devices=(1, 2, 4), betas=(0.0, 3.0, np.inf),
               with_filter=True):
    """Sharded DIPR == unsharded (outputs to tolerance, masks identical) and zero false negatives against
    brute force; on 1, 2 and 4 devices; ragged lengths, unequal shards, GQA, NaN padding, a filter."""
    unsharded = jax.jit(lambda q_, s_, b_: dipr_store_attention(q_, s_, beta=b_, sink=SINK, window=WINDOW,
                                                                with_mask=True, implementation=implementation))
    for lengths, hq, hkv in cases or _dipr_cases():
        q, k, v, ln, st = store_case(lengths, hq, hkv, 16, BK, seed=sum(lengths))
        st = kv_store.resize(st, 8 * BK)
        qj = jnp.asarray(q)
        for beta in betas:
            ref_out, ref_st, ref_mask = unsharded(qj, st, jnp.float32(beta))
            truth = np.asarray(brute_force.dipr_mask(qj, jnp.asarray(np.nan_to_num(k)), beta=beta,
                                                     lengths=jnp.asarray(ln)))
            rm = np.asarray(ref_mask)[:, :, :truth.shape[-1]]
            assert not (truth & ~rm).any(), "unsharded false negative"
            for n in devices:
                sh, mesh = _sharded(st, n)
                out, stt, mask = _jitted(mesh, implementation)(qj, sh, jnp.float32(beta))
                np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5,
                                           err_msg=f"{lengths} beta={beta} n={n}")
                np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask), err_msg=f"{lengths} n={n}")
                np.testing.assert_array_equal(np.asarray(stt.keys_in_range), np.asarray(ref_st.keys_in_range))
                np.testing.assert_allclose(np.asarray(stt.max_score), np.asarray(ref_st.max_score), rtol=1e-6)
                assert not np.isnan(np.asarray(out)).any()
    if not with_filter:
        return
    # a filter: the sharded key mask is cut like the store
    lengths, hq, hkv = _dipr_cases()[0]
    q, k, v, ln, st = store_case(lengths, hq, hkv, 16, BK, seed=3)
    st = kv_store.resize(st, 8 * BK)
    key_mask = jnp.asarray(np.random.default_rng(0).random((len(lengths), 8 * BK)) < 0.5)
    sh, mesh = _sharded(st, 4)
    ref_out, out = (jax.jit(lambda q_, s_, m_, mesh=m: dipr_store_attention(
        q_, s_, beta=2.0, sink=SINK, window=WINDOW, key_mask=m_, implementation=implementation, mesh=mesh)[0])(
            jnp.asarray(q), x, key_mask) for x, m in ((st, None), (sh, mesh)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5)


def check_tail_refused():
    """The kernels' estimated tail on a sharded store: refused loudly (docs/design.md §10)."""
    q, k, v, ln, st = store_case((40, 20), 4, 2, 16, BK, seed=1)
    sh, mesh = _sharded(kv_store.resize(st, 4 * BK), 2)
    try:
        dipr_store_attention(jnp.asarray(q), sh, beta=1.0, sink=SINK, window=WINDOW, implementation="pallas",
                             mesh=mesh, tail="estimate")
    except ValueError as e:
        assert "the estimated tail is not supported on a sharded store yet" in str(e), e
    else:
        raise AssertionError("the kernels' tail ran on a sharded store")


def check_dipr_pallas():
    """The Pallas kernels (interpret mode) on the case with every kind of shard, 4 devices."""
    check_dipr("pallas", cases=_dipr_cases()[:1], devices=(4,), betas=(3.0,), with_filter=False)


def check_dense():
    """Sharded dense attention (prefill chunk straddling shards, and a decode row) == unsharded."""
    from alaya_jax.attention.dense_sharded import sharded_attention
    lengths = (128, 37, 64, 69)
    rng = np.random.default_rng(5)
    q, k, v, ln, st = store_case(lengths, 4, 2, 16, BK, seed=11)
    st = kv_store.resize(st, 8 * BK)
    t = 24
    qc = jnp.asarray(rng.normal(size=(len(lengths), t, 4, 16)), jnp.float32)
    pos = jnp.asarray(np.maximum(ln - t, 0))[:, None] + jnp.arange(t)[None, :]
    ref = dense.causal_attention(qc, st, pos)
    sh, mesh = _sharded(st, 4)
    out = jax.jit(lambda a, s_, p_: sharded_attention(a, s_, p_, implementation="reference", mesh=mesh))(qc, sh, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    try:
        sharded_attention(qc, sh, pos, implementation="xla", mesh=mesh)
    except Exception as e:  # BackendUnavailableError
        assert "does not run on a sharded store" in str(e), e
    else:
        raise AssertionError("xla was accepted on a sharded store")


_ENGINES = {}


def _model():
    """The tiny random-weight Llama (512 positions), made once."""
    if "model" not in _ENGINES:
        import dataclasses

        from flax import nnx

        from models import Llama, tiny

        _ENGINES["model"] = Llama(dataclasses.replace(tiny(), max_position_embeddings=512), rngs=nnx.Rngs(0))
    return _ENGINES["model"]


def _engine(devices: int):
    """:func:`_model` in an engine over ``devices`` devices (blocks of 8), made once."""
    if devices not in _ENGINES:
        from alaya_jax.runtime.engine import Engine

        _ENGINES[devices] = Engine(_model(), block_size=8, prefill_chunk=128, devices=devices)
    return _ENGINES[devices]


def check_generate():
    """An engine over 2 devices (dense prefill and DIPR decode, both sharded) generates token for token what
    the 1-device engine does, and an engine over more devices than there are is refused."""
    from alaya_jax.attention.config import AttentionConfig
    from alaya_jax.runtime.engine import Engine
    from alaya_jax.runtime.sampling import SamplingConfig

    prompts = [np.random.default_rng(i).integers(0, 97, size=n).tolist() for i, n in enumerate((70, 23))]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    for attention in (AttentionConfig(method="dipr", beta=2.0, sink=2, window=8),):
        runs = []
        for n in (1, 2):
            res, caches = _engine(n).generate(prompts, sampling=sampling, attention=attention)
            runs.append([r.tokens for r in res])
            if n == 2:
                assert caches[0].keys.sharding.spec == sharding.store_specs(caches[0]).keys, caches[0].keys.sharding
        assert runs[0] == runs[1], (attention.method, runs)
    try:
        Engine(_model(), devices=DEVICES + 1)
    except ValueError as e:
        assert "devices were asked for" in str(e)
    else:
        raise AssertionError("an engine over too many devices was accepted")


def check_scheduler():
    """The server's scheduler (continuous batching: joins re-lay the batch out to other capacities) over an
    engine of 2 devices emits what it emits over 1 device."""
    import queue

    from alaya_jax.attention.config import AttentionConfig
    from alaya_jax.runtime.sampling import SamplingConfig
    from alaya_jax.server.scheduler import BatchLimits, GenerationJob, Scheduler
    from tests.support.fake_engine import FakeTokenizer

    att = AttentionConfig(method="dipr", beta=2.0, sink=2, window=8)
    texts = []
    for n in (1, 2):
        s = Scheduler(_engine(n), FakeTokenizer(),
                      limits=BatchLimits(max_batch=4, max_context=512, min_capacity=16))
        s.start()
        jobs = []
        for i, (plen, new) in enumerate(((9, 10), (60, 5))):
            q = queue.Queue()
            jobs.append(q)
            s.submit(GenerationJob(ids=np.random.default_rng(i).integers(0, 26, size=plen).tolist(),
                                   sampling=SamplingConfig(max_new_tokens=new, temperature=0.0), attention=att,
                                   emit=q.put, stop=()))
        out = []
        for q in jobs:
            text = ""
            while (ev := q.get(timeout=300)).kind == "token":
                text += ev.text
            assert ev.kind == "done", ev
            out.append(text)
        s.stop(timeout=30)
        assert s.error is None, s.error
        texts.append(out)
    assert texts[0] == texts[1] and all(texts[0]), texts


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}

if __name__ == "__main__":
    import time
    for name in sys.argv[1:] or list(CHECKS):
        t0 = time.perf_counter()
        CHECKS[name]()
        print(f"ok {name} {time.perf_counter() - t0:.1f}s", flush=True)
