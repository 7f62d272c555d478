"""Start-up of the ``alaya`` CLI: the user cache directory, JAX's persistent compilation
cache in it, and the weight cache (``models.weight_cache``) beside it.

The cache root is ``--cache-dir``, else ``$ALAYA_CACHE_DIR``, else
``$XDG_CACHE_HOME/alaya-jax`` (``~/.cache/alaya-jax``); ``off`` turns both caches off.
It is never inside the project's source tree (an error names the problem).
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "ALAYA_CACHE_DIR"
_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_root(flag: Optional[str] = None) -> Optional[str]:
    """The cache root directory (absolute), or None when caching is off."""
    from alaya_jax.cli.common import UsageError

    choice = flag if flag is not None else os.environ.get(ENV)
    if choice is not None and choice.strip().lower() in ("off", "none", "0", ""):
        return None
    if choice is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        choice = os.path.join(base, "alaya-jax")
    root = os.path.abspath(os.path.expanduser(choice))
    if os.path.commonpath([root, _PROJECT]) == _PROJECT and os.path.isdir(os.path.join(_PROJECT, "alaya_jax")):
        raise UsageError(f"the cache directory {root} is inside the project tree {_PROJECT}; choose another with "
                         f"--cache-dir or {ENV} (or 'off')")
    return root


def enable_compile_cache(root: Optional[str]) -> None:
    """JAX's persistent compilation cache in ``root``/jax (every compiled program is kept)."""
    if root is None:
        return
    import jax

    path = os.path.join(root, "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def weights_dir(root: Optional[str]) -> Optional[str]:
    return None if root is None else os.path.join(root, "weights")
