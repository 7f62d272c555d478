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


def stepwise_generate(engine, prompts, sampling, *, attention=None, stop_ids=(), capacity=None):
    """What ``Engine.generate`` computes, one ``decode_step`` at a time with the host deciding after
    every token (the loop generate ran before decoding moved onto the device): the reference the
    device chunks are held to. Greedy or sampled (one key chain for the batch), stop ids, each
    row's limit, calibrated DIPR re-calibrated before the step at which the context has grown
    ``recalibrate_growth``-fold. → list of token lists."""
    from alaya_jax.runtime.engine import FULL
    from alaya_jax.runtime.sampling import sample

    attention = attention or FULL
    b, lens = len(prompts), np.array([len(p) for p in prompts])
    caches = engine.new_caches(batch=b, capacity=capacity or int(lens.max()) + sampling.max_new_tokens)
    caches, logits, _ = engine.prefill(caches, prompts)
    attention = attention.resolve(int(lens.min()))
    calibrated = attention.method == "dipr" and attention.calibrated
    history = [list(p) for p in prompts]
    if calibrated:
        caches, _ = engine.calibrate(caches, history, attention)
    cal_at = int(lens.max())
    key, sub = jax.random.split(jax.random.PRNGKey(sampling.seed))
    temp, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
    token = np.asarray(sample(logits, sub, temp, top_p))
    out, done = [[] for _ in range(b)], np.zeros(b, bool)
    for step in range(sampling.max_new_tokens):
        for j in range(b):
            if not done[j]:
                if int(token[j]) in set(stop_ids):
                    done[j] = True
                    continue
                out[j].append(int(token[j]))
                history[j].append(int(token[j]))
                done[j] = len(out[j]) >= sampling.max_new_tokens
        if done.all():
            break
        growth = attention.calibration.recalibrate_growth if calibrated else None
        if growth is not None and int(lens.max()) + step >= growth * cal_at:
            caches, _ = engine.calibrate(caches, [h[: int(lens[j]) + step] for j, h in enumerate(history)], attention)
            cal_at = int(lens.max()) + step
        key, sub = jax.random.split(key)
        nxt, _, caches, _ = engine.decode_step(caches, jnp.asarray(token), key=sub, sampling=sampling,
                                               attention=attention)
        token = np.asarray(nxt)
    return out
