"""alaya_jax.store.context_db: prefix reuse, catalogue, refusals, crash safety, concurrent readers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints as ck
from alaya_jax.store import kv_store
from alaya_jax.store.context_db import ContextDB, Session

from tests.support import crash_helper as helper
from tests.support.stores import ARRAY_NAMES as ALL_FIELDS
from tests.support.stores import bits

BK = 16
KW = dict(model_fingerprint="model-A", tokenizer_fingerprint="tok-A", dtype="bfloat16", block_size=BK)
HELPER = helper.__file__


def dense_kv(n, *, layers=2, hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (jnp.asarray(rng.standard_normal((1, n, hkv, d), np.float32), jnp.bfloat16),
         jnp.asarray(rng.standard_normal((1, n, hkv, d), np.float32), jnp.bfloat16))
        for _ in range(layers)
    ]


def stores(kv, n, capacity=None):
    return tuple(kv_store.from_dense(k[:, :n], v[:, :n], block_size=BK, capacity=capacity) for k, v in kv)




@pytest.fixture
def db(tmp_path):
    return ContextDB(tmp_path / "db", **KW)


def test_prefix_reuse_block_aligned_then_append_is_exact(db):
    kv = dense_kv(150)
    tokens = list(range(500, 650))
    sid = db.import_(tokens[:100], stores(kv, 100), name="first100")
    session, rest = db.create_session(tokens, capacity=200)
    assert isinstance(session, Session)
    assert (session.snapshot_id, session.reused_tokens) == (sid, 96)  # 100 floored to blocks of 16
    assert session.tokens == tokens[:96] and rest == tokens[96:]
    c = session.caches[0]
    assert c.capacity == 208 and int(c.lengths[0]) == 96
    # Prefilling the rest by append gives the store a full prefill would have built.
    for (k, v), c in zip(kv, session.caches):
        got = kv_store.append(c, k[:, 96:], v[:, 96:])
        want = kv_store.from_dense(k, v, block_size=BK, capacity=208)
        assert np.array_equal(bits(got.lengths), bits(want.lengths))
        for x, y in zip(got.dense_codes(), want.dense_codes()):
            assert np.array_equal(bits(x[:, :, :150]), bits(y[:, :, :150]))
        assert np.array_equal(bits(got.dense_keys()[:, :, :150]), bits(want.dense_keys()[:, :, :150]))
        assert np.array_equal(bits(got.dense_values()[:, :, :150]), bits(want.dense_values()[:, :, :150]))


def test_diverging_token_limits_reuse(db):
    kv = dense_kv(64)
    tokens = list(range(64))
    sid = db.import_(tokens, stores(kv, 64))
    other = tokens[:20] + [9999] + tokens[21:] + [7]  # differs in block 2 (positions 16..31)
    session, rest = db.create_session(other, capacity=128)
    assert (session.snapshot_id, session.reused_tokens) == (sid, 16)
    assert rest == other[16:]
    # The whole stored prompt is never reused in full: one token stays to prefill.
    session, rest = db.create_session(tokens, capacity=64)
    assert session.reused_tokens == 48 and rest == tokens[48:]
    session, rest = db.create_session(tokens + [1], capacity=80)
    assert session.reused_tokens == 64 and rest == [1]
    for a, b in zip(stores(kv, 64, capacity=80), session.caches):
        for f in ALL_FIELDS:
            assert np.array_equal(bits(getattr(a, f)), bits(getattr(b, f))), f
    # Nothing in common, or shorter than a block: nothing reused.
    for prompt in ([5] + tokens, tokens[:10]):
        session, rest = db.create_session(prompt, capacity=128)
        assert session.caches is None and session.reused_tokens == 0 and session.snapshot_id is None
        assert rest == prompt


def test_longest_of_several_snapshots_wins(db):
    kv = dense_kv(96)
    t = list(range(96))
    s32 = db.import_(t[:32], stores(kv, 32))
    s80 = db.import_(t[:80], stores(kv, 80))
    assert db.create_session(t, capacity=96)[0].snapshot_id == s80
    assert db.create_session(t[:40], capacity=96)[0].snapshot_id == s32  # both match 32: the smaller is read
    assert db.longest_prefix(t) == (s80, 80)


def test_store_dedup_list_show_delete_and_restart(tmp_path, db):
    kv = dense_kv(40)
    t = list(range(40))
    sid = db.import_(t, stores(kv, 40), name="ctx")
    assert db.import_(t, stores(kv, 40), name="again") == sid  # already stored
    assert sid == db.snapshot_id(t) and len(sid) == 16
    session = Session(tokens=t[:32], caches=stores(kv, 32))
    sid32 = db.store(session, name="short")
    assert session.snapshot_id == sid32 != sid
    with pytest.raises(ck.SnapshotError, match="no context"):
        db.store(Session(tokens=[], caches=None))
    assert [m.snapshot_id for m in db.list()] in ([sid, sid32], [sid32, sid])
    # A new process (here: a new instance) sees the same catalogue.
    db2 = ContextDB(tmp_path / "db", **KW)
    metas = {m.snapshot_id: m for m in db2.list()}
    assert set(metas) == {sid, sid32} and metas[sid].name == "ctx" and metas[sid].num_tokens == 40
    assert db2.show("ctx") == metas[sid] and db2.show(sid[:6]).snapshot_id == sid
    assert db2.show(sid, verify=True).snapshot_id == sid
    caches, toks, meta = db2.load(sid, capacity=64)
    assert toks == t and caches[0].capacity == 64
    assert db2.delete("short") == sid32
    assert [m.snapshot_id for m in db.list()] == [sid]
    with pytest.raises(ck.SnapshotNotFoundError):
        db.show(sid32)
    with pytest.raises(ck.SnapshotNotFoundError):
        db.delete("nope")
    assert sorted(os.listdir(tmp_path / "db" / "snapshots")) == [sid]
    assert db.problems() == {}


def test_import_refuses_other_dtype_or_block_size(db):
    kv = dense_kv(32)
    f32 = tuple(kv_store.from_dense(k.astype(jnp.float32), v.astype(jnp.float32), block_size=BK) for k, v in kv)
    with pytest.raises(ck.SnapshotError, match="dtype float32, this DB holds bfloat16"):
        db.import_(list(range(32)), f32)
    bk8 = tuple(kv_store.from_dense(k, v, block_size=8) for k, v in kv)
    with pytest.raises(ck.SnapshotError, match="block size 8"):
        db.import_(list(range(32)), bk8)


def _flip_largest_state_file(path):
    meta = ck.read_meta(path)
    rel = max((r for r in meta.checksums if r.startswith("state/")),
              key=lambda r: os.path.getsize(os.path.join(path, r)))
    fp = os.path.join(path, rel)
    with open(fp, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)
    return rel


def test_corrupt_snapshot_refused_db_stays_usable(tmp_path, db):
    kv = dense_kv(80)
    t = list(range(80))
    good = db.import_(t[:32], stores(kv, 32))
    bad = db.import_(t[:64], stores(kv, 64))
    rel = _flip_largest_state_file(tmp_path / "db" / "snapshots" / bad)
    with pytest.raises(ck.CorruptSnapshotError, match=f"checksum mismatch in {rel}"):
        db.create_session(t, capacity=96, strict=True)
    # Non-strict: the corrupt one is skipped (and named), the next best match is used.
    db2 = ContextDB(tmp_path / "db", **KW)
    session, rest = db2.create_session(t, capacity=96)
    assert session.snapshot_id == good and session.reused_tokens == 32 and rest == t[32:]
    assert [s for s, _ in session.skipped] == [bad] and rel in session.skipped[0][1]
    assert [m.snapshot_id for m in db2.list()] == [good]
    assert bad in db2.problems() and "checksum mismatch" in db2.problems()[bad]
    assert {m.snapshot_id for m in db2.list(include_incompatible=True)} == {good, bad}
    with pytest.raises(ck.CorruptSnapshotError):
        db2.load(bad)
    # Re-importing the same context replaces the broken copy.
    assert db2.import_(t[:64], stores(kv, 64)) == bad
    assert db2.create_session(t, capacity=96)[0].reused_tokens == 64
    assert db2.problems() == {}


def test_foreign_and_broken_snapshots_listed_as_problems(tmp_path, db):
    kv = dense_kv(32)
    t = list(range(32))
    mine = db.import_(t, stores(kv, 32))
    other_model = ContextDB(tmp_path / "db", **{**KW, "model_fingerprint": "model-B"})
    theirs = other_model.import_(t, stores(kv, 32))
    assert theirs != mine
    other_tok = ContextDB(tmp_path / "db", **{**KW, "tokenizer_fingerprint": "tok-B"})
    assert [m.snapshot_id for m in other_tok.list()] == []
    assert "was made with tokenizer tok-A, this tokenizer is tok-B" in other_tok.problems()[mine]
    assert other_tok.create_session(t + [1], capacity=64)[0].reused_tokens == 0
    snaps = tmp_path / "db" / "snapshots"
    os.makedirs(snaps / "0000deadbeef0000")  # no meta.json
    newer = ContextDB(tmp_path / "db", **KW).import_(t[:16], stores(kv, 16))
    meta = json.loads((snaps / newer / "meta.json").read_text())
    meta["format_version"] = 99
    (snaps / newer / "meta.json").write_text(json.dumps(meta))
    probs = db.problems()
    assert "was made with model model-B, this model is model-A" in probs[theirs]
    assert "has no meta.json" in probs["0000deadbeef0000"]
    assert "format version 99" in probs[newer]
    assert [m.snapshot_id for m in db.list()] == [mine]
    with pytest.raises(ck.IncompatibleSnapshotError, match="model model-B"):
        db.load(theirs)
    with pytest.raises(ck.IncompatibleSnapshotError, match="format version 99"):
        db.show(newer)
    assert db.create_session(t + [1], capacity=64)[0].snapshot_id == mine


def _spawn(*args):
    return subprocess.Popen([sys.executable, HELPER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


STAGES = ["after_arrays", "after_tokens", "before_meta", "before_rename", "after_rename"]


def test_killed_saves_leave_no_half_snapshot(tmp_path):
    path = tmp_path / "db"
    n = 1024
    db = ContextDB(path, **helper.DB_KW)
    tokens0, caches0 = helper.make_context(0, n)
    sid0 = db.import_(tokens0, caches0, name="earlier")
    # Kills at named steps of the save (deterministic) and after delays (anywhere,
    # most likely inside the Orbax write), all against the same DB at once.
    procs = {stage: _spawn("save", path, 10 + i, n, stage) for i, stage in enumerate(STAGES)}
    delayed = {}
    for i, delay in enumerate([0.0, 0.05, 0.15, 0.3]):
        delayed[delay] = _spawn("save", path, 100 + i, n, "none")
    t_ready = {}
    for delay, p in delayed.items():
        assert p.stdout.readline().strip() == "SAVING", p.stderr.read()
        t_ready[delay] = time.monotonic()
    for delay, p in sorted(delayed.items()):
        time.sleep(max(0.0, t_ready[delay] + delay - time.monotonic()))
        p.send_signal(signal.SIGKILL)
    for stage, p in procs.items():
        p.wait(timeout=120)
        assert p.returncode == -signal.SIGKILL, (stage, p.returncode, p.stderr.read()[-2000:])
    for p in delayed.values():
        p.wait(timeout=120)

    db = ContextDB(path, **helper.DB_KW)
    visible = {m.snapshot_id: m for m in db.list()}
    assert db.problems() == {}, db.problems()
    # Opening the DB removed every killed save's temporary directory (their writers are gone).
    assert sorted(os.listdir(path / "snapshots")) == sorted(visible)
    assert len(db.cleaned) >= 4 and all(x.state == "orphaned" for x in db.cleaned), db.cleaned
    assert sum(x.bytes for x in db.cleaned) > 0
    # Killed before the rename: invisible. Killed after: whole.
    for i, stage in enumerate(STAGES):
        sid = db.snapshot_id(_tokens(10 + i, n))
        assert (sid in visible) == (stage == "after_rename"), stage
    # Every visible snapshot (whatever the timing of the delayed kills) loads and verifies.
    assert sid0 in visible
    for sid in visible:
        db.show(sid, verify=True)
        caches, toks, _ = db.load(sid)
        assert len(caches) == helper.LAYERS and len(toks) == n
    session, rest = db.create_session(tokens0 + [3], capacity=n + 16, strict=True)
    assert session.snapshot_id == sid0 and rest == [3]
    for a, b in zip(caches0, session.caches):
        assert np.array_equal(bits(a.keys), bits(b.keys[:, :, : a.num_blocks]))


def test_a_save_in_progress_is_never_removed_only_a_dead_writers(tmp_path):
    from checkpoints.storage import TempDir

    path = tmp_path / "db"
    ContextDB(path, **KW)
    snaps = str(path / "snapshots")
    live = TempDir(snaps, "live")  # a save in progress (this process holds its lock)
    with open(os.path.join(live.path, "part"), "wb") as f:
        f.write(b"x" * 1000)
    dead = os.path.join(snaps, ".tmp-dead-0")  # its writer is gone: the lock file is there, unlocked
    os.mkdir(dead)
    with open(os.path.join(dead, "part"), "wb") as f:
        f.write(b"y" * 3000)
    open(dead + ".lock", "w").close()
    old = os.path.join(snaps, ".tmp-older-version")  # no lock file (an older alaya-jax): by age only
    os.mkdir(old)
    db = ContextDB(path, **KW)
    assert [(x.name, x.bytes, x.state) for x in db.cleaned] == [(".tmp-dead-0", 3000, "orphaned")]
    assert sorted((x.name, x.state) for x in db.leftovers()) == sorted(
        [(os.path.basename(live.path), "in_progress"), (".tmp-older-version", "unmarked")])
    assert os.path.isdir(live.path) and not os.path.exists(dead) and not os.path.exists(dead + ".lock")
    db.cleanup(older_than_s=0)  # unmarked ones go by age; the live one stays
    assert os.path.isdir(live.path) and not os.path.exists(old)
    live.release()
    assert sorted(os.listdir(snaps)) == []


def test_a_concurrent_save_of_the_same_context_is_already_stored_and_keeps_both_names(tmp_path, monkeypatch):
    import checkpoints.snapshot as snap

    kv = dense_kv(48)
    t = list(range(48))
    a, b = ContextDB(tmp_path / "db", **KW), ContextDB(tmp_path / "db", **KW)  # two writers (processes)
    results = {}

    def at(stage):  # a's save, just before its rename, is overtaken by b's whole save
        if stage == "before_rename" and not results:
            results["b"] = None
            results["b"] = b.save(t, stores(kv, 48), name="from-b")

    monkeypatch.setattr(snap, "_stage", at)
    results["a"] = a.save(t, stores(kv, 48), name="from-a")
    ra, rb = results["a"], results["b"]
    assert ra.snapshot_id == rb.snapshot_id
    assert not rb.already_stored and rb.name_applied == "name"
    assert ra.already_stored and ra.name_applied == "alias" and (ra.name, ra.aliases) == ("from-b", ("from-a",))
    sid = ra.snapshot_id
    for db in (a, b, ContextDB(tmp_path / "db", **KW)):
        assert db.resolve("from-a") == db.resolve("from-b") == sid
        assert db.show(sid, verify=True).aliases == ("from-a",)
    assert sorted(os.listdir(tmp_path / "db" / "snapshots")) == [sid]  # the loser's temporary dir is gone
    # saving again: nothing written, names kept; a name it has is not added twice; no name: nothing changes
    again = a.save(t, stores(kv, 48), name="from-a")
    assert again.already_stored and again.name_applied == "present" and again.aliases == ("from-a",)
    assert a.stored(t).name_applied is None
    third = a.stored(t, name="third")
    assert third.name_applied == "alias" and third.aliases == ("from-a", "third")
    # a snapshot stored without a name gets the first name given as its name
    u = list(range(100, 132))
    assert a.save(u, stores(kv, 32)).name is None
    named = b.stored(u, name="late")
    assert named.name == "late" and named.name_applied == "name" and named.aliases == ()


def test_memory_db_saves_say_already_stored_and_keep_names():
    from alaya_jax.store.memory_db import MemoryContextDB

    db = MemoryContextDB(budget_bytes=1 << 20, **KW)
    kv = dense_kv(48)
    t = list(range(48))
    first = db.save(t, stores(kv, 48), name="one")
    assert not first.already_stored and first.name == "one"
    again = db.save(t, stores(kv, 48), name="two")
    assert again.already_stored and again.snapshot_id == first.snapshot_id and again.aliases == ("two",)
    assert db.resolve("two") == first.snapshot_id and db.show("one").aliases == ("two",)
    assert db.import_(t, stores(kv, 48)) == first.snapshot_id and db.cleaned == [] and db.leftovers() == []


@pytest.mark.parametrize("code,cause", [(28, "no space left on device (ENOSPC)"),
                                        (27, "file too large (a file-size limit) (EFBIG)"),
                                        (30, "read-only file system (EROFS)"), (13, "permission denied (EACCES)")])
def test_a_save_the_storage_refuses_is_one_storage_error_and_leaves_nothing(tmp_path, monkeypatch, code, cause):
    import checkpoints.snapshot as snap
    from alaya_jax.errors import StorageError

    db = ContextDB(tmp_path / "db", **KW)
    kv = dense_kv(32)
    first = db.import_(list(range(32)), stores(kv, 32), name="earlier")

    def refuse(path, data):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(snap, "_write_file", refuse)  # after Orbax wrote the arrays
    with pytest.raises(StorageError) as e:
        db.save(list(range(1, 33)), stores(kv, 32))
    assert str(e.value) == f"cannot store the context in the context DB {db.path}: {cause}"
    assert e.value.errno == code and e.value.no_space == (code in (27, 28)) and e.value.cause == cause
    assert sorted(os.listdir(tmp_path / "db" / "snapshots")) == [first]
    monkeypatch.undo()
    db.show(first, verify=True)


def test_storage_causes_from_tensorstore_messages():
    from checkpoints.storage import storage_error

    ts = ValueError('OUT_OF_RANGE: Error writing "layers.0.codes/0" in OCDBT database at local file "/x/": Failed '
                    "to write 423583 bytes to file 15: File too large [os_error_code='27']")
    e = storage_error(ts, "cannot write the snapshot", "/x")
    assert e.errno == 27 and e.no_space and e.cause == "file too large (a file-size limit) (EFBIG)"
    e = storage_error(ValueError("RESOURCE_EXHAUSTED: ... No space left on device"), "save", "/x")
    assert e.errno == 28 and e.no_space
    assert storage_error(ValueError("shapes differ"), "save", "/x") is None  # not storage: a bug, re-raised
    assert storage_error(ck.SnapshotError("refused"), "save", "/x") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_db_is_a_storage_error(tmp_path):
    from alaya_jax.errors import StorageError

    db = ContextDB(tmp_path / "db", **KW)
    os.chmod(tmp_path / "db" / "snapshots", 0o555)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            db.import_(list(range(32)), stores(dense_kv(32), 32))
        assert ContextDB(tmp_path / "db").list() == []  # listing still works
    finally:
        os.chmod(tmp_path / "db" / "snapshots", 0o755)


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(0, 50_000, size=n).tolist()


def test_concurrent_readers(tmp_path):
    path = tmp_path / "db"
    n = 512
    db = ContextDB(path, **helper.DB_KW)
    tokens, caches = helper.make_context(7, n)
    assert _tokens(7, n) == tokens
    db.import_(tokens, caches)
    want = helper.caches_fingerprint(tuple(kv_store.resize(c, n + 8) for c in caches), n)
    procs = [_spawn("load", path, 7, n) for _ in range(2)]
    # Meanwhile, threads of this process read the same snapshot.
    results, errors = [], []

    def read():
        try:
            s, _ = ContextDB(path, **helper.DB_KW).create_session(tokens + [1], capacity=n + 8, strict=True)
            results.append(helper.caches_fingerprint(s.caches, s.reused_tokens))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert results == [want] * 3
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["LOADED", str(n), want]


# ---------------------------------------------------------------- with a (tiny, random) model

def _tiny_engine():
    from flax import nnx

    from alaya_jax.runtime.engine import Engine
    from models import Llama, tiny

    cfg = tiny()
    # prefill_chunk 32: the context and the full prompt are cut into different chunks.
    return Engine(Llama(cfg, rngs=nnx.Rngs(3)), block_size=16, prefill_chunk=32), cfg


@pytest.fixture(scope="module")
def tiny_engine():
    return _tiny_engine()


def _model_db(path, engine):
    return ContextDB(path, model_fingerprint="tiny-3", tokenizer_fingerprint="ids", dtype=engine.dtype,
                     block_size=engine.block_size)


def _sampling(n=12):
    from alaya_jax.runtime.sampling import SamplingConfig

    # Sampling at temperature 1 with a fixed seed: a random tiny model is degenerate under
    # greedy decoding; sampled tokens change when the logits change at all.
    return SamplingConfig(max_new_tokens=n, temperature=1.0, seed=7)


def test_generation_after_restore_equals_generation_after_prefill(tmp_path, tiny_engine):
    engine, cfg = tiny_engine
    rng = np.random.default_rng(5)
    context = rng.integers(0, cfg.vocab_size, 100).tolist()
    question = rng.integers(0, cfg.vocab_size, 9).tolist()
    prompt = context + question
    cap = len(prompt) + 12
    ref, _ = engine.generate([prompt], sampling=_sampling(), capacity=cap)
    assert len(set(ref[0].tokens)) > 3  # not a degenerate sequence

    db = _model_db(tmp_path / "db", engine)
    caches = engine.new_caches(batch=1, capacity=len(context))
    caches, _, _ = engine.prefill(caches, [context])
    sid = db.import_(context, caches)

    db2 = _model_db(tmp_path / "db", engine)  # a fresh process would see the same catalogue
    session, todo = db2.create_session(prompt, capacity=cap)
    assert session.snapshot_id == sid and session.reused_tokens == 96  # 6 full blocks of 16
    assert session.source == "disk" and session.restore_s > 0  # no memory tier by default
    assert todo == prompt[96:]
    got, _ = engine.generate([todo], sampling=_sampling(), caches=session.caches, capacity=cap)
    assert got[0].reused_tokens == 96
    assert got[0].tokens == ref[0].tokens


def test_longer_prompt_reuses_stored_prefix_and_stored_session_extends(tmp_path, tiny_engine):
    engine, cfg = tiny_engine
    rng = np.random.default_rng(6)
    first = rng.integers(0, cfg.vocab_size, 70).tolist()
    db = _model_db(tmp_path / "db", engine)
    session, todo = db.create_session(first, capacity=200)
    assert session.reused_tokens == 0 and todo == first
    caches = engine.new_caches(batch=1, capacity=len(first))
    caches, _, _ = engine.prefill(caches, [first])
    session.tokens, session.caches = list(first), caches
    db.store(session)

    longer = first + rng.integers(0, cfg.vocab_size, 60).tolist()
    ref, _ = engine.generate([longer], sampling=_sampling(8), capacity=200)
    session, todo = db.create_session(longer, capacity=200)
    assert session.reused_tokens == 64 and todo == longer[64:]
    got, caches = engine.generate([todo], sampling=_sampling(8), caches=session.caches, capacity=200)
    assert got[0].tokens == ref[0].tokens
    # Store the longer context (truncated to it from the generation's caches): a third
    # prompt sharing it reuses the longer snapshot.
    sid = db.import_(longer, tuple(kv_store.truncate(c, len(longer)) for c in caches))
    third = longer + [1, 2, 3]
    session, todo = db.create_session(third, capacity=200)
    assert session.snapshot_id == sid and session.reused_tokens == 128 and todo == third[128:]


# ---------------------------------------------------------------- memory tier

BIG = 1 << 30


def _tier_db(path, kind="device", budget=BIG, **kw):
    return ContextDB(path, **KW, memory_budget_bytes=budget, memory_kind=kind, **kw)


def _no_disk(monkeypatch):
    """Make every snapshot read from disk fail: what is served then came from memory."""
    import alaya_jax.store.context_db as cdb

    def refuse(*a, **k):
        raise AssertionError("read from disk")

    monkeypatch.setattr(cdb, "load_snapshot", refuse)


_donate = jax.jit(lambda caches: jax.tree.map(lambda x: x + 0, caches), donate_argnums=0)


def _assert_not_shared(session_caches, resident):
    """No buffer in common, and donating the session's caches (as the engine does on
    accelerators) leaves the resident copy alive."""
    from alaya_jax.store.memory_tier import buffer_ids

    mine = {p for _, _, p in buffer_ids(session_caches)}
    assert not mine & {p for _, _, p in buffer_ids(resident)}
    _donate(session_caches)
    assert all(x.is_deleted() for x in jax.tree.leaves(session_caches))  # donation works on this backend
    assert not any(x.is_deleted() for x in jax.tree.leaves(resident))


@pytest.mark.parametrize("kind", ["device", "pinned_host"])
def test_memory_tier_serves_stored_snapshot_without_disk(tmp_path, monkeypatch, kind):
    kv = dense_kv(80)
    t = list(range(80))
    db = _tier_db(tmp_path / "db", kind)
    sid = db.import_(t[:70], stores(kv, 70, capacity=128))  # stored at a larger capacity: kept trimmed
    stats = db.memory_stats()
    assert stats.snapshots == (sid,) and stats.memory_kind == kind and stats.budget_bytes == BIG
    resident = db.memory_tier.peek(sid).caches
    assert resident[0].num_blocks == 5 and resident[0].keys.sharding.memory_kind == kind
    assert stats.used_bytes == sum(x.nbytes for x in jax.tree.leaves(resident))
    _no_disk(monkeypatch)
    # 70 tokens floored to 64; capacity 71 keeps the resident's 5 blocks: the case where
    # resizing passes keys and values through, so the session must get copies.
    session, rest = db.create_session(t[:70] + [1], capacity=71)
    assert session.source == f"memory:{kind}" and session.restore_s > 0
    assert (session.snapshot_id, session.reused_tokens, rest) == (sid, 64, t[64:70] + [1])
    want = stores(kv, 70, capacity=80)
    for a, b in zip(want, session.caches):
        assert b.keys.sharding.memory_kind == "device" and b.capacity == 80 and int(b.lengths[0]) == 64
        assert np.array_equal(bits(a.keys[:, :, :4]), bits(b.keys[:, :, :4]))
        assert np.array_equal(bits(a.codes[:, :, :4]), bits(b.codes[:, :, :4]))
    _assert_not_shared(session.caches, resident)
    # load() from memory: the whole snapshot, also in buffers of its own.
    caches, toks, meta = db.load(sid)
    assert toks == t[:70] and meta.snapshot_id == sid and caches[0].capacity == 80
    for a, b in zip(want, caches):
        for f in ALL_FIELDS:
            assert np.array_equal(bits(getattr(a, f)), bits(getattr(b, f))), f
    _assert_not_shared(caches, resident)
    # After both were donated, the tier still serves the same contents.
    again, _ = db.create_session(t[:70] + [1], capacity=71)
    assert again.source == f"memory:{kind}"
    assert np.array_equal(bits(again.caches[1].values[:, :, :4]), bits(want[1].values[:, :, :4]))


@pytest.mark.parametrize("kind", ["device", "pinned_host"])
@pytest.mark.parametrize("capacity", [33, 49, 64, 65, 200])  # fewer, as many and more blocks than resident
def test_memory_tier_serve_is_truncate_then_resize_bit_for_bit(tmp_path, monkeypatch, kind, capacity):
    """The one-dispatch serve copy (all layers at once) gives what kv_store.truncate then
    kv_store.resize give, every field bit for bit, in buffers of its own: a prefix of a
    longer resident snapshot (summaries past it zeroed), cut or padded to the capacity."""
    kv = dense_kv(64, layers=3)
    t = list(range(64))
    db = _tier_db(tmp_path / "db", kind)
    sid = db.import_(t[:60], stores(kv, 60))  # 4 blocks resident, the last one partial
    resident = db.memory_tier.peek(sid).caches
    _no_disk(monkeypatch)
    prompt = t[:32] + [99] * (capacity - 32)  # shares 2 blocks
    session, rest = db.create_session(prompt, capacity=capacity)
    assert (session.source, session.reused_tokens, rest) == (f"memory:{kind}", 32, prompt[32:])
    for c, got in zip(stores(kv, 60), session.caches):
        want = kv_store.resize(kv_store.truncate(c, 32), capacity)
        assert got.num_blocks == want.num_blocks == -(-capacity // BK)
        for f in ALL_FIELDS:
            a, b = getattr(want, f), getattr(got, f)
            assert a.dtype == b.dtype and a.shape == b.shape, f
            if f in ("keys", "values"):  # past the length: undefined contents
                a, b = a[:, :, :2], b[:, :, :2]
            assert np.array_equal(bits(a), bits(b)), f
    _assert_not_shared(session.caches, resident)
    # The whole snapshot (load): summaries of the partial last block kept as stored.
    caches, _, _ = db.load(sid, capacity=capacity if capacity >= 60 else None)
    for c, got in zip(stores(kv, 60), caches):
        want = kv_store.resize(c, max(capacity, 60) if capacity >= 60 else 60)
        for f in ALL_FIELDS:
            assert np.array_equal(bits(getattr(want, f)), bits(getattr(got, f))), f
    _assert_not_shared(caches, resident)


def test_memory_tier_keeps_disk_loads_and_budget_zero_is_off(tmp_path):
    kv = dense_kv(64)
    t = list(range(64))
    sid = ContextDB(tmp_path / "db", **KW).import_(t, stores(kv, 64))
    off = ContextDB(tmp_path / "db", **KW)  # memory_budget_bytes=0: no tier
    for _ in range(2):
        session, _ = off.create_session(t + [5], capacity=80)
        assert session.source == "disk" and session.snapshot_id == sid
    assert off.memory_stats() == ck_stats("device", 0, 0, ())
    on = _tier_db(tmp_path / "db", "pinned_host")
    first, _ = on.create_session(t + [5], capacity=80)
    second, _ = on.create_session(t + [5], capacity=80)
    assert (first.source, second.source) == ("disk", "memory:pinned_host")
    assert on.memory_stats().snapshots == (sid,)
    _assert_not_shared(first.caches, on.memory_tier.peek(sid).caches)
    for a, b in zip(second.caches, stores(kv, 64, capacity=80)):
        for f in ALL_FIELDS:
            assert np.array_equal(bits(getattr(a, f)), bits(getattr(b, f))), f


def ck_stats(*a):
    from alaya_jax.store.context_db import MemoryTierStats

    return MemoryTierStats(*a)


def test_memory_tier_lru_eviction_by_bytes(tmp_path):
    kv = dense_kv(96)
    ctx = {c: [ord(c) * 1000 + i for i in range(32)] for c in "ABCD"}
    probe = _tier_db(tmp_path / "probe")
    probe.import_(ctx["A"], stores(kv, 32))
    size = probe.memory_stats().used_bytes
    assert size > 0
    db = _tier_db(tmp_path / "db", budget=int(2.5 * size))  # room for two
    ids = {c: db.import_(ctx[c], stores(kv, 32)) for c in "ABC"}
    assert db.memory_stats().snapshots == (ids["B"], ids["C"])  # A, least recently used, evicted
    assert db.memory_stats().used_bytes == 2 * size
    assert db.create_session(ctx["B"] + [1], capacity=48)[0].source == "memory:device"  # B now most recent
    ids["D"] = db.import_(ctx["D"], stores(kv, 32))
    assert db.memory_stats().snapshots == (ids["B"], ids["D"])
    # A is still on disk: served from there, then kept, evicting B (used before D was stored).
    s, _ = db.create_session(ctx["A"] + [1], capacity=48)
    assert s.source == "disk" and db.memory_stats().snapshots == (ids["D"], ids["A"])
    # A snapshot larger than the whole budget is not kept, and evicts nothing.
    big = db.import_(list(range(96)), stores(kv, 96))
    assert db.memory_stats().snapshots == (ids["D"], ids["A"])
    assert db.create_session(list(range(97)), capacity=112)[0].source == "disk"
    assert big not in db.memory_stats().snapshots


def test_memory_tier_evicts_on_delete_corruption_and_other_process_delete(tmp_path):
    kv = dense_kv(64)
    t = list(range(64))
    db = _tier_db(tmp_path / "db")
    a = db.import_(t[:32], stores(kv, 32))
    b = db.import_(t, stores(kv, 64))
    assert set(db.memory_stats().snapshots) == {a, b}
    db.delete(b)
    assert db.memory_stats().snapshots == (a,)
    # Another process (here: another instance) deletes a: the next lookup must not serve it.
    ContextDB(tmp_path / "db", **KW).delete(a)
    session, rest = db.create_session(t[:32] + [1], capacity=48)
    assert session.caches is None and session.source is None and rest == t[:32] + [1]
    assert db.memory_stats().snapshots == ()
    # ... and re-created by another process: a new directory, so served from disk first.
    ContextDB(tmp_path / "db", **KW).import_(t[:32], stores(kv, 32))
    assert db.create_session(t[:32] + [1], capacity=48)[0].source == "disk"
    assert db.memory_stats().snapshots == (a,)
    # Found corrupt on disk (verify): evicted, and refused from then on.
    _flip_largest_state_file(tmp_path / "db" / "snapshots" / a)
    with pytest.raises(ck.CorruptSnapshotError):
        db.show(a, verify=True)
    assert db.memory_stats().snapshots == ()
    assert db.create_session(t[:32] + [1], capacity=48)[0].reused_tokens == 0


class _FakeMemory:
    def __init__(self, kind):
        self.kind = kind


class _FakeDevice:
    def addressable_memories(self):
        return [_FakeMemory("device")]

    def __str__(self):
        return "FakeDevice(0)"


class _FakeSharding:
    device_set = {_FakeDevice()}

    def with_memory_kind(self, kind):
        return self


def test_memory_tier_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"memory_kind must be one of \('device', 'pinned_host'\), got 'hbm'"):
        _tier_db(tmp_path / "db", "hbm")
    with pytest.raises(ValueError, match="memory_kind must be one of"):
        _tier_db(tmp_path / "db", "unpinned_host")
    with pytest.raises(ValueError, match="memory_budget_bytes must be >= 0"):
        _tier_db(tmp_path / "db", budget=-1)
    with pytest.raises(ValueError, match="needs a ContextDB opened with a model"):
        ContextDB(tmp_path / "db", memory_budget_bytes=BIG)
    # A kind the backend does not offer: named, no fallback.
    with pytest.raises(ValueError, match=r"memory_kind 'pinned_host' is not available on device FakeDevice\(0\)"):
        _tier_db(tmp_path / "db", "pinned_host", sharding=_FakeSharding())
    # With the tier off nothing is checked against the devices.
    ContextDB(tmp_path / "db", **KW, memory_kind="pinned_host", sharding=_FakeSharding())


@pytest.mark.parametrize("kind", ["device", "pinned_host"])
def test_generation_after_memory_tier_hit_equals_generation_after_prefill(tmp_path, monkeypatch, tiny_engine, kind):
    engine, cfg = tiny_engine
    rng = np.random.default_rng(8)
    context = rng.integers(0, cfg.vocab_size, 100).tolist()
    prompt = context + rng.integers(0, cfg.vocab_size, 9).tolist()
    cap = len(prompt) + 12
    ref, _ = engine.generate([prompt], sampling=_sampling(), capacity=cap)
    assert len(set(ref[0].tokens)) > 3

    db = ContextDB(tmp_path / "db", model_fingerprint="tiny-3", tokenizer_fingerprint="ids", dtype=engine.dtype,
                   block_size=engine.block_size, memory_budget_bytes=BIG, memory_kind=kind)
    session = Session(tokens=[], caches=None)
    session.tokens = list(context)
    session.caches, _, _ = engine.prefill(engine.new_caches(batch=1, capacity=len(context)), [context])
    sid = db.store(session)
    _no_disk(monkeypatch)
    for _ in range(2):  # the second hit checks that the first session left the resident copy intact
        s, todo = db.create_session(prompt, capacity=cap)
        assert (s.snapshot_id, s.source, s.reused_tokens, todo) == (sid, f"memory:{kind}", 96, prompt[96:])
        got, _ = engine.generate([todo], sampling=_sampling(), caches=s.caches, capacity=cap)
        assert got[0].tokens == ref[0].tokens
