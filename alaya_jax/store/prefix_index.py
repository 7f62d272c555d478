"""The context DB's prefix index: chained block hashes → the snapshots that hold that prefix.

Like vLLM's prefix caching: every full block of ``Bk`` tokens gets a chained hash
``h_i = sha256(h_{i-1} || tokens of block i)``, with ``h_{-1}`` (:func:`prefix_seed`)
binding model, tokenizer, dtype and block size, so equal hashes mean equal prefixes of
the same model. A prompt hashes its own blocks and takes the deepest hit
(:meth:`PrefixIndex.deepest`). docs/design.md §5.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import numpy as np


def prefix_seed(model_fingerprint, tokenizer_fingerprint, dtype, block_size) -> bytes:
    """``h_{-1}``: the seed of every chain (and of snapshot ids) in one DB."""
    return hashlib.sha256(
        f"alaya-prefix|{model_fingerprint}|{tokenizer_fingerprint}|{dtype}|{block_size}".encode()
    ).digest()


def block_hashes(seed: bytes, tokens: Sequence[int], block_size: int, max_blocks: Optional[int] = None) -> list[bytes]:
    """The chained hash of each full block of ``tokens`` (at most ``max_blocks``)."""
    arr = np.asarray(tokens, dtype=np.int64)
    nb = len(arr) // block_size
    if max_blocks is not None:
        nb = min(nb, max_blocks)
    buf = memoryview(arr[: nb * block_size].astype("<i4").tobytes())  # one conversion for all blocks
    step = 4 * block_size
    out, h = [], seed
    for i in range(nb):
        d = hashlib.sha256(h)
        d.update(buf[i * step:(i + 1) * step])
        h = d.digest()
        out.append(h)
    return out


class PrefixIndex:
    """Which snapshots (by id) start with each chain of blocks. Not thread-safe on its own:
    the owning DB rebuilds and reads it under its lock."""

    def __init__(self):
        self._index: dict[bytes, list[str]] = {}

    def rebuild(self, hashes_by_id: dict[str, Sequence[bytes]]) -> None:
        """Index every snapshot's block hashes (ids in sorted order)."""
        index: dict[bytes, list[str]] = {}
        for sid, hashes in sorted(hashes_by_id.items()):
            for h in hashes:
                index.setdefault(h, []).append(sid)
        self._index = index

    def deepest(self, hashes: Sequence[bytes], *, prefer: Callable[[str], object]) -> tuple[Optional[str], int]:
        """``(id, blocks)``: a snapshot sharing the most leading blocks with a prompt whose block
        hashes are ``hashes`` (among several, the one of smallest ``prefer(id)``), or ``(None, 0)``."""
        for i in range(len(hashes) - 1, -1, -1):
            ids = self._index.get(hashes[i])
            if ids:
                return min(ids, key=prefer), i + 1
        return None, 0
