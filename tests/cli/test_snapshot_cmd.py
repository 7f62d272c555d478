"""alaya snapshot list|show|delete (catalogue only, no model) and the generate/save glue helpers."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints as ck
from alaya_jax import cli
from alaya_jax.runtime.prompts import context_prefix_ids, prompt_ids
from alaya_jax.store import kv_store
from alaya_jax.store.context_db import ContextDB
from alaya_jax.store.db_for_model import model_fingerprint, tokenizer_fingerprint

KW = dict(model_fingerprint="model-A", tokenizer_fingerprint="tok-A", dtype="bfloat16", block_size=16)


def _stores(n, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((1, n, 2, 8), np.float32), jnp.bfloat16)
    return (kv_store.from_dense(k, k, block_size=16),)


@pytest.fixture
def dbdir(tmp_path):
    db = ContextDB(tmp_path / "db", **KW)
    a = db.import_(list(range(40)), _stores(40), name="alpha")
    b = db.import_(list(range(100, 120)), _stores(20), name="beta")
    return str(tmp_path / "db"), a, b


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_catalogue_only_db(dbdir):
    path, a, b = dbdir
    db = ContextDB(path)
    assert db.catalog_only and {m.snapshot_id for m in db.list()} == {a, b}
    with pytest.raises(ck.SnapshotError, match="needs a ContextDB opened with a model"):
        db.create_session([1, 2, 3], capacity=8)
    with pytest.raises(ck.SnapshotError, match="needs a ContextDB opened with a model"):
        db.load(a)
    with pytest.raises(ValueError, match="or none"):
        ContextDB(path, model_fingerprint="m")


def test_cli_list_show_delete(dbdir, capsys):
    path, a, b = dbdir
    rc, out, _ = run(capsys, "snapshot", "list", "--db", path, "--json")
    rows = json.loads(out)
    assert rc == 0 and {r["id"] for r in rows} == {a, b}
    assert {r["name"] for r in rows} == {"alpha", "beta"} and all("problem" not in r for r in rows)
    rc, out, _ = run(capsys, "snapshot", "list", "--db", path)
    assert rc == 0 and a in out and "alpha" in out
    rc, out, _ = run(capsys, "snapshot", "show", "--db", path, "alpha", "--verify", "--json")
    d = json.loads(out)
    assert rc == 0 and d["id"] == a and d["num_tokens"] == 40 and d["verified"] is True
    # A corrupt file: show --verify names it, list marks the snapshot unusable, exit status 2.
    snap = os.path.join(path, "snapshots", b)
    with open(os.path.join(snap, "tokens.npy"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x55")
    rc, _, err = run(capsys, "snapshot", "show", "--db", path, b, "--verify")
    assert rc == 2 and "checksum mismatch in tokens.npy" in err and err.startswith("alaya: error:")
    rc, out, _ = run(capsys, "snapshot", "list", "--db", path, "--json")
    assert {r["id"]: ("problem" in r) for r in json.loads(out)} == {a: False, b: True}
    rc, out, _ = run(capsys, "snapshot", "delete", "--db", path, b[:5], "--json")
    assert rc == 0 and json.loads(out) == {"deleted": b}
    rc, _, err = run(capsys, "snapshot", "delete", "--db", path, b)
    assert rc == 2 and "no snapshot" in err
    rc, _, err = run(capsys, "snapshot", "list", "--db", path + "-missing")
    assert rc == 2 and "does not exist" in err


class FakeTok:
    """Whitespace-ish tokenizer whose last token merges with what follows (like BPE)."""

    stop_ids = {0}

    def encode(self, text):
        return [hash(w) % 1000 + 1 for w in text.replace("\n", " \n ").split(" ") if w]

    def chat_prompt(self, user):
        return "<sys> hi <user> " + user + " <end> <assistant>"


def test_context_prefix_is_a_prefix_of_every_generate_prompt():
    tok = FakeTok()
    ctx = "alpha beta gamma delta " * 20
    for raw in (False, True):
        pre = context_prefix_ids(tok, ctx, raw=raw)
        assert len(pre) >= 80
        for q in ("What?", "Tell me about beta", "x"):
            full = prompt_ids(tok, ctx, q, raw=raw)
            assert full[: len(pre)] == pre


def test_fingerprints():
    from flax import nnx

    m1 = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    m2 = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
    e = lambda m: types.SimpleNamespace(state=nnx.split(m)[1], dtype=jnp.dtype("float32"))
    assert model_fingerprint("cfg", e(m1)) == model_fingerprint("cfg", e(m1))
    assert model_fingerprint("cfg", e(m1)) != model_fingerprint("cfg", e(m2))
    assert model_fingerprint("cfg", e(m1)) != model_fingerprint("cfg2", e(m1))
    assert tokenizer_fingerprint(FakeTok()) == tokenizer_fingerprint(FakeTok())
    assert tokenizer_fingerprint(types.SimpleNamespace(fingerprint="abc")) == "abc"


# ---------------------------------------------------------------- real SmolLM2, end to end

_SMOL = {}


@pytest.fixture
def smollm2_cached(monkeypatch):
    """``alaya`` commands load SmolLM2 once per test module (the CLI would load it per call)."""
    pytest.importorskip("gguf")
    import models

    real = models.load_smollm2

    def cached(dtype="float32", **_):
        if dtype not in _SMOL:
            _SMOL[dtype] = real(dtype=dtype)
        return _SMOL[dtype]

    monkeypatch.setattr(models, "load_smollm2", cached)


@pytest.mark.slow
def test_cli_snapshot_then_generate_db_reuses_it_with_the_same_text(tmp_path, capsys, smollm2_cached):
    from alaya_jax.runtime.corpus import pydoc_topics

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(pydoc_topics()[:1200])
    db = str(tmp_path / "db")
    q = ["--prompt", "What is this text about?", "--max-new-tokens", "10", "--json"]

    rc, out, err = run(capsys, "snapshot", "save", "--db", db, "--context-file", str(ctx), "--name", "doc", "--json")
    assert rc == 0, err
    saved = json.loads(out)
    assert saved["num_tokens"] > 128 and not saved["already_stored"]

    rc, out, err = run(capsys, "generate", "--context-file", str(ctx), *q)
    assert rc == 0, err
    plain = json.loads(out)
    assert plain["reused_tokens"] == 0 and plain["new_tokens"] > 0

    rc, out, err = run(capsys, "generate", "--db", db, "--context-file", str(ctx), *q)
    assert rc == 0, err
    reused = json.loads(out)
    assert reused["reused_tokens"] == saved["num_tokens"] // 64 * 64
    assert reused["snapshot_id"] == saved["id"] and reused["stored_snapshot"] is None
    assert reused["ttft_s"] >= reused["restore_s"] > 0
    assert reused["text"] == plain["text"]
    assert reused["prompt_tokens"] == plain["prompt_tokens"]


@pytest.mark.slow
def test_cli_generate_db_stores_the_context_for_the_next_question(tmp_path, capsys, smollm2_cached):
    from alaya_jax.runtime.corpus import pydoc_topics

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(pydoc_topics()[2000:3000])
    db = str(tmp_path / "db")
    base = ["generate", "--db", db, "--context-file", str(ctx), "--max-new-tokens", "4", "--json"]

    rc, out, err = run(capsys, *base, "--prompt", "Summarise it.")
    assert rc == 0, err
    first = json.loads(out)
    assert first["reused_tokens"] == 0 and first["stored_snapshot"]

    rc, out, err = run(capsys, *base, "--prompt", "Give one example.", "--no-store")
    assert rc == 0, err
    second = json.loads(out)
    assert second["snapshot_id"] == first["stored_snapshot"] and second["reused_tokens"] >= 128

    # `snapshot save` of the same context finds it already stored (same tokens, same id).
    rc, out, err = run(capsys, "snapshot", "save", "--db", db, "--context-file", str(ctx), "--json")
    assert rc == 0, err
    again = json.loads(out)
    assert again["already_stored"] and again["id"] == first["stored_snapshot"]


# ---------------------------------------------------------------- names, leftovers, a full disk (issue 22)

CONTEXT = "A context for the snapshot commands, a few blocks of the byte tokenizer long. " * 2


def _save(capsys, path, ctx, *extra):
    rc, out, err = run(capsys, "snapshot", "save", "--random-weights", "tiny", "--raw", "--db", path,
                       "--context-file", str(ctx), "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


def test_cli_second_save_under_another_name_keeps_both(tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    path = str(tmp_path / "db")
    first = _save(capsys, path, ctx, "--name", "one")
    assert not first["already_stored"] and first["name"] == "one" and first["name_applied"] == "name"
    second = _save(capsys, path, ctx, "--name", "two")
    assert second["id"] == first["id"] and second["already_stored"]
    assert (second["name"], second["aliases"], second["name_applied"]) == ("one", ["two"], "alias")
    rc, out, _ = run(capsys, "snapshot", "list", "--db", path)
    assert rc == 0 and "one two" in out
    for ref in ("one", "two"):
        rc, out, _ = run(capsys, "snapshot", "show", "--db", path, ref, "--json")
        assert rc == 0 and json.loads(out)["id"] == first["id"]


def test_cli_list_and_gc_report_and_remove_leftovers(tmp_path, capsys):
    from checkpoints.storage import TempDir

    path = tmp_path / "db"
    ContextDB(path, **KW)
    snaps = path / "snapshots"
    (snaps / ".tmp-killed-1").mkdir()  # a killed save: its lock file is there, nobody holds it
    (snaps / ".tmp-killed-1" / "data").write_bytes(b"z" * 5000)
    (snaps / ".tmp-killed-1.lock").write_text("12345\n")
    live = TempDir(str(snaps), "live")  # a save in progress
    (snaps / ".tmp-unmarked").mkdir()  # left by an older alaya-jax (no lock file)
    (snaps / ".tmp-unmarked" / "data").write_bytes(b"u" * 700)
    try:
        rc, out, err = run(capsys, "snapshot", "list", "--db", str(path))
        assert rc == 0 and "removed 1 leftover(s) of killed saves or deletes (5.0 kB): .tmp-killed-1" in out, out
        assert "a save in progress" in out and "no writer lock" in out
        assert not (snaps / ".tmp-killed-1").exists() and not (snaps / ".tmp-killed-1.lock").exists()
        rc, out, err = run(capsys, "snapshot", "list", "--db", str(path), "--json")
        assert rc == 0 and json.loads(out) == [] and "a save in progress" in err  # rows stay snapshots only
        rc, out, _ = run(capsys, "snapshot", "gc", "--db", str(path), "--min-age", "0", "--json")
        report = json.loads(out)
        assert report["removed"] == [{"name": ".tmp-unmarked", "bytes": 700, "state": "unmarked"}]
        assert report["removed_bytes"] == 700
        assert [x["state"] for x in report["kept"]] == ["in_progress"] and os.path.isdir(live.path)
    finally:
        live.release()
    rc, out, _ = run(capsys, "snapshot", "gc", "--db", str(path))
    assert rc == 0 and "nothing to remove" in out and os.listdir(snaps) == []


def test_cli_save_on_a_full_disk_is_one_line_and_exit_74(tmp_path, capsys):
    import subprocess

    from tests.support.serve_process import ROOT, alaya_command

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    path = str(tmp_path / "db")
    earlier = _save(capsys, path, ctx, "--name", "earlier")
    big = tmp_path / "big.txt"
    big.write_text("Another context, too large for the file-size limit of this save. " * 6)

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([*alaya_command(64 << 10), "snapshot", "save", "--random-weights", "tiny", "--raw",
                        "--db", path, "--context-file", str(big)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=ROOT)
    assert r.returncode == 74, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("alaya: error:")]
    assert errors == [f"alaya: error: cannot store the context in the context DB {os.path.abspath(path)}: "
                      f"file too large (a file-size limit) (EFBIG)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
    db = ContextDB(path)
    assert [m.snapshot_id for m in db.list()] == [earlier["id"]] and not db.cleaned
    assert os.listdir(os.path.join(path, "snapshots")) == [earlier["id"]]
    db.show(earlier["id"], verify=True)
