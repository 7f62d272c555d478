"""A GPT-2-style decoder written apart from alaya's models, to test the public store API.

Not ours in every way that matters to the store: learned absolute positions (no RoPE), one
fused QKV projection, multi-head attention without GQA, heads before tokens ([B, H, T, D]),
LayerNorm with biases, GELU, a tied output head, plain dicts of weights and its own KV cache
and dense attention. The attention of each layer is a function argument, so one decode loop
runs with its own attention or with alaya's (``alaya_jax.append`` / ``attend``, or a
``Session``); it imports nothing of alaya's but the public API.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import alaya_jax


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Sizes: vocabulary, learned positions, width, heads (all of them KV heads too), layers."""

    vocab: int = 96
    n_ctx: int = 256
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 2

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def init_params(cfg: GPT2Config, seed: int = 0) -> dict:
    """Random weights (N(0, 0.3) so that attention is far from uniform)."""
    rng = np.random.default_rng(seed)
    c = cfg.n_embd

    def w(*shape, scale=0.3):
        return jnp.asarray(rng.normal(scale=scale, size=shape), jnp.float32)

    def ln():
        return {"g": 1.0 + w(c, scale=0.1), "b": w(c, scale=0.1)}

    blocks = [{"ln_1": ln(), "c_attn": {"w": w(c, 3 * c), "b": w(3 * c, scale=0.1)},
               "c_proj": {"w": w(c, c, scale=0.1), "b": w(c, scale=0.02)}, "ln_2": ln(),
               "c_fc": {"w": w(c, 4 * c, scale=0.1), "b": w(4 * c, scale=0.02)},
               "mlp_proj": {"w": w(4 * c, c, scale=0.05), "b": w(c, scale=0.02)}} for _ in range(cfg.n_layer)]
    return {"wte": w(cfg.vocab, c, scale=1.0), "wpe": w(cfg.n_ctx, c, scale=0.5), "h": blocks, "ln_f": ln()}


def _layer_norm(x, p, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["g"] + p["b"]


def _heads(x, n_head):  # [B, T, C] -> [B, H, T, D]
    b, t, c = x.shape
    return x.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)


@jax.jit
def _embed(params, ids, start):
    return params["wte"][ids] + params["wpe"][start + jnp.arange(ids.shape[1])]


@functools.partial(jax.jit, static_argnames=("n_head",))
def _qkv(p, x, *, n_head):
    qkv = _layer_norm(x, p["ln_1"]) @ p["c_attn"]["w"] + p["c_attn"]["b"]
    return tuple(_heads(z, n_head) for z in jnp.split(qkv, 3, axis=-1))


@jax.jit
def _after_attention(p, x, a):
    x = x + a.transpose(0, 2, 1, 3).reshape(x.shape) @ p["c_proj"]["w"] + p["c_proj"]["b"]
    h = jax.nn.gelu(_layer_norm(x, p["ln_2"]) @ p["c_fc"]["w"] + p["c_fc"]["b"], approximate=True)
    return x + h @ p["mlp_proj"]["w"] + p["mlp_proj"]["b"]


@jax.jit
def _head(params, x):
    return _layer_norm(x, params["ln_f"]) @ params["wte"].T


def forward(params, cfg: GPT2Config, ids, start, caches, attn):
    """ids int [B, T] at positions ``start + t`` → (logits f32 [B, T, vocab], caches).

    ``attn(layer, q, k, v, cache) -> (out, cache)``: q, k, v and out [B, H, T, D]. The parts
    around the attention are jitted on their own, so that the forward runs fast with a stateful
    attention too (and traces whole inside an outer ``jit``)."""
    x = _embed(params, ids, start)
    new = []
    for i, p in enumerate(params["h"]):
        q, k, v = _qkv(p, x, n_head=cfg.n_head)
        a, cache = attn(i, q, k, v, caches[i])
        new.append(cache)
        x = _after_attention(p, x, a)
    return _head(params, x), new


# ----------------------------------------------------------------------------- attention backends
def own_caches(cfg: GPT2Config, batch: int = 1):
    z = jnp.zeros((batch, cfg.n_head, cfg.n_ctx, cfg.head_dim), jnp.float32)
    return [(z, z) for _ in range(cfg.n_layer)]


def own_attention(start, key_mask=None):
    """GPT-2's own dense causal attention over its own cache; ``key_mask`` bool [n_ctx] (None: all)."""

    def attn(layer, q, k, v, cache):
        kc, vc = (jax.lax.dynamic_update_slice(c, x, (0, 0, start, 0)) for c, x in zip(cache, (k, v)))
        t, p = q.shape[2], kc.shape[2]
        keep = jnp.arange(p)[None, :] <= start + jnp.arange(t)[:, None]  # [T, P]
        if key_mask is not None:
            keep = keep & key_mask[None, :]
        s = jnp.einsum("bhtd,bhpd->bhtp", q, kc, precision="highest") / math.sqrt(q.shape[-1])
        w = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhtp,bhpd->bhtd", w, vc, precision="highest"), (kc, vc)

    return attn


def alaya_stores(cfg: GPT2Config, *, capacity: int, block_size: int = 16, batch: int = 1):
    return [alaya_jax.new_store(batch=batch, num_kv_heads=cfg.n_head, head_dim=cfg.head_dim, capacity=capacity,
                                block_size=block_size) for _ in range(cfg.n_layer)]


def alaya_attention(attention, positions=None):
    """The functional API: the layer's store is the cache."""

    def attn(layer, q, k, v, store):
        store = alaya_jax.append(store, k, v, layout="bhtd")
        out, _ = alaya_jax.attend(q, store, attention=attention, layout="bhtd", positions=positions)
        return out, store

    return attn


def session_attention(session, positions=None):
    """The stateful API: the session holds the stores (the caches passed around are unused)."""

    def attn(layer, q, k, v, _):
        session.update(layer, k, v)
        return session.attention(layer, q, positions=positions), None

    return attn


def greedy(step, prompt, n_new: int, *, start: int = 0):
    """GPT-2's own decode loop: ``step(ids [1, T], start) -> logits [1, T, V]``, the prompt at
    positions ``start ...``; returns (generated ids, the logits of the prompt's last position and
    of every generated one but the last [n_new, V])."""
    logits = step(jnp.asarray([prompt], jnp.int32), start)[0, -1]
    out, kept = [], [logits]
    for i in range(n_new):
        tok = int(jnp.argmax(logits))
        out.append(tok)
        if i + 1 < n_new:
            logits = step(jnp.asarray([[tok]], jnp.int32), start + len(prompt) + i)[0, -1]
            kept.append(logits)
    return out, np.stack([np.asarray(x) for x in kept])
