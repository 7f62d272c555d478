"""Chat templates (the Jinja text models ship in ``tokenizer_config.json`` or GGUF ``tokenizer.chat_template``)
rendered the way ``transformers`` renders them: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson``
that keeps non-ASCII text."""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Sequence

from alaya_jax.errors import UnsupportedModelError


class ChatTemplateError(UnsupportedModelError):
    """The template is not valid Jinja, or it refused the messages (``raise_exception``)."""


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from None


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``); errors are
    :class:`ChatTemplateError` naming what the template said."""
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
