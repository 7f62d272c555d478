"""Sparse decode attention over a ragged list of kept blocks per KV head."""

from pallas_kernels.sparse_attention.api import sparse_decode_attention

__all__ = ["sparse_decode_attention"]
