"""Exact DIPR (dynamic inner-product range) attention (docs/design.md §4).

- ``brute_force``: the definition — every key whose raw score is within β of the best,
  from all scores (the reference every other path is tested against).
- ``filter_refine``: the same set over a ``KVStore`` by filter–refine: the code scan,
  the max pass and the refine (``pallas_kernels``), zero false negatives.
- ``calibration``: a β per (layer, query head) chosen from the prompt's own last queries.

May import: ``alaya_jax.store``, ``alaya_jax.attention.masked``, ``alaya_jax.attention.tail`` (the
tail-aware calibration), ``pallas_kernels``.
"""
