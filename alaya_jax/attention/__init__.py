"""Decode attention over a store: configs, the method registry and every method (docs/design.md §2, §4).

- ``config``: :class:`~alaya_jax.attention.config.AttentionConfig` (the user's method and
  range), ``KernelConfig`` (how the kernels run) and ``CalibrationConfig`` (self-calibrated DIPR).
- ``registry``: the attention methods by name, one ``attend`` signature.
- ``store_api``: the public functional store API for any model — ``new_store``, ``append``,
  ``attend`` (one layer: decode rows through the registry, prefill rows dense causal; head
  layouts; filtered queries over the stored positions) — and one decode query through the registry.
- ``attention_fn``: the attention function our model calls (``store_api.append``, then ``attend``).
- ``dense``: dense causal attention (prefill, method ``full``) and its backends; ``dense_sharded``: the
  same over a store sharded along the sequence (per-device partials merged by log-sum-exp, §10);
  ``masked``: attention under an explicit key mask, raw scores, sink/window masks;
  ``baselines``: top-k, top-p, Quest and InfLLM-style selections.
- ``tail``: the estimated tail (``AttentionConfig.tail``): exact attention over a method's keys, the
  key codes' estimates and the block value means for the keys it leaves out.
- ``dipr/``: exact DIPR — brute force, filter–refine over the store's codes (unsharded, or shard by shard
  over a mesh: §10; the kernels' estimated tail unsharded only), calibration.

May import: ``alaya_jax.store``, ``alaya_jax.errors``, ``pallas_kernels``; never
``runtime``, ``server`` or ``cli``.
"""
