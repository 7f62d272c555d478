"""An independent float64 NumPy Llama/Qwen2 for the tests (no alaya_jax or models code in the math).

Weights are a dict with Hugging Face names and layouts (``model.layers.0.self_attn.q_proj.weight`` [out, in],
``...q_proj.bias`` for Qwen2), as checkpoints store them; :func:`hf_weights` reads them off a built model.
"""

import math

import numpy as np


def np_inv_freq(head_dim, theta, scaling=None):
    """RoPE inverse frequencies [D/2] (float64); ``scaling`` a dict of Meta's llama3 ``apply_scaling`` fields
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    if scaling is None:
        return base
    f, lo, hi, old = (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                      scaling["original_max_position_embeddings"])
    out = []
    for b in base:  # Meta's llama3 apply_scaling, element by element
        wl = 2 * math.pi / b
        if wl < old / hi:
            out.append(b)
        elif wl > old / lo:
            out.append(b / f)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * b / f + s * b)
    return np.array(out)


def np_rope(v, pos, inv):
    """v [T,H,D], pos [T], inv [D/2] -> rotate-half RoPE (float64)."""
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    h = v.shape[-1] // 2
    a, b = v[..., :h], v[..., h:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def np_llama(w, tokens, *, num_heads, num_kv_heads, head_dim, rms_norm_eps, inv_freq, num_layers):
    """Full causal forward in float64 from Hugging Face-named weights. tokens [T] -> logits [T, V].
    Biases are used where ``w`` has them; a missing ``lm_head.weight`` means a tied head."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + rms_norm_eps) * g

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    g = num_heads // num_kv_heads
    causal = np.tril(np.ones((t, t), bool))
    for i in range(num_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = np_rope(lin(h, p + "self_attn.q_proj").reshape(t, num_heads, head_dim), pos, inv_freq)
        k = np_rope(lin(h, p + "self_attn.k_proj").reshape(t, num_kv_heads, head_dim), pos, inv_freq)
        v = lin(h, p + "self_attn.v_proj").reshape(t, num_kv_heads, head_dim)
        out = np.zeros_like(q)
        for hh in range(num_heads):  # query head hh reads KV head hh // g
            s = np.where(causal, q[:, hh] @ k[:, hh // g].T / math.sqrt(head_dim), -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (pr / pr.sum(-1, keepdims=True)) @ v[:, hh // g]
        x = x + lin(out.reshape(t, -1), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = lin(h, p + "mlp.gate_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def hf_weights(model):
    """The parameters of a built ``models.Llama`` under Hugging Face names and layouts (float64)."""
    def a(p):
        return np.asarray(np.asarray(p[...], np.float32), np.float64)

    c = model.config
    w = {"model.embed_tokens.weight": a(model.embed.embedding), "model.norm.weight": a(model.norm.weight)}
    if model.lm_head is not None:
        w["lm_head.weight"] = a(model.lm_head.kernel).T
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = a(blk.attn_norm.weight)
        w[p + "post_attention_layernorm.weight"] = a(blk.mlp_norm.weight)
        for ours, theirs in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                             ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                             ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                             ("down_proj", "mlp.down_proj")):
            lin = getattr(blk, ours)
            w[p + theirs + ".weight"] = a(lin.kernel).T
            if lin.bias is not None:
                w[p + theirs + ".bias"] = a(lin.bias)
    assert c.num_layers == len(model.layers)
    return w


def np_llama_model(model, tokens):
    """:func:`np_llama` of a built ``models.Llama`` (its config's RoPE, incl. llama3 scaling)."""
    c = model.config
    sc = None if c.rope_scaling is None else vars(c.rope_scaling)
    return np_llama(hf_weights(model), tokens, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                    inv_freq=np_inv_freq(c.head_dim, c.rope_theta, sc), num_layers=c.num_layers)
