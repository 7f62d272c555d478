"""alaya snapshot list|show|delete (catalogue only, no model) and the generate/save glue helpers."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints as ck
from alaya_jax import cli, kv_store
from alaya_jax.cli_snapshot import context_prefix_ids, model_fingerprint, prompt_ids, tokenizer_fingerprint
from alaya_jax.context_db import ContextDB

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
    e = lambda m: types.SimpleNamespace(_state=nnx.split(m)[1], dtype=jnp.dtype("float32"))
    assert model_fingerprint("cfg", e(m1)) == model_fingerprint("cfg", e(m1))
    assert model_fingerprint("cfg", e(m1)) != model_fingerprint("cfg", e(m2))
    assert model_fingerprint("cfg", e(m1)) != model_fingerprint("cfg2", e(m1))
    assert tokenizer_fingerprint(FakeTok()) == tokenizer_fingerprint(FakeTok())
    assert tokenizer_fingerprint(types.SimpleNamespace(fingerprint="abc")) == "abc"
