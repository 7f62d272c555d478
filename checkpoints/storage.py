"""What the disk says: storage failures as one ``StorageError``, Orbax's background noise
routed to a debug log, and temporary directories marked by their writer's lock.

- :func:`storage_error`: an ``OSError`` (or a tensorstore error naming an OS error code)
  as a :class:`~alaya_jax.errors.StorageError` naming the cause ("no space left on
  device"), or None when the exception is not a storage failure (then it is a bug and
  is re-raised as it is).
- :func:`route_background_noise`: when an Orbax write fails, its background threads
  keep failing after the save has raised — absl ``ERROR`` lines, asyncio "Task exception
  was never retrieved", tensorstore callbacks hitting a closed event loop, coroutines
  collected at exit — each with a traceback. They repeat the one failure the save
  raised, so they go to the ``alaya.storage`` logger at DEBUG instead of stderr.
- :class:`TempDir` / :func:`leftovers`: a temporary directory ``<parent>/.tmp-<stem>``
  is created only after its writer holds an exclusive ``flock`` on ``.tmp-<stem>.lock``
  beside it (a file that appears under that name already locked), and the lock file is
  removed only after the directory is gone (renamed
  into place or deleted). A directory whose lock can be taken belongs to a process
  that is gone (the kernel drops a dead process's locks) and is removed; one whose lock
  is held is a save in progress and is never touched. Directories without a lock file
  (left by an older alaya-jax) are removed by age only.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import fcntl
import logging
import os
import re
import shutil
import sys
import time
import uuid
from typing import Optional

from alaya_jax.errors import StorageError, UserError

log = logging.getLogger("alaya.storage")

TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
PENDING_SUFFIX = ".new"
_NO_SPACE = {_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT}
_CAUSES = {_errno.ENOSPC: "no space left on device", _errno.EFBIG: "file too large (a file-size limit)",
           _errno.EDQUOT: "disk quota exceeded", _errno.EROFS: "read-only file system",
           _errno.EACCES: "permission denied", _errno.EPERM: "operation not permitted",
           _errno.EIO: "input/output error"}
# tensorstore's errors are ValueErrors whose text carries the OS error ("[os_error_code='28']"
# or only its message).
_TS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_TEXTS = {"No space left on device": _errno.ENOSPC, "File too large": _errno.EFBIG,
             "Disk quota exceeded": _errno.EDQUOT, "Read-only file system": _errno.EROFS,
             "Permission denied": _errno.EACCES}


def _errno_of(exc: BaseException) -> Optional[int]:
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e.errno
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        m = _TS_CODE.search(text)
        if m:
            return int(m.group(1))
        for needle, code in _TS_TEXTS.items():
            if needle in text:
                return code
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return None


def storage_error(exc: BaseException, action: str, path: str) -> Optional[StorageError]:
    """``exc`` as a ``StorageError`` ("{action} {path}: {cause}"), or None when it is not a
    storage failure (a ``UserError`` never is: it already says what is wrong)."""
    if isinstance(exc, UserError) and not isinstance(exc, StorageError):
        return None
    code = _errno_of(exc)
    if code is None:
        return None
    name = _errno.errorcode.get(code, str(code))
    cause = _CAUSES.get(code) or os.strerror(code).lower()
    return StorageError(action, path, f"{cause} ({name})", errno=code, no_space=code in _NO_SPACE)


# ----------------------------------------------------------------------------- background noise

_routed = False


def _from_background(exc: Optional[BaseException], obj) -> bool:
    """An exception of Orbax's / tensorstore's background machinery (see the module doc)."""
    code = getattr(obj, "cr_code", None) or getattr(getattr(obj, "get_coro", lambda: None)(), "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    tb = getattr(exc, "__traceback__", None)
    files = []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if any("orbax" in f or "tensorstore" in f for f in files):
        return True
    # tensorstore's done-callbacks scheduling onto the event loop of a save that has failed
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and bool(files)
            and all(f.endswith(os.path.join("asyncio", "base_events.py")) for f in files))


class _BackgroundFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname or "orbax" in record.getMessage()[:2000]:
            log.debug("%s (from %s): %s", record.levelname, record.name, record.getMessage())
            return False
        return True


def route_background_noise() -> None:
    """Route Orbax's background failures to ``alaya.storage`` at DEBUG (idempotent)."""
    global _routed
    if _routed:
        return
    _routed = True
    flt = _BackgroundFilter()
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(flt)
    previous = sys.unraisablehook

    def hook(unraisable):
        try:
            routed = _from_background(unraisable.exc_value, unraisable.object)
        except BaseException:  # at interpreter exit, anything may fail: keep the default
            routed = False
        if not routed:
            return previous(unraisable)
        try:
            log.debug("background: %s: %s", type(unraisable.exc_value).__name__, unraisable.exc_value)
        except BaseException:  # logging may be gone at exit
            pass

    sys.unraisablehook = hook


# ----------------------------------------------------------------------------- temporary directories


class TempDir:
    """A new directory ``<parent>/.tmp-<stem>-<random>``, marked by its writer's lock (see
    the module doc). ``release()`` (idempotent) removes what is left of it, then the lock."""

    def __init__(self, parent: str, stem: str):
        self.path = os.path.join(parent, f"{TMP_PREFIX}{stem}-{uuid.uuid4().hex[:12]}")
        self.lock_path = self.path + LOCK_SUFFIX
        # The lock file appears under its name already locked (made under another name, locked,
        # then renamed): whoever finds a lock file it can lock knows its writer is gone.
        pending = self.lock_path + PENDING_SUFFIX
        self._fd: Optional[int] = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._fd, f"{os.getpid()}\n".encode())  # for people looking; the lock is what counts
            os.rename(pending, self.lock_path)
            os.mkdir(self.path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        _unlink_quietly(self.lock_path)
        _unlink_quietly(self.lock_path + PENDING_SUFFIX)
        os.close(self._fd)
        self._fd = None


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A temporary directory found under a parent. ``state``: "orphaned" (its writer is
    gone), "in_progress" (its writer holds the lock), "unmarked" (no lock file: an older
    alaya-jax's; ``age_s`` decides)."""

    name: str
    bytes: int
    state: str
    age_s: float


def tree_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (0 when it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total


def _probe(lock_path: str) -> tuple[str, Optional[int]]:
    """``("gone", fd holding the lock)`` when the writer of ``lock_path`` is gone (the caller
    closes ``fd``), ``("held", None)`` while it holds the lock, ``("none", None)`` when there
    is no lock file."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return "none", None
    except OSError:
        return "held", None  # unreadable: treat as in use
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "held", None
    return "gone", fd


def leftovers(parent: str, *, remove_unmarked_after_s: Optional[float] = None,
              remove: bool = True) -> tuple[list[Leftover], list[Leftover]]:
    """``(removed, kept)`` temporary directories of ``parent``: with ``remove``, those whose
    writer is gone are removed, and unmarked ones older than ``remove_unmarked_after_s``
    (None: kept); saves in progress are always kept. Lock files left without a directory
    (a writer killed between its rename and its unlink) are removed too."""
    removed, kept = [], []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed, kept
    now = time.time()
    for n in names:
        if not n.startswith(TMP_PREFIX):
            continue
        p = os.path.join(parent, n)
        if n.endswith(LOCK_SUFFIX):
            # a lock without its directory: its writer died between its rename and its unlink
            if remove and not os.path.exists(p[: -len(LOCK_SUFFIX)]):
                state, fd = _probe(p)
                if fd is not None:
                    if not os.path.exists(p[: -len(LOCK_SUFFIX)]):
                        _unlink_quietly(p)
                    os.close(fd)
            continue
        if n.endswith(LOCK_SUFFIX + PENDING_SUFFIX):  # held for microseconds by a live writer
            if remove and _age(p, now) > 60:
                _unlink_quietly(p)
            continue
        if not os.path.isdir(p):
            continue
        age = _age(p, now)
        state, fd = _probe(p + LOCK_SUFFIX)
        if state == "held":
            kept.append(Leftover(n, tree_bytes(p), "in_progress", age))
            continue
        try:
            if not os.path.isdir(p):  # finished meanwhile
                continue
            item = Leftover(n, tree_bytes(p), "orphaned" if state == "gone" else "unmarked", age)
            if remove and (state == "gone" or (remove_unmarked_after_s is not None and age >= remove_unmarked_after_s)):
                shutil.rmtree(p, ignore_errors=True)
                if state == "gone":
                    _unlink_quietly(p + LOCK_SUFFIX)
            (kept if os.path.exists(p) else removed).append(item)
        finally:
            if fd is not None:
                os.close(fd)
    return removed, kept


def _age(path: str, now: float) -> float:
    try:
        return now - os.stat(path).st_mtime
    except OSError:
        return 0.0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
