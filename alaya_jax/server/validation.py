"""The request schema of ``alaya serve``: every field of every endpoint with its type and
range, checked before anything else reads the body.

A violation is an :class:`~alaya_jax.server.errors.APIError` 400 whose ``param`` names the
field (its path: ``messages[2].content``). Integers are not booleans and not floats
(``5.0`` is not a token count); numbers are finite (NaN, ±Infinity and integers too large
for a float are refused); strings are valid Unicode (no lone surrogates, which JSON's
``\\ud800`` escapes can smuggle in); arrays have bounded lengths; objects refuse fields
they do not know, by name. A JSON ``null`` means "not given" for an optional field.

What depends on the server (``max_tokens`` against ``--max-tokens-limit``, the prompt
against the context, token ids against the vocabulary) and on the attention config's
own rules (β, calibration targets) is checked after this, in ``protocol``.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from typing import Any, Optional, Sequence

from alaya_jax.attention.config import METHODS
from alaya_jax.attention.tail import TAIL_MODES
from alaya_jax.server.errors import APIError


def _show(v: Any) -> str:
    """A short description of a given value for messages."""
    try:
        r = repr(v)
    except ValueError:  # an int too long to print
        r = "<a very long number>"
    name = "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                                     dict: "object"}.get(type(v), type(v).__name__)
    return f"{name} {r[:60]}{'…' if len(r) > 60 else ''}"


def _bad(path: str, what: str, v: Any, *, param: Optional[str] = None) -> APIError:
    return APIError(400, f"{path!r} must be {what}, got {_show(v)}", param=param or path)


class Spec:
    """One field's type and range: ``check(value, path)`` returns the value (ints as int,
    numbers as float) or raises ``APIError`` 400."""

    what = "a value"

    def check(self, v: Any, path: str) -> Any:
        raise NotImplementedError

    def json_type(self, v: Any) -> bool:
        """Whether ``v`` has this spec's JSON type (for choosing among ``AnyOf``)."""
        return True


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    @property
    def what(self):
        return f"an integer between {self.lo} and {self.hi}"

    def json_type(self, v):
        return isinstance(v, int) and not isinstance(v, bool)

    def check(self, v, path):
        if not self.json_type(v) or not self.lo <= v <= self.hi:
            raise _bad(path, self.what, v)
        return int(v)


@dataclasses.dataclass(frozen=True)
class Number(Spec):
    """A finite number in ``[lo, hi]`` (``lo_open``: ``(lo, hi]``); ``None``: unbounded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False

    @property
    def what(self):
        if self.lo is None and self.hi is None:
            return "a finite number"
        if self.hi is None:
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo_open:
            return f"a number in ({self.lo:g}, {self.hi:g}]"
        return f"a number between {self.lo:g} and {self.hi:g}"

    def json_type(self, v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def check(self, v, path):
        if not self.json_type(v):
            raise _bad(path, self.what, v)
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
        ok = math.isfinite(x) and (self.hi is None or x <= self.hi) and (
            self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
        if not ok:
            raise _bad(path, self.what, v)
        return x


class Bool(Spec):
    what = "a boolean"

    def json_type(self, v):
        return isinstance(v, bool)

    def check(self, v, path):
        if not isinstance(v, bool):
            raise _bad(path, self.what, v)
        return v


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    """A string of ``min_len``..``max_len`` characters, valid Unicode; ``choices``: one of
    these (``unknown``: the message's start for another one); ``printable``: no control
    characters (names shown in listings)."""

    min_len: int = 0
    max_len: Optional[int] = None
    choices: Optional[Sequence[str]] = None
    unknown: str = "unknown value"
    printable: bool = False

    @property
    def what(self):
        what = "a non-empty string" if self.min_len else "a string"
        return what if self.max_len is None else f"{what} of at most {self.max_len} characters"

    def json_type(self, v):
        return isinstance(v, str)

    def check(self, v, path):
        if not isinstance(v, str) or len(v) < self.min_len or (self.max_len is not None and len(v) > self.max_len):
            raise _bad(path, self.what, v)
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path!r} is not valid Unicode text (a lone surrogate at character {e.start})",
                           param=path) from None
        if self.printable and any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in v):
            raise APIError(400, f"{path!r} must not hold control characters, got {_show(v)}", param=path)
        if self.choices is not None and v not in self.choices:
            raise APIError(400, f"{self.unknown} {v[:60]!r}; choose one of {', '.join(self.choices)}", param=path)
        return v


@dataclasses.dataclass(frozen=True)
class Array(Spec):
    item: Spec
    min_items: int = 0
    max_items: Optional[int] = None
    what_: Optional[str] = None

    @property
    def what(self):
        if self.what_:
            return self.what_
        n = f" of at most {self.max_items} items" if self.max_items is not None else ""
        return ("a non-empty array" if self.min_items else "an array") + n

    def json_type(self, v):
        return isinstance(v, list)

    def check(self, v, path):
        if not isinstance(v, list) or len(v) < self.min_items or (self.max_items is not None
                                                                  and len(v) > self.max_items):
            raise _bad(path, self.what, v)
        return [self.item.check(x, f"{path}[{i}]") for i, x in enumerate(v)]


@dataclasses.dataclass(frozen=True)
class Object(Spec):
    """A JSON object with these fields (others refused by name; ``null`` = not given)."""

    fields: dict
    required: tuple = ()

    what = "an object"

    def json_type(self, v):
        return isinstance(v, dict)

    def check(self, v, path=""):
        if not isinstance(v, dict):
            if not path:
                raise APIError(400, "the request body must be a JSON object")
            raise _bad(path, self.what, v)
        out = {}
        for k, x in v.items():
            where = f"{path}.{k}" if path else k
            if k not in self.fields:
                if not path:
                    raise APIError(400, f"unrecognized request argument supplied: {k[:100]}", param=k[:100])
                raise APIError(400, f"unrecognized field {k[:100]!r} in {path!r}; it may hold "
                                    f"{', '.join(self.fields)}", param=path)
            if x is not None:
                out[k] = self.fields[k].check(x, where)
        for k in self.required:
            if k not in out:
                where = f"{path}.{k}" if path else k
                raise APIError(400, f"{where!r} is required", param=where)
        return out


@dataclasses.dataclass(frozen=True)
class AnyOf(Spec):
    """The first of ``options`` that accepts the value; when none does, the error of the
    first whose JSON type the value has, else "must be {what}"."""

    options: tuple
    what_: str = "one of several types"

    @property
    def what(self):
        return self.what_

    def json_type(self, v):
        return any(o.json_type(v) for o in self.options)

    def check(self, v, path):
        first = None
        for o in self.options:
            if not o.json_type(v):
                continue
            try:
                return o.check(v, path)
            except APIError as e:
                first = first or e
        raise first or _bad(path, self.what, v)


# ----------------------------------------------------------------------------- the endpoints

INT32 = 2**31 - 1
TEXT = Str()
TOKEN = Int(0, INT32)
TOKENS = Array(TOKEN, min_items=1)
#: stop strings: short (the text stream holds back a tail as long as the longest), non-empty,
#: any Unicode (control characters included: "\n" is a usual stop)
STOP = Str(min_len=1, max_len=256)
NAME = Str(min_len=1, max_len=256, printable=True)
ROLES = ("system", "user", "assistant", "developer")
TEXT_PART = Object({"type": Str(choices=("text",), unknown="unsupported content part type"), "text": TEXT},
                   required=("type", "text"))
MESSAGE = Object({"role": Str(choices=ROLES, unknown="unsupported role"),
                  "content": AnyOf((TEXT, Array(TEXT_PART)), "a string or text parts"),
                  "name": Str(max_len=256)}, required=("role", "content"))

#: Body fields that choose the attention → (AttentionConfig field — "part.field": a field of its
#: ``calibration`` / ``kernel`` part —, the value's spec; its range is the config's own check).
#: Add a field here (and nowhere else) to let requests set it.
ATTENTION_FIELDS = {"attention": ("method", Str(choices=METHODS, unknown="unknown attention")),
                    "beta": ("beta", Number()),
                    "tail": ("tail", Str(choices=TAIL_MODES, unknown="unknown tail")),
                    # calibrated DIPR: a β per (layer, head) chosen from the prompt's last queries
                    "dipr_mass": ("calibration.dipr_mass", Number()),
                    "dipr_keys": ("calibration.dipr_keys", Number())}
_COMMON = {
    "model": Str(max_len=256), "max_tokens": Int(0, INT32), "temperature": Number(0.0, 2.0),
    "top_p": Number(0.0, 1.0, lo_open=True), "seed": Int(0, 2**63 - 1),
    "stop": AnyOf((STOP, Array(STOP, max_items=4)), "a non-empty string or up to 4 non-empty strings"),
    "stream": Bool(), "stream_options": Object({"include_usage": Bool()}), "n": Int(1, 128),
    "user": Str(max_len=256), "presence_penalty": Number(-2.0, 2.0), "frequency_penalty": Number(-2.0, 2.0),
    **{k: spec for k, (_, spec) in ATTENTION_FIELDS.items()},
}
COMPLETION = Object(dict(
    _COMMON,
    prompt=AnyOf((Str(min_len=1), TOKENS, Array(AnyOf((Str(min_len=1), TOKENS), "a string or token ids"),
                                                  min_items=1, max_items=1)),
                 "a string, an array of token ids, or an array of one of them"),
    echo=Bool(), logprobs=Int(0, 20), suffix=TEXT, best_of=Int(1, 128)), required=("prompt",))
CHAT = Object(dict(_COMMON, messages=Array(MESSAGE, min_items=1), max_completion_tokens=Int(0, INT32),
                   logprobs=Bool(), top_logprobs=Int(0, 20)), required=("messages",))
CONTEXT = Object({"prompt": Str(min_len=1), "name": NAME, "chat": Bool()}, required=("prompt",))
