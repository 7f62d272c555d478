"""A tiny random-weight engine and what tests do with it (token ids, decode logits)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.sampling import SamplingConfig
from models import Llama, tiny


def tiny_engine() -> Engine:
    """``models.tiny()`` with random weights (seed 0), 1024 positions, blocks of 8, prefill chunks of 32."""
    cfg = dataclasses.replace(tiny(), max_position_embeddings=1024)
    return Engine(Llama(cfg, rngs=nnx.Rngs(0)), block_size=8, prefill_chunk=32)


def random_tokens(n, seed=0, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def decode_logits(engine, toks, cfg, steps=6, caches=None):
    """Logits of ``steps`` greedy decode steps after prefilling ``toks`` (or from prefilled ``caches``,
    then starting from token 5)."""
    if caches is None:
        caches = engine.new_caches(batch=1, capacity=len(toks) + steps + 1)
        caches, logits, _ = engine.prefill(caches, [toks])
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
    else:
        tok = jnp.asarray([5], jnp.int32)
    out = []
    for _ in range(steps):
        tok, logits, caches, _ = engine.decode_step(caches, tok, key=jax.random.PRNGKey(0),
                                                    sampling=SamplingConfig(), attention=cfg)
        out.append(np.asarray(logits))
    return np.stack(out)
