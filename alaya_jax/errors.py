"""The errors that mean "what you gave is wrong", as opposed to a bug.

The ``alaya`` CLI prints a :class:`UserError` as one ``alaya: error: ...`` line and
exits with status 2, a :class:`StorageError` (the disk refused a read or write) as one
such line with status 74; every other exception surfaces with its traceback (a bug,
to be reported). Library code raises the most specific subclass; each also derives from
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


class StorageError(OSError):
    """The storage refused a read or write: no space left, a file-size or quota limit,
    permission denied, a read-only file system, an I/O error. Neither the user's input nor a
    bug: the CLI prints ``str(e)`` as one line and exits with :data:`EXIT_STORAGE`; the server
    answers with ``cause`` only (no paths).

    ``cause``: what the storage said, without paths ("no space left on device");
    ``path``: the file or directory concerned (a context DB, a snapshot); ``errno``: the OS
    error number when known; ``no_space``: the failure is one of space (ENOSPC, EFBIG,
    EDQUOT)."""

    def __init__(self, action: str, path: str, cause: str, *, errno=None, no_space: bool = False):
        super().__init__(f"{action} {path}: {cause}")
        self.action, self.path, self.cause, self.errno, self.no_space = action, path, cause, errno, no_space

    def __str__(self) -> str:
        return f"{self.action} {self.path}: {self.cause}"


#: Exit statuses of the ``alaya`` CLI (documented in the README): a usage / input error, a
#: storage failure (sysexits.h's EX_IOERR).
EXIT_USER_ERROR = 2
EXIT_STORAGE = 74

__all__ = ["EXIT_STORAGE", "EXIT_USER_ERROR", "ConfigError", "InputError", "InputFileNotFoundError", "StorageError",
           "UnsupportedModelError", "UserError"]
