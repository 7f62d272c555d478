"""The engine's chunked prefill through the KV store against an independent NumPy Llama.

Model-only checks (RoPE scaling, configs, untied head, bf16) live in test_model.py.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alaya_jax.engine import Engine
from models import Llama, tiny


def _w(p):
    return np.asarray(p[...], np.float64)


def np_llama(model, tokens):
    """Full causal forward in float64 NumPy. tokens [T] → logits [T, V]."""
    c = model.config
    t = len(tokens)
    x = _w(model.embed.embedding)[tokens]
    inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim))
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # [T, H, D], rotate-half
        h = c.head_dim // 2
        a, b = v[..., :h], v[..., h:]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + c.rms_norm_eps) * w

    g = c.num_heads // c.num_kv_heads
    causal = np.tril(np.ones((t, t), bool))
    for blk in model.layers:
        h = rms(x, _w(blk.attn_norm.weight))
        q = rope((h @ _w(blk.q_proj.kernel)).reshape(t, c.num_heads, c.head_dim))
        k = rope((h @ _w(blk.k_proj.kernel)).reshape(t, c.num_kv_heads, c.head_dim))
        v = (h @ _w(blk.v_proj.kernel)).reshape(t, c.num_kv_heads, c.head_dim)
        out = np.zeros_like(q)
        for hh in range(c.num_heads):
            s = q[:, hh] @ k[:, hh // g].T / math.sqrt(c.head_dim)
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, hh] = p @ v[:, hh // g]
        x = x + out.reshape(t, -1) @ _w(blk.o_proj.kernel)
        h = rms(x, _w(blk.mlp_norm.weight))
        gate = h @ _w(blk.gate_proj.kernel)
        x = x + (gate / (1 + np.exp(-gate)) * (h @ _w(blk.up_proj.kernel))) @ _w(blk.down_proj.kernel)
    x = rms(x, _w(model.norm.weight))
    head = _w(model.embed.embedding).T if model.lm_head is None else _w(model.lm_head.kernel)
    return x @ head


@pytest.fixture(scope="module")
def tiny_model():
    return Llama(tiny(), rngs=nnx.Rngs(1))


def _engine_logits(model, tokens, chunk):
    """Last-position logits of prefills of growing prefixes, in chunks of ``chunk``: [(pos, logits)]."""
    eng = Engine(model, block_size=4, prefill_chunk=chunk)
    out = []
    for n in range(1, len(tokens) + 1, 7):
        c2 = eng.new_caches(batch=1, capacity=len(tokens))
        _, last, _ = eng.prefill(c2, [tokens[:n]])
        out.append((n - 1, np.asarray(last[0], np.float64)))
    return out


def test_tiny_logits_match_numpy(tiny_model):
    toks = np.random.default_rng(0).integers(0, 97, size=30).tolist()
    want = np_llama(tiny_model, toks)
    for chunk in (8, 32):
        for pos, got in _engine_logits(tiny_model, toks, chunk):
            np.testing.assert_allclose(got, want[pos], rtol=2e-4, atol=2e-4)


def test_wrong_number_of_caches(tiny_model):
    with pytest.raises(ValueError, match="layer caches"):
        tiny_model(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), (None,), attention=None)
