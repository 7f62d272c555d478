"""Token sampling: greedy, temperature and nucleus (top-p), jittable with traced knobs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from alaya_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """temperature 0 means greedy. ``top_p`` 1.0 means no nucleus cut."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
           sampled: bool = True, nucleus: bool = True) -> jax.Array:
    """logits f32 [B, V] → token ids int32 [B]. Greedy where temperature == 0.

    ``sampled`` / ``nucleus`` (static) leave work out that cannot change the result: with
    ``sampled=False`` every row is greedy (an arg-max; temperature and key unused), with
    ``nucleus=False`` no row cuts its distribution (top_p == 1: no sort of the vocabulary)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    t = jnp.maximum(temperature, 1e-6)
    z = logits.astype(jnp.float32) / t
    if nucleus:
        probs = jax.nn.softmax(z, axis=-1)
        sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        # Smallest probability still inside the nucleus; keep every token at least that likely.
        cutoff = jnp.min(jnp.where(before < top_p, sorted_p, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(probs >= cutoff, z, -jnp.inf)
    drawn = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def draw(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
         sampled: bool = True, nucleus: bool = True) -> tuple[jax.Array, jax.Array]:
    """One token per row and the next keys, in one of two key modes:

    - ``keys`` uint32 [2], ``temperature``/``top_p`` scalars: one key chain for the batch
      (``key, sub = split(key)``, then :func:`sample` with ``sub``), as ``Engine.generate`` uses;
    - ``keys`` [B, 2], ``temperature``/``top_p`` [B]: a chain per row (the server's requests).

    logits f32 [B, V] → (tokens int32 [B], keys of the same shape as ``keys``). ``sampled`` /
    ``nucleus``: see :func:`sample`. Keys advance in either case, so a chain does not depend on
    which of the variants drew each token."""
    if keys.ndim == 1:
        keys, sub = jax.random.split(keys)
        return sample(logits, sub, temperature, top_p, sampled=sampled, nucleus=nucleus), keys
    split = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
    one = lambda lg, k, t, p: sample(lg[None], k, t, p, sampled=sampled, nucleus=nucleus)[0]
    return jax.vmap(one)(logits, split[:, 1], temperature, top_p), split[:, 0]
