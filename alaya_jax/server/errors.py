"""The error answers of ``alaya serve``: :class:`APIError` (an OpenAI-style error object with
its status) and :func:`job_failure`, the one mapping from what failed inside a job to what a
client is told — a storage failure is 507 (no space) or 500 naming the cause, never the
server's paths; the details go to the server's log.
"""

from __future__ import annotations

import re
from typing import Optional

from alaya_jax.errors import StorageError


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_PATH = re.compile(r"(?<![\w.])/[^\s'\"():,]+")


def without_paths(text: str) -> str:
    """``text`` with absolute file paths replaced by ``<path>``."""
    return _PATH.sub("<path>", text)


def job_failure(exc: Optional[BaseException], message: str, what: str) -> APIError:
    """The answer to a job that failed with ``exc`` (``message``: its text when ``exc`` is
    not known): ``what`` ("storing the context", "generation") failed, and why."""
    if isinstance(exc, StorageError):
        status, code = (507, "insufficient_storage") if exc.no_space else (500, "storage_error")
        return APIError(status, f"{what} failed: the server's storage refused it: {exc.cause}", type="server_error",
                        code=code)
    return APIError(500, f"{what} failed: {without_paths(message or '')}"[:500], type="server_error")
