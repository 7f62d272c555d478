"""The ``alaya`` command line: one module per subcommand (``generate``, ``eval``,
``snapshot``, ``serve``), all sharing :mod:`alaya_jax.cli.common`.

Errors in what the user gave (an empty prompt, a missing file, a bad value, a
prompt longer than the context, a refused snapshot, a model that cannot be loaded)
are :class:`alaya_jax.errors.UserError` instances: they print one ``alaya: error:`` line and
exit with status 2 — no traceback. A write or read the storage refused (disk full,
file-size limit, permission denied, read-only DB) is an
:class:`alaya_jax.errors.StorageError`: one ``alaya: error:`` line naming the cause and the
path, exit status 74. Any other exception is a bug and surfaces with its traceback
(docs/design.md §7).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from alaya_jax.cli import eval as eval_cmd
from alaya_jax.cli import generate, models, serve, snapshot, startup
from alaya_jax.cli.common import UsageError, add_model_args
from alaya_jax.errors import EXIT_STORAGE, EXIT_USER_ERROR, StorageError, UserError

SUBCOMMANDS = (generate, eval_cmd, snapshot, models, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alaya", description="Long-context inference with an exact DIPR KV store.")
    add_model_args(p)
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    _add_model_args_to_subcommands(p)
    return p


def _add_model_args_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """The model options also after every (sub)subcommand:
    ``alaya generate --model M`` = ``alaya --model M generate``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                add_model_args(sp, suppress=True)
                _add_model_args_to_subcommands(sp)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.cache_root = startup.cache_root(args.cache_dir)
        startup.enable_compile_cache(args.cache_root)
        return args.func(args)
    except UserError as e:
        print(f"alaya: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StorageError as e:
        print(f"alaya: error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        print("alaya: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``alaya`` executable: :func:`main`, then exit at once with its status after flushing
    stdout and stderr. Every write of a subcommand is finished when it returns (snapshots, caches,
    output), so the interpreter's own shutdown (tearing down jax and every array, ~0.7 s on a
    CPU) is skipped."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc if isinstance(rc, int) else 1)


__all__ = ["UsageError", "build_parser", "main", "run"]
