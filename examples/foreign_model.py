"""A model that is not alaya's keeps its KV cache in alaya stores (CPU, about half a minute).

A tiny decoder with learned positions and random weights, heads before tokens ([B, H, T, D]),
calls only the public API: ``alaya_jax.new_store`` / ``append`` / ``attend`` inside its own jitted
decode step, and a ``Session`` that a ``ContextDB`` stores and reuses. Each result is compared
with the model's own dense attention::

    python examples/foreign_model.py
"""

import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import alaya_jax
from alaya_jax import AttentionConfig, ContextDB, Session

LAYERS, HEADS, HEAD_DIM, VOCAB, MAX_POS = 2, 4, 16, 64, 128
WIDTH = HEADS * HEAD_DIM
rng = np.random.default_rng(0)
W = {"tok": rng.normal(size=(VOCAB, WIDTH)), "pos": rng.normal(size=(MAX_POS, WIDTH)) * 0.5,
     "qkv": rng.normal(size=(LAYERS, WIDTH, 3 * WIDTH)) * 0.3, "out": rng.normal(size=(LAYERS, WIDTH, WIDTH)) * 0.5}
W = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), W)


def run(ids, start, attention, caches):
    """The model: ids [1, T] at positions start.. → logits [1, T, VOCAB]; ``attention(layer, q, k, v,
    cache) -> (out, cache)`` with q, k, v, out [1, H, T, D]."""
    x = W["tok"][ids] + W["pos"][start + jnp.arange(ids.shape[1])]
    for layer in range(LAYERS):
        h = x / jnp.linalg.norm(x, axis=-1, keepdims=True) * math.sqrt(WIDTH)
        q, k, v = (z.reshape(1, -1, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
                   for z in jnp.split(h @ W["qkv"][layer], 3, axis=-1))
        o, caches[layer] = attention(layer, q, k, v, caches[layer])
        x = x + o.transpose(0, 2, 1, 3).reshape(x.shape) @ W["out"][layer]
    return x @ W["tok"].T, caches


def own_dense(keep):
    """The model's own attention: a growing list of keys/values; ``keep`` bool [MAX_POS] filters them."""
    def attention(layer, q, k, v, cache):
        k, v = (jnp.concatenate([c, n], axis=2) for c, n in zip(cache, (k, v)))
        n, t = k.shape[2], q.shape[2]
        mask = (jnp.arange(n)[None] <= jnp.arange(n - t, n)[:, None]) & keep[:n]
        s = jnp.where(mask, q @ jnp.swapaxes(k, 2, 3) / math.sqrt(HEAD_DIM), -jnp.inf)
        return jax.nn.softmax(s, axis=-1) @ v, (k, v)
    return attention


def alaya_layer(cfg, positions=None):
    def attention(layer, q, k, v, store):
        store = alaya_jax.append(store, k, v, layout="bhtd")
        return alaya_jax.attend(q, store, attention=cfg, layout="bhtd", positions=positions)[0], store
    return attention


def new_stores():
    return [alaya_jax.new_store(batch=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=MAX_POS, block_size=16)
            for _ in range(LAYERS)]


def generate(step, prompt, n, start=0):
    """Greedy decoding: (new ids, logits [n, VOCAB] of the prompt's last position and each new one)."""
    logits, out = [step(jnp.asarray([prompt]), start)[0, -1]], []
    for i in range(n):
        out.append(int(jnp.argmax(logits[-1])))
        logits.append(step(jnp.asarray([[out[-1]]]), start + len(prompt) + i)[0, -1])
    return out, np.stack(logits[:-1])


def with_caches(fn, caches, *extra):
    state = [caches]

    def step(ids, start):
        logits, state[0] = fn(ids, start, state[0], *extra)
        return logits
    return step


everything = jnp.ones(MAX_POS, bool)
own = jax.jit(lambda ids, start, caches, keep: run(ids, start, own_dense(keep), caches))
empty_own = [(jnp.zeros((1, HEADS, 0, HEAD_DIM)),) * 2] * LAYERS
prompt = rng.integers(0, VOCAB, 48).tolist()
want = generate(with_caches(own, empty_own, everything), prompt, 8)
print(f"own dense attention      : {want[0]}")

# 1. The functional API inside the model's own jitted step.
for cfg in (AttentionConfig(method="full"), AttentionConfig(method="dipr", beta=math.inf)):
    step = jax.jit(lambda ids, start, stores, cfg=cfg: run(ids, start, alaya_layer(cfg), stores))
    got = generate(with_caches(step, new_stores()), prompt, 8)
    name = "full" if cfg.method == "full" else f"dipr β={cfg.beta:g}"
    print(f"alaya {name:<19}: {got[0]}  max|Δlogits| {np.abs(got[1] - want[1]).max():.1e}")

# 2. A Session: store the first 32 tokens' context in a ContextDB, then a new session reuses it.
dims = dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=MAX_POS, layout="bhtd",
            attention=AttentionConfig(method="dipr", beta=math.inf))


def session_step(session):
    def step(ids, start):
        session.feed(np.asarray(ids)[0])

        def attention(layer, q, k, v, _):
            session.update(layer, k, v)
            return session.attention(layer, q), None
        return run(ids, start, attention, [None] * LAYERS)[0]
    return step


with tempfile.TemporaryDirectory() as path:
    db = ContextDB(path, model_fingerprint="example-model-v1", tokenizer_fingerprint="example-ids",
                   dtype="float32", block_size=16)
    first, todo = Session.from_db(db, prompt[:32], **dims)
    session_step(first)(jnp.asarray([todo]), 0)
    sid = first.save(name="first-32")
    second, todo = Session.from_db(db, prompt, **dims)
    got = generate(session_step(second), todo, 8, start=second.reused_tokens)
    print(f"session from the DB      : {got[0]}  max|Δlogits| {np.abs(got[1] - want[1]).max():.1e}  "
          f"(reused {second.reused_tokens} tokens of snapshot {sid[:8]}, fed {len(todo)})")

# 3. A filtered query: after the 48-token context, 8 tokens that see only positions 16..31 and themselves.
keep = ((jnp.arange(MAX_POS) >= 16) & (jnp.arange(MAX_POS) < 32)) | (jnp.arange(MAX_POS) >= 48)
question = rng.integers(0, VOCAB, 8).tolist()
_, caches = own(jnp.asarray([prompt]), 0, empty_own, everything)
free = generate(with_caches(own, caches, everything), question, 4, start=48)
want = generate(with_caches(own, caches, keep), question, 4, start=48)
print(f"own dense, unfiltered    : {free[0]}")
print(f"own dense, filtered      : {want[0]}  (max|Δlogits| to unfiltered {np.abs(free[1] - want[1]).max():.1f})")
strict = AttentionConfig(method="dipr", beta=math.inf, sink=0, window=0)  # sink and window off: the filter alone
step = jax.jit(lambda ids, start, stores, positions: run(ids, start, alaya_layer(strict, positions), stores))
_, stores = step(jnp.asarray([prompt]), 0, new_stores(), jnp.asarray([(0, MAX_POS), (0, 0)]))  # the context: all
got = generate(with_caches(step, stores, jnp.asarray([(16, 32), (48, MAX_POS)])), question, 4, start=48)
print(f"alaya dipr β=inf filtered: {got[0]}  max|Δlogits| {np.abs(got[1] - want[1]).max():.1e}")
