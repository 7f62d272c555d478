"""pallas_kernels: the filter–refine DIPR decode kernels, one folder per op.

- ``key_codes``: the fixed rotation of keys/queries, the per-key 4-bit codes and their
  error bound (plain jnp; runs at prefill and at every append).
- ``code_scan``: the filter — one pass over the codes of every key, candidates per split
  (one kernel: sink/window scores, the scan, the compaction of its candidate lists).
- ``refine_attention``: refine and attend — the exact scores of the candidates (a score pass that
  reads each candidate's key once), the exact max, attention over V of the keys in range ∪ sink ∪
  window (an attend pass); two kernels.

Each kernel folder holds ``reference.py`` (plain jnp), the lowering-specific Pallas body
(``kernel_triton.py``, written for the GPU Triton lowering and run with ``interpret=True``
on CPU) and a public wrapper (``api.py``) that picks one explicitly::

    implementation="reference" | "pallas"     (keyword-only, default "reference")
    interpret=None                            (None -> True on CPU, False on GPU)

A requested Pallas backend that cannot run raises ``BackendUnavailableError``;
nothing ever falls back silently. Each ``api.py`` has ``IMPLEMENTATIONS``, the immutable mapping
from backend name to the function that runs it: the one list of the op's backends, which the
attention config and the CLI read. This package imports nothing else of ours (docs/design.md §1).
"""

from pallas_kernels.code_scan import code_scan
from pallas_kernels.common import BackendUnavailableError, default_rounding_slack
from pallas_kernels.refine_attention import refine_attention

__all__ = [
    "BackendUnavailableError",
    "code_scan",
    "default_rounding_slack",
    "refine_attention",
]
