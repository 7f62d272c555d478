"""A user-level cache of parsed GGUF files: what ``load_gguf`` reads (config, tokenizer
metadata, dequantized f32 tensors under their Hugging Face names, matrices already in the
model's ``[in, out]`` layout) saved once as one uncompressed ``.npz`` so that later loads
skip the GGUF parse, the dequantization and the transposes; beside it the model's abstract
skeleton (``models.weights.abstract_model``). Tensors are written and read one at a time (no whole-model host copy).

Entries are keyed by the file's size, mtime and a hash of its first and last MiB
(plus this cache's format version): a changed file gets a new entry. Writes are
atomic (a temp file in the same directory, then ``os.replace``); an unreadable entry
is reported, removed and rebuilt from the GGUF.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Optional

import numpy as np

from models.config import LlamaConfig

FORMAT = 3  # 1: GGUF-named tensors; 2: HF-named, Q/K un-permuted; 3: matrices stored [in, out]
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


def _write(dest: pathlib.Path, config: LlamaConfig, tok_fields: dict, read, names) -> None:
    """Stream ``read(name)`` for every name into ``dest`` (a temp file, then an atomic rename);
    the projection matrices (``.kernel`` parameters) transposed to the model's layout."""
    import zipfile

    from models.weights import expected_tensors

    meta = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"}, "tokenizer": tok_fields}
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=dest.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            items = [(_META, lambda: np.frombuffer(json.dumps(meta).encode(), np.uint8))]
            kernels = {n for n, (_, p) in expected_tensors(config).items() if p.endswith(".kernel")}
            items += [(n, (lambda n=n: read(n).T) if n in kernels else functools.partial(read, n)) for n in names]
            for name, get in items:
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(get()), allow_pickle=False)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _meta(z) -> dict:
    """The JSON metadata (config, tokenizer fields) of an open entry."""
    return json.loads(bytes(z[_META]).decode())


def _config(meta: dict, dtype: str) -> LlamaConfig:
    from models.config import RopeScaling

    c = dict(meta["config"])
    if c.get("rope_scaling") is not None:
        c["rope_scaling"] = RopeScaling(**c["rope_scaling"])
    return LlamaConfig(**c, dtype=dtype)


def entry_path(path, cache_dir) -> pathlib.Path:
    """Where the cache entry of the GGUF file ``path`` lives (whether or not it exists yet)."""
    path = pathlib.Path(path)
    return pathlib.Path(cache_dir) / f"{path.stem}-{entry_key(path)}.npz"


def cached_config(path, *, dtype: str, cache_dir) -> Optional[LlamaConfig]:
    """The config of ``path`` from its cache entry, without parsing the GGUF file (whose tokenizer
    metadata alone takes seconds to read); None when there is no readable entry."""
    try:
        dest = entry_path(path, cache_dir)
        if not dest.is_file():
            return None
        with np.load(dest, allow_pickle=False) as z:
            return _config(_meta(z), dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_entry(src: pathlib.Path, dtype: str):
    from models.tokenizer import Tokenizer
    from models.weights import expected_tensors, fill_model

    with np.load(src, allow_pickle=False) as z:
        meta = _meta(z)
        config = _config(meta, dtype)
        missing = sorted(set(expected_tensors(config)) - set(z.files))
        if missing:
            raise ValueError(f"entry lacks tensor(s) {missing[:3]}")
        model = fill_model(config, z.__getitem__, kernels_transposed=True, cache_dir=src.parent)
        return config, model, Tokenizer(**meta["tokenizer"])


MAX_ENTRY_BYTES = 4 << 30


def load_gguf_cached(path, *, dtype: str = "float32", cache_dir, max_entry_bytes: int = MAX_ENTRY_BYTES):
    """``load_gguf(path, dtype=dtype)`` through the cache in ``cache_dir`` (a directory;
    created when missing). Models whose f32 weights exceed ``max_entry_bytes`` are loaded
    without the cache (an 8B model would take 32 GB of disk)."""
    from models.gguf_loader import (config_from_gguf, gguf_tensor_reader, load_gguf, open_gguf,
                                    tensor_problems_gguf, tokenizer_fields)
    from models.weights import expected_tensors, parameter_count, raise_problems

    path = pathlib.Path(path)
    if not path.is_file():
        return load_gguf(path, dtype=dtype)  # its own clear error
    dest = entry_path(path, cache_dir)
    if dest.is_file():
        try:
            return _load_entry(dest, dtype)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("weight cache entry %s is unreadable (%s): rebuilding it from %s", dest, e, path)
            try:
                dest.unlink()
            except OSError:
                pass
    reader = open_gguf(path)
    config = config_from_gguf(reader, dtype=dtype)
    fields = tokenizer_fields(reader)
    raise_problems(tensor_problems_gguf(reader, config))  # strict checks before anything is cached
    if 4 * parameter_count(config) > max_entry_bytes:
        log.info("%s: %d parameters, too large for the weight cache; loading it directly", path,
                 parameter_count(config))
        return load_gguf(path, dtype=dtype)
    try:
        _write(dest, config, fields, gguf_tensor_reader(reader, config, path), list(expected_tensors(config)))
    except OSError as e:
        log.warning("could not write the weight cache %s: %s", dest, e)
        return load_gguf(path, dtype=dtype)
    return _load_entry(dest, dtype)
