"""The context DB for a loaded model, and the prompt ids the CLI and the server build.

``open_db`` binds a :class:`~alaya_jax.context_db.ContextDB` to a model, tokenizer,
dtype and block size (by fingerprints); ``prompt_ids`` / ``context_prefix_ids`` are
the one definition of the token ids a prompt about a context becomes, shared by
``alaya generate``, ``alaya snapshot save`` and ``alaya serve`` so that a stored
context is found again by all three.
"""

from __future__ import annotations

# Prompts used to find where the context's tokens stop being stable (see context_prefix_ids).
_PROBES = ("Q", "?\n1. What is it?")


def model_fingerprint(config, engine) -> str:
    """Hash of the model config, dtype and every weight (reads all weights to the host:
    about a second per 500 MB)."""
    import jax

    from checkpoints import fingerprint

    leaves = jax.tree_util.tree_leaves(engine._state)
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
    from alaya_jax.context_db import ContextDB

    return ContextDB(path, model_fingerprint=model_fingerprint(config, engine),
                     tokenizer_fingerprint=tokenizer_fingerprint(tok), dtype=engine.dtype,
                     block_size=engine.block_size, **db_kw)


def prompt_ids(tok, context, prompt: str, *, raw: bool) -> list[int]:
    """The token ids ``alaya generate`` builds (must stay identical to ``cli.cmd_generate``)."""
    if raw:
        return tok.encode((context + "\n\n" if context else "") + prompt)
    user = (context.strip() + "\n\n" + prompt) if context else prompt
    return tok.encode(tok.chat_prompt(user))


def context_prefix_ids(tok, context: str, *, raw: bool) -> list[int]:
    """The token ids that every ``generate --prompt P`` about ``context`` starts with:
    the common prefix of the prompts built for two unlike questions, so that the BPE
    merges across the context/question boundary never make a snapshot unusable."""
    a, b = (prompt_ids(tok, context, p, raw=raw) for p in _PROBES)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
