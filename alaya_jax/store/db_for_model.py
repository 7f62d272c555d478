"""The context DB of a loaded model: its model and tokenizer fingerprints, and ``open_db``.

``open_db`` binds a :class:`~alaya_jax.store.context_db.ContextDB` to a model, tokenizer,
dtype and block size (by fingerprints), so that a snapshot is only ever loaded by the
model that made it.
"""

from __future__ import annotations


def model_fingerprint(config, engine) -> str:
    """Hash of the model config, dtype and every weight (reads all weights to the host:
    about a second per 500 MB)."""
    import jax

    from checkpoints import fingerprint

    leaves = jax.tree_util.tree_leaves(engine.state)
    return fingerprint(repr(config), str(engine.dtype), leaves)


def tokenizer_fingerprint(tok) -> str:
    """Hash of the tokenizer: its own ``fingerprint`` if it has one, else the serialized
    ``tokenizers.Tokenizer`` it wraps, else its encodings of a probe text."""
    from checkpoints import fingerprint

    fp = getattr(tok, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    for obj in (tok, getattr(tok, "tokenizer", None), getattr(tok, "_tok", None), getattr(tok, "_tokenizer", None)):
        to_str = getattr(obj, "to_str", None)
        if callable(to_str):
            return fingerprint("tokenizers-json", to_str())
    probe = "The quick brown fox, 12345 — naïve café; <|im_start|>user\n def f(x): return x**2\n\n"
    return fingerprint("probe", tok.encode(probe), sorted(getattr(tok, "stop_ids", ()) or ()))


def open_db(path: str, config, tok, engine, **db_kw):
    """The ``ContextDB`` at ``path`` for this model, tokenizer, dtype and block size
    (``db_kw``: more ``ContextDB`` arguments, e.g. the memory tier's)."""
    from alaya_jax.store.context_db import ContextDB

    return ContextDB(path, model_fingerprint=model_fingerprint(config, engine),
                     tokenizer_fingerprint=tokenizer_fingerprint(tok), dtype=engine.dtype,
                     block_size=engine.block_size, **db_kw)


def open_memory_db(config, tok, engine, *, budget_bytes: int, memory_kind: str = "device"):
    """A :class:`~alaya_jax.store.memory_db.MemoryContextDB` (contexts in this process's memory only)
    for this model. Its ids never leave the process, so the model is named by its config and dtype
    and the tokenizer by its fingerprint, without hashing every weight (seconds for a large model)."""
    from checkpoints import fingerprint

    from alaya_jax.store.memory_db import MemoryContextDB

    return MemoryContextDB(model_fingerprint=fingerprint("in-process", repr(config), str(engine.dtype)),
                           tokenizer_fingerprint=tokenizer_fingerprint(tok), dtype=engine.dtype,
                           block_size=engine.block_size, budget_bytes=budget_bytes, memory_kind=memory_kind)
