"""Test helpers around models.Llama: a minimal dense attention function, a forward over it, a tiny
byte-level BPE ``tokenizer.json`` writer and a reference chat template with its expected rendering."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def concat_attention(layer, q, k, v, cache, positions):
    """cache = (k_all [B,S,Hkv,D], v_all [B,S,Hkv,D], kpos [B,S]) or None; causal by absolute position."""
    if cache is not None:
        k = jnp.concatenate([cache[0], k], axis=1)
        v = jnp.concatenate([cache[1], v], axis=1)
        kpos = jnp.concatenate([cache[2], positions], axis=1)
    else:
        kpos = positions
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    mask = kpos[:, None, None, :] <= positions[:, None, :, None]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vv.astype(jnp.float32)).astype(q.dtype)
    return out, (k, v, kpos), layer


def forward(model, toks, start, caches):
    toks = jnp.asarray(toks, jnp.int32)[None]
    pos = start + jnp.arange(toks.shape[1], dtype=jnp.int32)[None]
    return model(toks, pos, caches, attention=concat_attention)


def dense_logits(model, toks) -> np.ndarray:
    """Logits [T, V] of one causal forward of ``toks`` from position 0."""
    logits, _, _ = forward(model, toks, 0, (None,) * model.config.num_layers)
    return np.asarray(logits[0], np.float64)


# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json) and what it renders for a system and a
# user turn with the generation prompt.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama3_expected(bos, system, user):
    return (f"{bos}<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write_tokenizer_json(path, *, specials=LLAMA3_SPECIALS, regex=None):
    """A byte-level BPE ``tokenizer.json`` (byte alphabet + 3 merges + ``specials``) as Hugging Face writes
    them for Llama-3 (a regex Split then ByteLevel without regex); returns the vocabulary size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["Ġt", "Ġth", "ĠĠ"]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[("Ġ", "t"), ("Ġt", "h"), ("Ġ", "Ġ")], fuse_unk=False, byte_fallback=False))
    split = [pre_tokenizers.Split(Regex(regex), behavior="isolated")] if regex else []
    tk.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=not regex)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.save(str(path))
    return tk.get_vocab_size(with_added_tokens=True)
