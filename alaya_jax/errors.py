"""The errors that mean "what you gave is wrong", as opposed to a bug.

The ``alaya`` CLI prints a :class:`UserError` as one ``alaya: error: ...`` line and
exits with status 2; every other exception surfaces with its traceback (a bug, to be
reported). Library code raises the most specific subclass; each also derives from
the builtin type callers caught before (``ValueError``, ``FileNotFoundError``), so
``except ValueError`` keeps working. This module imports nothing (models/,
checkpoints/ and every subpackage may import it).
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a problem with what the user asked for or gave; ``str(e)`` says what."""


class InputError(UserError, ValueError):
    """A bad value: an empty prompt, a prompt longer than the context, a malformed request."""


class ConfigError(UserError, ValueError):
    """An invalid or inconsistent configuration (attention method, kernel knobs, limits)."""


class UnsupportedModelError(UserError, ValueError):
    """A model file or directory this project cannot load (architecture, tensor types,
    tokenizer, missing or wrong-shaped tensors); the message names what."""


class InputFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


__all__ = ["ConfigError", "InputError", "InputFileNotFoundError", "UnsupportedModelError", "UserError"]
