"""``alaya serve``: an OpenAI-compatible HTTP server (docs/design.md §6).

- ``app``: the Starlette routes (thin: validate, submit, stream);
- ``protocol``: request bodies validated into engine requests (``APIError``);
- ``scheduler``: the engine loop with continuous batching (one thread owns the model);
- ``metrics``: Prometheus metrics.

May import: ``alaya_jax.runtime``, ``alaya_jax.attention``, ``alaya_jax.store``,
``checkpoints``, ``models``; never ``cli``.
"""
