"""Flax nnx Llama with an explicit, external cache and an injected attention function."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.rope import apply_rope

AttentionFn = Callable[..., tuple]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _shared_block(graphdef, attention, layer, state, x, positions, cache):
    """One decoder layer as a function of its parameters (see ``Llama``: ``layer_class``)."""
    return nnx.merge(graphdef, state)(layer, x, positions, cache, attention)


class RMSNorm(nnx.Module):
    """x [..., D] -> x / rms(x) * weight, computed in f32, returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(rngs, din, dout, dtype, *, bias: bool = False):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.normal(0.02), rngs=rngs)


class Block(nnx.Module):
    """Pre-norm decoder layer: GQA attention (through the injected fn) and a SwiGLU MLP; biases only on
    q/k/v and only with ``config.attention_bias`` (Qwen2)."""

    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)
        self.c = c
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dt)
        qkv_bias = c.attention_bias
        self.q_proj = _linear(rngs, c.hidden_size, c.num_heads * c.head_dim, dt, bias=qkv_bias)
        self.k_proj = _linear(rngs, c.hidden_size, c.num_kv_heads * c.head_dim, dt, bias=qkv_bias)
        self.v_proj = _linear(rngs, c.hidden_size, c.num_kv_heads * c.head_dim, dt, bias=qkv_bias)
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
    """Llama with an external cache and an injected attention function.

    ``logits, new_caches, aux = model(tokens, positions, caches, attention=fn)``

    - tokens int32 [B,T]; positions int32 [B,T] (absolute, used for RoPE only).
    - caches: tuple of ``num_layers`` opaque pytrees owned by ``fn``.
    - ``fn(layer, q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache, positions [B,T])
      -> (out [B,T,Hq,D], new_cache, aux_layer)``; q and k carry RoPE; all in the compute dtype.
      Masks, lengths and the cache layout are the attention function's business.
    - logits f32 [B,T,V] ([B,1,V] of position T-1 with ``last_only=True``); new_caches and aux are
      tuples with one entry per layer. Layers run as an unrolled Python loop (no scan over a stacked
      cache, which would copy it).
    - ``fn.layer_class`` (optional): ``layer -> hashable`` saying which layers ``fn`` treats alike
      (``fn`` then only sees the first layer of each class as ``layer``). Layers of one class run
      through one nested ``jax.jit``, so a forward traces and lowers one layer per class instead of
      every layer (XLA inlines the calls: the compiled program is the same).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(config.dtype)
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dt, param_dtype=dt,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        self.lm_head = None if config.tie_word_embeddings else _linear(rngs, config.hidden_size, config.vocab_size, dt)

    def logits_from_hidden(self, x: jax.Array) -> jax.Array:
        """Final RMSNorm and output head: hidden [..., hidden_size] (before the final norm) -> f32 [..., V]."""
        x = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", x, self.embed.embedding[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", x, self.lm_head.kernel[...], preferred_element_type=jnp.float32)

    def hidden(self, tokens, positions, caches, *, attention: AttentionFn):
        """The layers without the head: ``(hidden [B,T,hidden_size], new_caches, aux)``."""
        c = self.config
        if tokens.ndim != 2 or positions.shape != tokens.shape:
            raise ValueError(f"tokens and positions must both be [B,T]; got tokens {tokens.shape}, "
                             f"positions {positions.shape}")
        if len(caches) != c.num_layers:
            raise ValueError(f"expected {c.num_layers} layer caches, got {len(caches)}")
        x = self.embed(tokens)
        new, aux = [], []
        classes = getattr(attention, "layer_class", None)
        first: dict = {}
        for i, layer in enumerate(self.layers):
            if classes is None:
                x, cache, a = layer(i, x, positions, caches[i], attention)
            else:  # layers of one class share one trace (and one lowered function): see the class docstring
                graphdef, state = nnx.split(layer)
                rep = first.setdefault(classes(i), i)
                x, cache, a = _shared_block(graphdef, attention, rep, state, x, positions, caches[i])
            new.append(cache)
            aux.append(a)
        return x, tuple(new), tuple(aux)

    def __call__(self, tokens, positions, caches, *, attention: AttentionFn, last_only: bool = False):
        x, new, aux = self.hidden(tokens, positions, caches, attention=attention)
        if last_only:
            x = x[:, -1:]
        return self.logits_from_hidden(x), new, aux
