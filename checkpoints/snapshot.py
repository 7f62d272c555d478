"""Orbax snapshots of prefilled contexts: one KV store per layer plus its token ids.

On disk a snapshot is one directory::

    <path>/
      state/        Orbax checkpoint of {"layers": [KVStore fields, ...]} with the
                    block axis trimmed to the valid blocks (ceil(num_tokens / Bk))
      tokens.npy    int32 [num_tokens]
      dipr_beta.npy f32 [num_layers, Hq], only when the caches carry calibrated DIPR βs
                    (``KVStore.dipr_beta``); snapshots without it load with ``dipr_beta=None``
      meta.json     SnapshotMeta, incl. sha256 of every other file (written last)

``save_snapshot`` writes everything into a temporary sibling directory, fsyncs
it, then renames it to ``<path>``: a snapshot is visible only when whole, and a
process killed at any point leaves either nothing or a complete snapshot
(plus, at worst, a ``.tmp-*`` sibling that readers ignore, marked by its writer's lock so
that ``checkpoints.storage.leftovers`` removes it once that process is gone). A save
the storage refuses (disk full, file-size limit, permission denied, read-only) raises
one ``alaya_jax.errors.StorageError`` naming the cause; Orbax's background threads'
repeats of that failure go to the ``alaya.storage`` debug log.

``load_snapshot`` checks the format version, the fingerprints, the dtype and the
block size before reading any array, then the checksums, then restores through
an abstract tree of ``jax.ShapeDtypeStruct`` onto the requested sharding and
pads the block axis back to the requested capacity.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.errors import UserError
from checkpoints.storage import TempDir, route_background_noise, storage_error
from alaya_jax.store import kv_store
from alaya_jax.store.kv_store import KVStore

#: Format 3 stores the block value means (``KVStore.value_means``) beside keys, values and the
#: per-key codes. Older formats are still read: format 2 (codes, no value means) gets its means
#: rebuilt from the values on load; format 1 (block min/max summaries, no codes) its codes and means.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
META_FILE = "meta.json"
TOKENS_FILE = "tokens.npy"
BETA_FILE = "dipr_beta.npy"
STATE_DIR = "state"


# ----------------------------------------------------------------------------- errors


class SnapshotError(UserError, ValueError):
    """Base class: a snapshot cannot be saved or loaded. ``str(e)`` is a user-facing message."""


class CorruptSnapshotError(SnapshotError):
    """A file is missing, unreadable, or does not match its recorded checksum."""


class IncompatibleSnapshotError(SnapshotError):
    """The snapshot is whole but was made for another model, tokenizer, dtype,
    block size or on-disk format version."""


class SnapshotExistsError(SnapshotError):
    """``save_snapshot`` target already exists."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with the given id (or name)."""


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class SnapshotMeta:
    format_version: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    created: str
    name: Optional[str] = None
    checksums: dict = dataclasses.field(default_factory=dict)  # relative path -> sha256 hex
    snapshot_id: Optional[str] = None  # set by ContextDB (the directory name)
    aliases: tuple = ()  # more names of the same snapshot (a later save of it under another name)

    @property
    def num_blocks(self) -> int:
        """Blocks stored on disk (the valid ones)."""
        return -(-self.num_tokens // self.block_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SnapshotMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise CorruptSnapshotError(f"meta.json lacks field(s) {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        if "aliases" in kw:
            if not isinstance(kw["aliases"], list) or not all(isinstance(a, str) for a in kw["aliases"]):
                raise CorruptSnapshotError(f"meta.json: aliases must be a list of strings, got {kw['aliases']!r}")
            kw["aliases"] = tuple(kw["aliases"])
        return cls(**kw)


def read_meta(path: str | os.PathLike) -> SnapshotMeta:
    """Read ``<path>/meta.json``. Checks the format version (and nothing else)."""
    path = os.fspath(path)
    mpath = os.path.join(path, META_FILE)
    try:
        with open(mpath, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        if not os.path.isdir(path):
            raise CorruptSnapshotError(f"no snapshot at {path}") from None
        raise CorruptSnapshotError(f"snapshot {path} has no {META_FILE} (incomplete or not a snapshot)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSnapshotError(f"snapshot {path}: {META_FILE} is unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise CorruptSnapshotError(f"snapshot {path}: {META_FILE} is not a JSON object")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IncompatibleSnapshotError(
            f"snapshot {path} has format version {version!r}; this alaya-jax reads format versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        return SnapshotMeta.from_json(raw)
    except TypeError as e:
        raise CorruptSnapshotError(f"snapshot {path}: bad {META_FILE} ({e})") from None


def check_compatible(
    meta: SnapshotMeta,
    *,
    expect_model: Optional[str] = None,
    expect_tokenizer: Optional[str] = None,
    expect_dtype: Any = None,
    expect_block_size: Optional[int] = None,
    where: str = "snapshot",
) -> None:
    """Raise ``IncompatibleSnapshotError`` naming the first mismatch (``None`` = don't check)."""
    if expect_model is not None and meta.model_fingerprint != expect_model:
        raise IncompatibleSnapshotError(
            f"{where} was made with model {meta.model_fingerprint}, this model is {expect_model}"
        )
    if expect_tokenizer is not None and meta.tokenizer_fingerprint != expect_tokenizer:
        raise IncompatibleSnapshotError(
            f"{where} was made with tokenizer {meta.tokenizer_fingerprint}, this tokenizer is {expect_tokenizer}"
        )
    if expect_dtype is not None and meta.dtype != dtype_name(expect_dtype):
        raise IncompatibleSnapshotError(
            f"{where} was made with dtype {meta.dtype}, this model uses {dtype_name(expect_dtype)}"
        )
    if expect_block_size is not None and meta.block_size != expect_block_size:
        raise IncompatibleSnapshotError(
            f"{where} was made with block size {meta.block_size}, this engine uses {expect_block_size}"
        )


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable sha256 hex digest (first ``length`` chars) of strings, bytes, numbers,
    arrays, dataclasses, dicts, lists and pytrees of those. Arrays hash their dtype,
    shape and bytes (so a model fingerprint can be ``fingerprint(config, params)``;
    note that hashing device arrays copies them to the host)."""
    h = hashlib.sha256()

    def feed(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            h.update(repr((type(x).__name__, x)).encode())
        elif isinstance(x, bytes):
            h.update(b"bytes%d:" % len(x) + x)
        elif isinstance(x, (np.ndarray, np.generic, jax.Array)) or hasattr(x, "__array__"):
            a = np.asarray(x)
            h.update(f"array{a.dtype.name}{a.shape}:".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            h.update(type(x).__name__.encode())
            for f in dataclasses.fields(x):
                h.update(f.name.encode())
                feed(getattr(x, f.name))
        elif isinstance(x, dict):
            h.update(b"dict%d" % len(x))
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"seq%d" % len(x))
            for v in x:
                feed(v)
        else:
            leaves, treedef = jax.tree_util.tree_flatten(x)
            if len(leaves) == 1 and leaves[0] is x:
                h.update(repr(x).encode())
            else:
                h.update(str(treedef).encode())
                for v in leaves:
                    feed(v)

    for p in parts:
        feed(p)
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------- checks


def check_caches(caches: Sequence[KVStore], num_tokens: int) -> KVStore:
    """Layer 0 of ``caches`` after checking that they can be saved as one snapshot of ``num_tokens``
    tokens: B=1 ``KVStore``s of equal shapes and dtype, each holding exactly ``num_tokens``."""
    if not caches:
        raise SnapshotError("nothing to save: the caches tuple is empty")
    first = caches[0]
    for i, c in enumerate(caches):
        if not isinstance(c, KVStore):
            raise SnapshotError(f"layer {i}: expected a KVStore, got {type(c).__name__}")
        if c.keys.shape != first.keys.shape or c.dtype != first.dtype:
            raise SnapshotError(
                f"layer {i} store {tuple(c.keys.shape)} {c.dtype} differs from layer 0 "
                f"{tuple(first.keys.shape)} {first.dtype}"
            )
        if c.batch != 1:
            raise SnapshotError(f"snapshots hold one sequence; layer {i} has batch {c.batch}")
        if (c.dipr_beta is None) != (first.dipr_beta is None) or (
                c.dipr_beta is not None and c.dipr_beta.shape != first.dipr_beta.shape):
            raise SnapshotError(f"layer {i}: calibrated DIPR βs {None if c.dipr_beta is None else c.dipr_beta.shape} "
                                f"differ from layer 0's {None if first.dipr_beta is None else first.dipr_beta.shape}")
        length = int(np.asarray(c.lengths)[0])
        if length != num_tokens:
            raise SnapshotError(
                f"layer {i} holds {length} positions but {num_tokens} token ids were given"
            )
    return first


# ----------------------------------------------------------------------------- file helpers


def _stage(name: str) -> None:
    """Crash-test hook: called between the steps of a save. A no-op; the crash tests
    replace it in a subprocess to kill the process at a given step."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on a thread pool (hashlib releases the GIL on large reads)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1, 16)) as ex:
        return list(ex.map(fn, items))


def walk_files(root: str) -> list[str]:
    """Relative paths (with '/') of every regular file under root, sorted."""
    out = []
    for dirpath, _, files in os.walk(root):
        for fn in files:
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _orbax():
    import orbax.checkpoint as ocp  # imported lazily: slow to import

    route_background_noise()
    return ocp


# ----------------------------------------------------------------------------- save


def save_snapshot(
    path: str | os.PathLike,
    caches: Sequence[KVStore],
    tokens: Sequence[int],
    *,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    name: Optional[str] = None,
    snapshot_id: Optional[str] = None,
    exist_ok: bool = False,
) -> SnapshotMeta:
    """Save a prefilled context (``caches``: one B=1 ``KVStore`` per layer holding
    exactly ``len(tokens)`` positions) to the directory ``path``, atomically.

    Only the valid blocks are written. Raises ``SnapshotExistsError`` if ``path``
    exists (or, with ``exist_ok``, returns the existing snapshot's meta — the
    existing snapshot is not compared with the new one)."""
    path = os.path.abspath(os.fspath(path))
    tokens_np = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, dtype=np.int64)
    if tokens_np.ndim != 1 or tokens_np.size == 0:
        raise SnapshotError(f"tokens must be a non-empty 1-D sequence, got shape {tokens_np.shape}")
    if tokens_np.min() < 0 or tokens_np.max() > np.iinfo(np.int32).max:
        raise SnapshotError("token ids must fit in int32 and be non-negative")
    n = int(tokens_np.size)
    caches = tuple(caches)
    first = check_caches(caches, n)
    if os.path.exists(path):
        if exist_ok:
            return read_meta(path)
        raise SnapshotExistsError(f"snapshot {path} already exists")

    bk = first.block_size
    nb = kv_store.num_blocks_for(n, bk)
    tree = {"layers": [kv_store.to_arrays(c, num_blocks=nb) for c in caches]}
    parent = os.path.dirname(path)
    tmp_dir = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp_dir = TempDir(parent, os.path.basename(path))
        tmp = tmp_dir.path
        ocp = _orbax()
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(os.path.join(tmp, STATE_DIR), tree)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        _stage("after_arrays")
        buf = _npy_bytes(tokens_np.astype(np.int32))
        _write_file(os.path.join(tmp, TOKENS_FILE), buf)
        _stage("after_tokens")
        if first.dipr_beta is not None:
            betas = np.stack([np.asarray(c.dipr_beta, np.float32)[0] for c in caches])  # [L, Hq]
            _write_file(os.path.join(tmp, BETA_FILE), _npy_bytes(betas))
        _fsync_tree(tmp)
        rels = walk_files(tmp)
        checksums = dict(zip(rels, _parallel_map(lambda r: sha256_file(os.path.join(tmp, r)), rels)))
        meta = SnapshotMeta(
            format_version=FORMAT_VERSION,
            model_fingerprint=str(model_fingerprint),
            tokenizer_fingerprint=str(tokenizer_fingerprint),
            dtype=dtype_name(first.dtype),
            block_size=bk,
            num_layers=len(caches),
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim,
            num_tokens=n,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            name=name,
            checksums=checksums,
            snapshot_id=snapshot_id,
        )
        _stage("before_meta")
        write_meta(tmp, meta)
        _stage("before_rename")
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            # A snapshot appeared at `path` meanwhile (another writer): keep theirs.
            if exist_ok:
                return read_meta(path)
            raise SnapshotExistsError(f"snapshot {path} already exists (written meanwhile)") from None
        _fsync_dir(parent)
        _stage("after_rename")
        return meta
    except Exception as e:
        err = storage_error(e, "cannot write the snapshot", path)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp_dir is not None:
            tmp_dir.release()


def write_meta(path: str, meta: SnapshotMeta) -> None:
    """Write ``<path>/meta.json`` (a new file: fsynced, then renamed over any old one)."""
    tmp = os.path.join(path, f".{META_FILE}.tmp")
    _write_file(tmp, json.dumps(meta.to_json(), indent=1, sort_keys=True).encode())
    os.rename(tmp, os.path.join(path, META_FILE))
    _fsync_dir(path)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.save(bio, a, allow_pickle=False)
    return bio.getvalue()


# ----------------------------------------------------------------------------- load


def verify_checksums(path: str | os.PathLike, meta: Optional[SnapshotMeta] = None) -> SnapshotMeta:
    """Re-hash every file listed in meta.json; raise ``CorruptSnapshotError`` naming
    the first missing or mismatching file. Returns the meta."""
    path = os.fspath(path)
    meta = read_meta(path) if meta is None else meta
    if not meta.checksums:
        raise CorruptSnapshotError(f"snapshot {path}: meta.json lists no checksums")
    rels = sorted(meta.checksums)

    def one(rel):
        try:
            return sha256_file(os.path.join(path, *rel.split("/")))
        except FileNotFoundError:
            return CorruptSnapshotError(f"snapshot {path}: file {rel} is missing")
        except OSError as e:
            return CorruptSnapshotError(f"snapshot {path}: file {rel} is unreadable ({e})")

    for rel, got in zip(rels, _parallel_map(one, rels)):
        want = meta.checksums[rel]
        if isinstance(got, Exception):
            raise got
        if got != want:
            raise CorruptSnapshotError(
                f"snapshot {path}: checksum mismatch in {rel} (file is corrupt: sha256 {got[:16]}…, "
                f"expected {want[:16]}…)"
            )
    return meta


def load_tokens(path: str | os.PathLike, meta: Optional[SnapshotMeta] = None, *, verify: bool = False) -> list[int]:
    """Token ids of a snapshot (cheap: reads tokens.npy only)."""
    path = os.fspath(path)
    fp = os.path.join(path, TOKENS_FILE)
    if verify:
        meta = read_meta(path) if meta is None else meta
        want = meta.checksums.get(TOKENS_FILE)
        if want is None or sha256_file(fp) != want:
            raise CorruptSnapshotError(f"snapshot {path}: checksum mismatch in {TOKENS_FILE}")
    try:
        arr = np.load(fp, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptSnapshotError(f"snapshot {path}: {TOKENS_FILE} is unreadable ({e})") from None
    if meta is not None and arr.shape != (meta.num_tokens,):
        raise CorruptSnapshotError(
            f"snapshot {path}: {TOKENS_FILE} holds {arr.shape} ids, meta says {meta.num_tokens}"
        )
    return arr.astype(np.int64).tolist()


def _load_betas(path: str, meta: SnapshotMeta) -> Optional[np.ndarray]:
    """The calibrated DIPR βs f32 [num_layers, Hq] of a snapshot, or None when it has none."""
    bpath = os.path.join(path, BETA_FILE)
    if not os.path.exists(bpath):
        return None
    try:
        betas = np.load(bpath, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptSnapshotError(f"snapshot {path}: {BETA_FILE} is unreadable ({e})") from None
    if betas.ndim != 2 or betas.shape[0] != meta.num_layers or betas.dtype != np.float32:
        raise CorruptSnapshotError(f"snapshot {path}: {BETA_FILE} holds {betas.dtype} {betas.shape}, "
                                   f"expected float32 [{meta.num_layers}, Hq]")
    return betas


def abstract_tree(meta: SnapshotMeta, sharding=None) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree that ``state/`` holds (trimmed block axis), for the
    snapshot's format version."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = kv_store.abstract_arrays(batch=1, num_kv_heads=meta.num_kv_heads, num_blocks=meta.num_blocks,
                                      block_size=meta.block_size, head_dim=meta.head_dim, dtype=meta.dtype,
                                      sharding=sharding)

    def layer():
        if meta.format_version == 1:  # keys, values, lengths and block min/max summaries; no codes
            summ = jax.ShapeDtypeStruct((1, meta.num_kv_heads, meta.num_blocks, meta.head_dim), jnp.float32,
                                        sharding=sharding)
            return {**{f: arrays[f] for f in ("keys", "values", "lengths")}, "kmin": summ, "kmax": summ}
        if meta.format_version == 2:  # codes, no block value means
            return {f: a for f, a in arrays.items() if f != "value_means"}
        return dict(arrays)

    return {"layers": [layer() for _ in range(meta.num_layers)]}


def _store_from_tree(layer: dict, meta: SnapshotMeta) -> KVStore:
    """A restored layer as a ``KVStore``; format-1 layers get their codes built from the keys
    (default rotation seed), format-1 and -2 layers their block value means from the values."""
    if meta.format_version == 1:
        signs = jnp.asarray(kv_store.rotation_signs(meta.num_kv_heads, meta.head_dim,
                                                    seed=kv_store.DEFAULT_CODE_SEED))
        codes, scale, err = kv_store.key_codes(layer["keys"], signs)
        layer = dict(layer, codes=codes, code_scale=scale, code_err=err, rot_signs=signs)
    if meta.format_version < 3:
        layer = dict(layer, value_means=kv_store.block_value_means(layer["values"], layer["lengths"]))
    return kv_store.from_arrays(layer)


def load_snapshot(
    path: str | os.PathLike,
    *,
    expect_model: Optional[str] = None,
    expect_tokenizer: Optional[str] = None,
    expect_dtype: Any = None,
    expect_block_size: Optional[int] = None,
    capacity: Optional[int] = None,
    sharding=None,
    verify: bool = True,
) -> tuple[tuple[KVStore, ...], list[int], SnapshotMeta]:
    """Load a snapshot: ``(caches, tokens, meta)``.

    Checks (in this order, each failure a ``SnapshotError`` subclass naming what is
    wrong): meta.json present and of a known format version; model, tokenizer,
    dtype and block size against the ``expect_*`` values given (``None`` = not
    checked); sha256 of every file (``verify=False`` skips this: hashing costs
    about a second per GB); shapes of the stored arrays. The arrays are restored
    through an abstract tree onto ``sharding`` (default: the first device), then the
    block axis is padded with empty blocks to hold ``capacity`` positions (default:
    the stored blocks only)."""
    path = os.fspath(path)
    meta = read_meta(path)
    check_compatible(meta, expect_model=expect_model, expect_tokenizer=expect_tokenizer,
                     expect_dtype=expect_dtype, expect_block_size=expect_block_size,
                     where=f"snapshot {path}")
    if capacity is not None and capacity < meta.num_tokens:
        raise SnapshotError(
            f"capacity {capacity} is smaller than the snapshot's {meta.num_tokens} tokens"
        )
    if verify:
        verify_checksums(path, meta)
    tokens = load_tokens(path, meta)
    target = abstract_tree(meta, sharding)
    ocp = _orbax()
    state = os.path.join(path, STATE_DIR)
    if not os.path.isdir(state):
        raise CorruptSnapshotError(f"snapshot {path}: {STATE_DIR}/ is missing")
    ckptr = ocp.StandardCheckpointer()
    try:
        restored = ckptr.restore(os.path.abspath(state), target)
    except Exception as e:  # orbax/tensorstore raise many types
        raise CorruptSnapshotError(f"snapshot {path}: cannot restore arrays ({type(e).__name__}: {e})") from e
    finally:
        ckptr.close()
    betas = _load_betas(path, meta)
    caches = []
    for i, layer in enumerate(restored["layers"]):
        store = _store_from_tree(layer, meta)
        if betas is not None:
            store = store.replace(dipr_beta=jax.device_put(betas[i][None], store.lengths.sharding))
        if store.keys.shape != target["layers"][i]["keys"].shape:
            raise CorruptSnapshotError(f"snapshot {path}: layer {i} has shape {store.keys.shape}")
        if int(np.asarray(store.lengths)[0]) != meta.num_tokens:
            raise CorruptSnapshotError(
                f"snapshot {path}: layer {i} length {int(np.asarray(store.lengths)[0])} != "
                f"{meta.num_tokens} tokens in meta"
            )
        if capacity is not None:
            store = kv_store.resize(store, capacity)
        caches.append(store)
    return tuple(caches), tokens, meta
