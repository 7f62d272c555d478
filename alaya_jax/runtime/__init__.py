"""Running a model: the engine and what surrounds it (docs/design.md §1, §2).

- ``engine``: :class:`~alaya_jax.runtime.engine.Engine` — jitted prefill, decode and
  teacher-forced scoring around a Flax Llama; caches go in and come out as values.
- ``sampling``: ``SamplingConfig`` and the sampler; ``evaluation``: sparse attention scored
  against full attention (KL, recall, perplexity); ``memory_estimate``: weights + KV store
  bytes before loading a model; ``prompts``: the token ids a prompt about a context becomes;
  ``corpus``: the bundled demo text.
- ``session``: :class:`~alaya_jax.runtime.session.Session` — the functional store API
  (``attention.store_api``) made stateful for one sequence of any model, stored in and reused
  from a ``ContextDB``.

May import: ``alaya_jax.attention``, ``alaya_jax.store``, ``alaya_jax.errors``, ``models``;
never ``server`` or ``cli``.
"""
