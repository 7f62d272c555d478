"""The ``alaya`` command line: one module per subcommand (``generate``, ``eval``,
``snapshot``, ``serve``), all sharing :mod:`alaya_jax.cli.common`.

Errors in what the user gave (an empty prompt, a missing file, a bad value, a
prompt longer than the context, a refused snapshot) print one ``error:`` line
and exit with status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from alaya_jax.cli import eval as eval_cmd
from alaya_jax.cli import generate, serve, snapshot, startup
from alaya_jax.cli.common import UsageError

SUBCOMMANDS = (generate, eval_cmd, snapshot, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alaya", description="Long-context inference with an exact DIPR KV store.")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    p.add_argument("--gguf", default=None, help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None,
                   help="compiled programs and parsed weights are cached here (default: $ALAYA_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/alaya-jax; 'off': no caching)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.cache_root = startup.cache_root(args.cache_dir)
        startup.enable_compile_cache(args.cache_root)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"alaya: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alaya: interrupted", file=sys.stderr)
        return 130


__all__ = ["UsageError", "build_parser", "main"]
