"""A user-level cache of parsed GGUF files: what ``load_gguf`` reads (config, tokenizer
metadata, dequantized f32 tensors) saved once as one uncompressed ``.npz`` so that later
loads skip the GGUF parse and the dequantization.

Entries are keyed by the file's size, mtime and a hash of its first and last MiB
(plus this cache's format version): a changed file gets a new entry. Writes are
atomic (a temp file in the same directory, then ``os.replace``); an unreadable entry
is reported, removed and rebuilt from the GGUF.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile

import numpy as np

from models.config import LlamaConfig

FORMAT = 1
_META = "__alaya_meta__"
log = logging.getLogger(__name__)


def entry_key(path: pathlib.Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"alaya-gguf-cache-v{FORMAT}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:24]


def _save(dest: pathlib.Path, config: LlamaConfig, tok_fields: dict, tensors: dict) -> None:
    meta = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"}, "tokenizer": tok_fields}
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **tensors)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read(src: pathlib.Path):
    with np.load(src, allow_pickle=False) as z:
        meta = json.loads(bytes(z[_META]).decode())
        tensors = {k: z[k] for k in z.files if k != _META}
    return meta, tensors


def load_gguf_cached(path, *, dtype: str = "float32", cache_dir):
    """``load_gguf(path, dtype=dtype)`` through the cache in ``cache_dir`` (a directory;
    created when missing)."""
    from models.gguf_loader import config_from_gguf, load_gguf, model_from_tensors, tokenizer_fields
    from models.tokenizer import Tokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        return load_gguf(path, dtype=dtype)  # its own clear error
    dest = pathlib.Path(cache_dir) / f"{path.stem}-{entry_key(path)}.npz"
    if dest.is_file():
        try:
            meta, tensors = _read(dest)
            c = dict(meta["config"])
            from models.config import RopeScaling

            if c.get("rope_scaling") is not None:
                c["rope_scaling"] = RopeScaling(**c["rope_scaling"])
            config = LlamaConfig(**c, dtype=dtype)
            return config, model_from_tensors(config, tensors), Tokenizer(**meta["tokenizer"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("weight cache entry %s is unreadable (%s): rebuilding it from %s", dest, e, path)
            try:
                dest.unlink()
            except OSError:
                pass
    from gguf import GGUFReader

    from models.gguf_loader import _tensors

    try:
        reader = GGUFReader(str(path))
    except Exception:  # load_gguf words the error
        return load_gguf(path, dtype=dtype)
    config = config_from_gguf(reader, dtype=dtype)
    fields = tokenizer_fields(reader)
    tok = Tokenizer(**fields)
    try:
        tensors = _tensors(reader)
    except Exception as e:
        raise ValueError(f"cannot read the tensors of {str(path)!r}: {e}") from None
    model = model_from_tensors(config, tensors)  # strict checks before anything is cached
    try:
        _save(dest, config, fields, tensors)
    except OSError as e:
        log.warning("could not write the weight cache %s: %s", dest, e)
    return config, model, tok
