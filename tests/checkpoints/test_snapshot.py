"""checkpoints.snapshot: Orbax round trip, trimming/padding, every refusal."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints as ck
from alaya_jax.store import kv_store
from checkpoints import snapshot as ck_snapshot
from tests.support.stores import assert_bitwise_equal

# A refused restore leaves Orbax read coroutines that Python reports when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FP = dict(model_fingerprint="model-A", tokenizer_fingerprint="tok-A")


def make_caches(n, *, layers=3, hkv=2, d=8, bk=16, capacity=None, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        k = jnp.asarray(rng.standard_normal((1, n, hkv, d), np.float32), dtype)
        v = jnp.asarray(rng.standard_normal((1, n, hkv, d), np.float32), dtype)
        out.append(kv_store.from_dense(k, v, block_size=bk, capacity=capacity))
    return tuple(out)


@pytest.fixture
def saved(tmp_path):
    caches = make_caches(70, capacity=200)
    tokens = list(range(1000, 1070))
    path = tmp_path / "snap"
    meta = ck.save_snapshot(path, caches, tokens, name="ctx", **FP)
    return path, caches, tokens, meta


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
def test_round_trip_bitwise(tmp_path, dtype):
    caches = make_caches(70, capacity=200, dtype=dtype)
    tokens = list(range(70))
    ck.save_snapshot(tmp_path / "s", caches, tokens, **FP)
    got, toks, meta = ck.load_snapshot(tmp_path / "s", expect_model="model-A", expect_tokenizer="tok-A",
                                       expect_dtype=dtype, expect_block_size=16, capacity=200)
    assert toks == tokens
    assert len(got) == len(caches)
    for a, b in zip(caches, got):
        assert_bitwise_equal(a, b)
    assert meta.dtype == jnp.dtype(dtype).name and meta.num_tokens == 70 and meta.num_layers == 3


def test_meta_and_trimmed_block_axis(saved):
    path, caches, tokens, meta = saved
    assert meta.format_version == ck.FORMAT_VERSION == 3
    assert (meta.block_size, meta.num_kv_heads, meta.head_dim, meta.num_tokens) == (16, 2, 8, 70)
    assert meta.name == "ctx" and meta.created
    assert "tokens.npy" in meta.checksums and any(k.startswith("state/") for k in meta.checksums)
    assert "meta.json" not in meta.checksums
    assert ck.read_meta(path) == meta
    got, _, _ = ck.load_snapshot(path)  # no capacity: only the 5 stored blocks
    assert got[0].num_blocks == 5 and got[0].keys.shape == (1, 2, 5, 16, 8)
    assert ck.abstract_tree(meta)["layers"][0]["keys"].shape == (1, 2, 5, 16, 8)
    # Only the trimmed blocks reach the disk: far less than the 13-block capacity.
    padded = kv_store.resize(got[0], 200)
    assert_bitwise_equal(padded, caches[0])
    # Nothing but the snapshot directory is left in the parent.
    assert sorted(os.listdir(path.parent)) == ["snap"]


def test_restore_onto_explicit_sharding(saved):
    path, caches, _, _ = saved
    dev = jax.devices()[-1]
    got, _, _ = ck.load_snapshot(path, sharding=jax.sharding.SingleDeviceSharding(dev), capacity=200)
    assert got[0].keys.devices() == {dev}
    assert_bitwise_equal(got[1], caches[1])


def test_resize_store():
    (c,) = make_caches(40, layers=1, capacity=64)
    big = kv_store.resize(c, 100)  # rounded up to 7 blocks
    assert big.num_blocks == 7 and big.capacity == 112
    assert np.array_equal(np.asarray(big.keys[:, :, :4]), np.asarray(c.keys))
    assert (np.asarray(big.codes[:, :, 4:]) == kv_store.ZERO_CODE).all()
    assert not np.asarray(big.code_scale[:, :, 4:]).any()
    small = kv_store.resize(big, 48)
    assert small.num_blocks == 3
    assert_bitwise_equal(small, kv_store.resize(c, 48))
    with pytest.raises(ValueError, match="cannot hold"):
        kv_store.resize(c, 32)


@pytest.mark.parametrize("n", [32, 37])
def test_truncate_store_matches_from_dense_of_prefix(n):
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((1, 70, 2, 8), np.float32), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, 70, 2, 8), np.float32), jnp.bfloat16)
    full = kv_store.from_dense(k, v, block_size=16, capacity=96)
    want = kv_store.from_dense(k[:, :n], v[:, :n], block_size=16, capacity=96)
    got = kv_store.truncate(full, n)
    assert np.array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    assert np.array_equal(np.asarray(got.dense_keys()[:, :, :n]), np.asarray(want.dense_keys()[:, :, :n]))
    for x, y in zip(got.dense_codes(), want.dense_codes()):  # codes of the kept positions, as built
        assert np.array_equal(np.asarray(x[:, :, :n]), np.asarray(y[:, :, :n]))
    with pytest.raises(ValueError):
        kv_store.truncate(full, 71)


def _state_files(path):
    meta = ck.read_meta(path)
    files = [r for r in meta.checksums if r.startswith("state/")]
    return sorted(files, key=lambda r: -os.path.getsize(os.path.join(path, r)))


def test_corrupt_array_file_is_named(saved):
    path, *_ = saved
    victim = _state_files(path)[0]  # the largest file: array data
    fp = os.path.join(path, victim)
    with open(fp, "r+b") as f:
        f.seek(os.path.getsize(fp) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ck.CorruptSnapshotError, match="checksum mismatch in " + victim):
        ck.load_snapshot(path)
    with pytest.raises(ck.CorruptSnapshotError, match=victim):
        ck.verify_checksums(path)


def test_corrupt_tokens_and_missing_file(saved):
    path, *_ = saved
    with open(path / "tokens.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    with pytest.raises(ck.CorruptSnapshotError, match="tokens.npy"):
        ck.load_snapshot(path)
    with pytest.raises(ck.CorruptSnapshotError, match="tokens.npy"):
        ck.load_tokens(path, verify=True)
    os.remove(path / "tokens.npy")
    with pytest.raises(ck.CorruptSnapshotError, match="tokens.npy is missing"):
        ck.load_snapshot(path)


def test_unverified_load_of_damaged_state_still_refused(saved):
    path, *_ = saved
    victim = _state_files(path)[0]  # largest: array data
    os.remove(os.path.join(path, victim))
    with pytest.raises(ck.CorruptSnapshotError, match="cannot restore arrays"):
        ck.load_snapshot(path, verify=False)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(expect_model="model-B"), "snapshot .* was made with model model-A, this model is model-B"),
        (dict(expect_tokenizer="tok-B"), "was made with tokenizer tok-A, this tokenizer is tok-B"),
        (dict(expect_dtype=jnp.float32), "was made with dtype bfloat16, this model uses float32"),
        (dict(expect_block_size=64), "was made with block size 16, this engine uses 64"),
    ],
)
def test_incompatible_snapshot_refused(saved, kw, msg):
    path, *_ = saved
    with pytest.raises(ck.IncompatibleSnapshotError, match=msg):
        ck.load_snapshot(path, **kw)


def test_unknown_format_version(saved):
    path, *_ = saved
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ck.IncompatibleSnapshotError, match="format version 99"):
        ck.load_snapshot(path)


def test_missing_or_broken_meta(saved, tmp_path):
    path, *_ = saved
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ck.CorruptSnapshotError, match="meta.json is unreadable"):
        ck.load_snapshot(path)
    os.remove(path / "meta.json")
    with pytest.raises(ck.CorruptSnapshotError, match="has no meta.json"):
        ck.load_snapshot(path)
    with pytest.raises(ck.CorruptSnapshotError, match="no snapshot at"):
        ck.load_snapshot(tmp_path / "nowhere")
    assert issubclass(ck.CorruptSnapshotError, ck.SnapshotError) and issubclass(ck.SnapshotError, ValueError)


def test_save_refusals(tmp_path, saved):
    path, caches, tokens, _ = saved
    with pytest.raises(ck.SnapshotExistsError):
        ck.save_snapshot(path, caches, tokens, **FP)
    assert ck.save_snapshot(path, caches, tokens, exist_ok=True, **FP).num_tokens == 70
    with pytest.raises(ck.SnapshotError, match="holds 70 positions but 69 token ids"):
        ck.save_snapshot(tmp_path / "x", caches, tokens[:-1], **FP)
    with pytest.raises(ck.SnapshotError, match="differs from layer 0"):
        ck.save_snapshot(tmp_path / "x", caches + make_caches(70, layers=1, d=4), tokens, **FP)
    with pytest.raises(ck.SnapshotError, match="capacity 50 is smaller"):
        ck.load_snapshot(path, capacity=50)
    assert not (tmp_path / "x").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_fingerprint():
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "cfg": (1, "x")}
    assert ck.fingerprint(a) == ck.fingerprint({"cfg": (1, "x"), "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)})
    b = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "cfg": (1, "x")}
    assert ck.fingerprint(a) != ck.fingerprint(b)
    assert ck.fingerprint(a) != ck.fingerprint({**a, "w": a["w"].astype(np.float16)})
    assert len(ck.fingerprint("x")) == 16


def _rewrite_as_format(path, version):
    """Turn a current snapshot into what an older format wrote, with its own checksums: format 1 (keys,
    values, block min/max summaries, lengths; no codes), format 2 (codes, no block value means)."""
    import shutil

    import orbax.checkpoint as ocp

    meta = ck.read_meta(path)
    caches, _, _ = ck.load_snapshot(path)
    layers = []
    for c in caches:
        if version == 1:
            kmin, kmax = kv_store.block_summaries(c.keys, c.lengths)
            layers.append({"keys": c.keys, "values": c.values, "kmin": kmin, "kmax": kmax, "lengths": c.lengths})
        else:
            layers.append({f: a for f, a in kv_store.to_arrays(c).items() if f != "value_means"})
    state = os.path.join(path, ck_snapshot.STATE_DIR)
    shutil.rmtree(state)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(state), {"layers": layers})
    ckptr.wait_until_finished()
    ckptr.close()
    rels = ck_snapshot.walk_files(str(path))
    sums = {r: ck_snapshot.sha256_file(os.path.join(path, r)) for r in rels if r != ck_snapshot.META_FILE}
    d = dict(meta.to_json(), format_version=version, checksums=sums)
    with open(os.path.join(path, ck_snapshot.META_FILE), "w") as f:
        json.dump(d, f)


def test_format_2_snapshot_gets_its_value_means_rebuilt_on_load(tmp_path):
    caches = make_caches(70, capacity=80)
    ck.save_snapshot(tmp_path / "old", caches, list(range(70)), **FP)
    _rewrite_as_format(tmp_path / "old", 2)
    got, _, meta = ck.load_snapshot(tmp_path / "old", capacity=80)  # checksums verified too
    assert meta.format_version == 2
    for a, b in zip(caches, got):
        assert_bitwise_equal(a, b)  # the means rebuilt from the values: what prefill built


def test_format_1_snapshot_gets_its_codes_rebuilt_on_load(tmp_path):
    caches = make_caches(70, capacity=80, d=16)
    ck.save_snapshot(tmp_path / "old", caches, list(range(70)), **FP)
    _rewrite_as_format(tmp_path / "old", 1)
    assert ck.read_meta(tmp_path / "old").format_version == 1
    got, toks, meta = ck.load_snapshot(tmp_path / "old", capacity=80)  # checksums verified too
    assert meta.format_version == 1 and toks == list(range(70))
    for a, b in zip(caches, got):
        assert np.array_equal(np.asarray(a.rot_signs), np.asarray(b.rot_signs))
        for x, y in zip(a.dense_codes(), b.dense_codes()):  # rebuilt from the keys: as prefill built them
            assert np.array_equal(np.asarray(x[:, :, :70]).view(np.uint8), np.asarray(y[:, :, :70]).view(np.uint8))
        assert np.array_equal(np.asarray(a.dense_keys()[:, :, :70]).view(np.uint8),
                              np.asarray(b.dense_keys()[:, :, :70]).view(np.uint8))
        assert np.array_equal(np.asarray(a.value_means), np.asarray(b.value_means))

