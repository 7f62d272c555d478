"""Request bodies of ``alaya serve``: validated bodies into engine requests.

Every field is first checked against the endpoint's schema (``server/validation.py``:
type, range, finiteness, lengths; fields the server does not know are refused by name —
a misspelt ``atention`` must not silently run full attention), then against what depends
on this server (limits, vocabulary, the attention config's rules). Every problem is an
:class:`APIError` (status 400/401/404/413) with an OpenAI-style error object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from alaya_jax.attention.config import AttentionConfig
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.server import validation
from alaya_jax.server.errors import APIError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """``max_body_bytes``: larger bodies get 413; ``max_prompt_tokens`` / ``max_tokens``:
    larger prompts / ``max_tokens`` get 400, as does prompt + ``max_tokens`` over
    ``max_context``; ``default_max_tokens``: chat's ``max_tokens`` when not given
    (completions default to 16, as OpenAI's)."""

    max_context: int
    max_prompt_tokens: int
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 4 << 20


ATTENTION_FIELDS = validation.ATTENTION_FIELDS  # body field → (AttentionConfig field, spec)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    ids: list[int]
    sampling: SamplingConfig
    attention: AttentionConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


#: the schemas of the request bodies (server/validation.py)
COMPLETION_FIELDS = validation.COMPLETION
CHAT_FIELDS = validation.CHAT
CONTEXT_FIELDS = validation.CONTEXT


def check_fields(body: Any, schema: validation.Object) -> dict:
    """``body`` checked against an endpoint's ``schema``: the given fields (nulls dropped),
    ints as int and numbers as float; ``APIError`` 400 naming the first bad field."""
    return schema.check(body)


def attention_from_body(body: dict, base: AttentionConfig) -> AttentionConfig:
    """``base`` (the server's ``--attention`` settings) with a checked body's attention fields."""
    changes, parts = {}, {}
    for k, (field, _) in ATTENTION_FIELDS.items():
        if body.get(k) is not None:
            part, _, name = field.rpartition(".")
            (parts.setdefault(part, {}) if part else changes)[name] = body[k]
    try:
        for part, fields in parts.items():
            changes[part] = dataclasses.replace(getattr(base, part), **fields)
        return dataclasses.replace(base, **changes)
    except ConfigError as e:
        given = [field.rpartition(".")[2] for k, (field, _) in ATTENTION_FIELDS.items() if body.get(k) is not None]
        raise APIError(400, f"bad attention settings: {e}", param=next(iter(given), None)) from None


def _unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    for k in ("presence_penalty", "frequency_penalty"):
        if body.get(k) not in (None, 0):
            raise APIError(400, f"{k} is not supported (only 0)", param=k)
    if body.get("echo"):
        raise APIError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.get("suffix"):
        raise APIError(400, "suffix is not supported", param="suffix")


def generation_request(body: dict, ids: list[int], *, limits: RequestLimits, attention: AttentionConfig,
                       default_max_tokens: int) -> GenerationRequest:
    """The engine request of a checked body (``check_fields``) whose prompt is ``ids``.
    Without ``max_tokens``: ``default_max_tokens``, at most the server's limit and what the
    context leaves."""
    _unsupported(body)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                       param="prompt", code="context_length_exceeded")
    mt = body.get("max_tokens")
    if mt is None:
        mt = body.get("max_completion_tokens")
    if mt is None:
        mt = max(1, min(default_max_tokens, limits.max_tokens, limits.max_context - len(ids)))
    if not 1 <= mt <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {mt}", param="max_tokens")
    if len(ids) + mt > limits.max_context:
        raise APIError(400, f"the prompt has {len(ids)} tokens; with max_tokens {mt} that is {len(ids) + mt}, "
                            f"more than the context of {limits.max_context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    opts = body.get("stream_options") or {}
    sampling = SamplingConfig(max_new_tokens=mt, temperature=body.get("temperature", 1.0),
                              top_p=body.get("top_p", 1.0), seed=body.get("seed", 0))
    att = attention_from_body(body, attention).resolve(len(ids))
    stop = body.get("stop") or ()
    return GenerationRequest(ids=list(ids), sampling=sampling, attention=att,
                             stop=(stop,) if isinstance(stop, str) else tuple(stop),
                             stream=body.get("stream", False), include_usage=opts.get("include_usage", False))


def completion_prompt_ids(body: dict, tok) -> list[int]:
    """A checked body's ``prompt``: a string (raw completion, as ``alaya generate --raw``) or
    one array of token ids (each below the vocabulary size)."""
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return tok.encode(p)
    vocab = getattr(tok, "vocab_size", None)
    if vocab is not None and any(t >= vocab for t in p):
        raise APIError(400, f"token ids must be integers in [0, {vocab})", param="prompt")
    return list(p)


def chat_prompt_ids(body: dict, tok) -> list[int]:
    """A checked body's ``messages`` in the model's chat template (``Tokenizer.render_chat``:
    the file's own template, ChatML when it has none); one user message is exactly ``alaya
    generate --prompt``'s prompt."""
    turns = []
    for m in body["messages"]:
        c = m["content"]
        if isinstance(c, list):
            c = "".join(x["text"] for x in c)
        turns.append(("system" if m["role"] == "developer" else m["role"], c))
    if turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    from models.chat_template import ChatTemplateError

    try:
        text = tok.render_chat([{"role": r, "content": c} for r, c in turns])
    except ChatTemplateError as e:
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
    return tok.encode(text)
