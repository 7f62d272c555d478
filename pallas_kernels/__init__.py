"""pallas_kernels: the DIPR decode kernels, one folder per op.

Each op folder holds ``reference.py`` (plain jnp), ``kernel.py`` (Pallas,
written for the GPU Triton lowering and run with ``interpret=True`` on CPU)
and a public wrapper (``api.py``) that picks one explicitly::

    implementation="reference" | "pallas"     (keyword-only, default "reference")
    interpret=None                            (None -> True on CPU, False on GPU)

A requested Pallas backend that cannot run raises ``BackendUnavailableError``;
nothing ever falls back silently. This package imports nothing else of ours.
"""

from pallas_kernels._common import BackendUnavailableError, default_rounding_slack, suggest_num_splits
from pallas_kernels.block_bounds import block_bounds
from pallas_kernels.lse_merge import merge_attention
from pallas_kernels.range_mask import dipr_range_mask
from pallas_kernels.sparse_attention import sparse_decode_attention

__all__ = [
    "BackendUnavailableError",
    "block_bounds",
    "default_rounding_slack",
    "dipr_range_mask",
    "merge_attention",
    "sparse_decode_attention",
    "suggest_num_splits",
]
