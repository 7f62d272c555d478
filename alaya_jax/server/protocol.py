"""Request bodies of ``alaya serve``: OpenAI-style validation into engine requests.

Every problem is an :class:`APIError` (status 400/401/404/413) with an OpenAI-style
error object; fields the server does not know are refused by name (a misspelt
``atention`` must not silently run full attention).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from alaya_jax.attention.config import METHODS, AttentionConfig
from alaya_jax.attention.tail import TAIL_MODES
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.sampling import SamplingConfig


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


# Body fields that choose the attention → AttentionConfig fields ("part.field": a field of its
# ``calibration`` / ``kernel`` part), with a type check each. Add a field here (and nowhere else)
# to let requests set it.
ATTENTION_FIELDS = {"attention": ("method", str), "beta": ("beta", float), "tail": ("tail", str),
                    # calibrated DIPR: a β per (layer, head) chosen from the prompt's last queries
                    "dipr_mass": ("calibration.dipr_mass", float), "dipr_keys": ("calibration.dipr_keys", float)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    ids: list[int]
    sampling: SamplingConfig
    attention: AttentionConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


_NUM = (int, float)
_COMMON = {
    "model": str, "max_tokens": int, "temperature": _NUM, "top_p": _NUM, "seed": int, "stop": (str, list),
    "stream": bool, "stream_options": dict, "n": int, "user": str, "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
}
_COMMON.update({k: (_NUM if t is float else t) for k, (_, t) in ATTENTION_FIELDS.items()})
COMPLETION_FIELDS = dict(_COMMON, prompt=(str, list), echo=bool, logprobs=int, suffix=str, best_of=int)
CHAT_FIELDS = dict(_COMMON, messages=list, max_completion_tokens=int, logprobs=bool, top_logprobs=int)
CONTEXT_FIELDS = {"prompt": str, "name": str, "chat": bool}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object",
               _NUM: "a number", (str, list): "a string or an array"}


def check_fields(body: Any, fields: dict) -> dict:
    """``body`` must be a JSON object whose keys are in ``fields`` with values of the
    given types (or null); booleans are not numbers."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for k, v in body.items():
        if k not in fields:
            raise APIError(400, f"unrecognized request argument supplied: {k}", param=k)
        if v is None:
            continue
        t = fields[k]
        ok = isinstance(v, t) and not (isinstance(v, bool) and t is not bool)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok:
            raise APIError(400, f"{k!r} must be {_TYPE_NAMES.get(t, t)}, got {type(v).__name__} {v!r}"[:300],
                           param=k)
    return body


def attention_from_body(body: dict, base: AttentionConfig) -> AttentionConfig:
    """``base`` (the server's ``--attention`` settings) with the request's attention fields."""
    changes, parts = {}, {}
    for k, (field, t) in ATTENTION_FIELDS.items():
        if body.get(k) is not None:
            part, _, name = field.rpartition(".")
            (parts.setdefault(part, {}) if part else changes)[name] = float(body[k]) if t is float else body[k]
    if "method" in changes and changes["method"] not in METHODS:
        raise APIError(400, f"unknown attention {changes['method']!r}; choose one of {', '.join(METHODS)}",
                       param="attention")
    if "tail" in changes and changes["tail"] not in TAIL_MODES:
        raise APIError(400, f"unknown tail {changes['tail']!r}; choose one of {', '.join(TAIL_MODES)}", param="tail")
    try:
        for part, fields in parts.items():
            changes[part] = dataclasses.replace(getattr(base, part), **fields)
        return dataclasses.replace(base, **changes)
    except ConfigError as e:
        given = [field.rpartition(".")[2] for k, (field, _) in ATTENTION_FIELDS.items() if body.get(k) is not None]
        raise APIError(400, f"bad attention settings: {e}", param=next(iter(given), None)) from None


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or up to 4 non-empty strings", param="stop")
    return tuple(stop)


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
    """The engine request of a checked body whose prompt is ``ids``."""
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
        mt = min(default_max_tokens, limits.max_context - len(ids))
    if not 1 <= mt <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {mt}", param="max_tokens")
    if len(ids) + mt > limits.max_context:
        raise APIError(400, f"the prompt has {len(ids)} tokens; with max_tokens {mt} that is {len(ids) + mt}, "
                            f"more than the context of {limits.max_context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    seed = body.get("seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"seed must be between 0 and 2**63-1, got {seed}", param="seed")
    opts = body.get("stream_options") or {}
    if set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
        raise APIError(400, "stream_options may only hold include_usage (a boolean)", param="stream_options")
    sampling = SamplingConfig(max_new_tokens=int(mt), temperature=temperature, top_p=top_p,
                              seed=0 if seed is None else int(seed))
    att = attention_from_body(body, attention).resolve(len(ids))
    return GenerationRequest(ids=list(ids), sampling=sampling, attention=att, stop=_stop(body),
                             stream=bool(body.get("stream")), include_usage=bool(opts.get("include_usage")))


def completion_prompt_ids(body: dict, tok) -> list[int]:
    """``prompt``: a string (raw completion, as ``alaya generate --raw``) or one array of token ids."""
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(p, list):
        if len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise APIError(400, "'prompt' must be a string, an array of token ids, or an array of one of them",
                           param="prompt")
    if isinstance(p, str):
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        return tok.encode(p)
    vocab = getattr(tok, "vocab_size", None)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (vocab is None or t < vocab)
               for t in p):
        raise APIError(400, f"token ids must be integers in [0, {vocab})", param="prompt")
    return list(p)


def chat_prompt_ids(body: dict, tok) -> list[int]:
    """``messages`` in the model's chat template (``Tokenizer.render_chat``: the file's own
    template, ChatML when it has none); one user message is exactly ``alaya generate
    --prompt``'s prompt."""
    msgs = body.get("messages")
    if not msgs:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] has an unsupported role {m['role']!r}", param="messages")
        c = m.get("content")
        if isinstance(c, list):
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            c = "".join(x["text"] for x in c)
        if not isinstance(c, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts", param="messages")
        turns.append(("system" if m["role"] == "developer" else m["role"], c))
    if turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    from models.chat_template import ChatTemplateError

    try:
        text = tok.render_chat([{"role": r, "content": c} for r, c in turns])
    except ChatTemplateError as e:
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
    return tok.encode(text)
