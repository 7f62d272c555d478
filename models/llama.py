"""Flax nnx Llama with an explicit, external cache and an injected attention function."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.rope import apply_rope

AttentionFn = Callable[..., tuple]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(rngs, din, dout, dtype):
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Block(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)
        self.c = c
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dt)
        self.q_proj = _linear(rngs, c.hidden_size, c.num_heads * c.head_dim, dt)
        self.k_proj = _linear(rngs, c.hidden_size, c.num_kv_heads * c.head_dim, dt)
        self.v_proj = _linear(rngs, c.hidden_size, c.num_kv_heads * c.head_dim, dt)
        self.o_proj = _linear(rngs, c.num_heads * c.head_dim, c.hidden_size, dt)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dt)
        self.gate_proj = _linear(rngs, c.hidden_size, c.intermediate_size, dt)
        self.up_proj = _linear(rngs, c.hidden_size, c.intermediate_size, dt)
        self.down_proj = _linear(rngs, c.intermediate_size, c.hidden_size, dt)

    def __call__(self, layer, x, positions, cache, attention):
        c = self.c
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        q = apply_rope(q, positions, theta=c.rope_theta, scaling=c.rope_scaling)
        k = apply_rope(k, positions, theta=c.rope_theta, scaling=c.rope_scaling)
        o, cache, aux = attention(layer, q, k, v, cache, positions)
        x = x + self.o_proj(o.reshape(b, t, c.num_heads * c.head_dim).astype(x.dtype))
        h = self.mlp_norm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, cache, aux


class Llama(nnx.Module):
    """``model(tokens [B,T], positions [B,T], caches, attention=fn) -> (logits f32 [B,T,V], caches, aux)``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(config.dtype)
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dt, param_dtype=dt,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)]) if hasattr(nnx, "List") \
            else [Block(config, rngs=rngs) for _ in range(config.num_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        self.lm_head = None if config.tie_word_embeddings else _linear(rngs, config.hidden_size, config.vocab_size, dt)

    def __call__(self, tokens, positions, caches, *, attention: AttentionFn, last_only: bool = False):
        if len(caches) != self.config.num_layers:
            raise ValueError(f"expected {self.config.num_layers} layer caches, got {len(caches)}")
        x = self.embed(tokens)
        new, aux = [], []
        for i, layer in enumerate(self.layers):
            x, c, a = layer(i, x, positions, caches[i], attention)
            new.append(c)
            aux.append(a)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embed.embedding[...], preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return logits.astype(jnp.float32), tuple(new), tuple(aux)
