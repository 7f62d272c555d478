"""One entry point for a model on disk: a GGUF file or a Hugging Face checkpoint directory.

:func:`load_model_path` loads it; :func:`describe_model_path` reads only metadata and headers and says
what it is and, if it cannot be loaded, every reason why.
"""
from __future__ import annotations

import collections
import math
import pathlib
from typing import Any

from alaya_jax.errors import InputFileNotFoundError
from models import gguf_loader, hf_loader
from models.config import LlamaConfig


def model_format(path) -> str:
    """``"gguf"`` for a file, ``"hf"`` for a directory; ``FileNotFoundError`` when nothing is there."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputFileNotFoundError(f"model path {str(p)!r} does not exist (give a .gguf file or a Hugging Face "
                                f"checkpoint directory)")
    return "hf" if p.is_dir() else "gguf"


def load_model_path(path, *, dtype: str = "float32", device=None):
    """``(LlamaConfig, Llama, Tokenizer)`` from a GGUF file or a Hugging Face directory."""
    if model_format(path) == "hf":
        return hf_loader.load_hf(path, dtype=dtype, device=device)
    return gguf_loader.load_gguf(path, dtype=dtype, device=device)


def read_config(path, *, dtype: str = "float32") -> LlamaConfig:
    """The model's config from metadata only (no tensor data read)."""
    if model_format(path) == "hf":
        return hf_loader.config_from_hf(hf_loader.read_hf_config(path), dtype=dtype)
    return gguf_loader.config_from_gguf(gguf_loader.open_gguf(path), dtype=dtype)


def _config_fields(c: LlamaConfig) -> dict[str, Any]:
    return {"layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "context_length": c.max_position_embeddings, "rope_theta": c.rope_theta,
            "rope_scaling": None if c.rope_scaling is None else {"type": "llama3", **vars(c.rope_scaling)},
            "tied_embeddings": c.tie_word_embeddings, "qkv_bias": c.attention_bias}


def describe_model_path(path) -> dict[str, Any]:
    """What ``alaya models inspect`` prints: format, architecture, shapes, stored dtypes, parameter count
    (from the tensor headers), and ``refused``: every reason the model cannot be loaded (empty: loadable)."""
    fmt = model_format(path)
    out: dict[str, Any] = {"path": str(path), "format": fmt}
    refused: list[str] = []
    config = None
    if fmt == "gguf":
        reader = gguf_loader.open_gguf(path)
        out["architecture"] = reader.fields["general.architecture"].contents() \
            if "general.architecture" in reader.fields else None
        tensors = [(t.name, gguf_loader.tensor_shape(t), t.tensor_type.name) for t in reader.tensors]
        steps = [lambda: gguf_loader.config_from_gguf(reader, dtype="float32"),
                 lambda: gguf_loader.tokenizer_from_gguf(reader)]
    else:
        cfg = hf_loader.read_hf_config(path)
        out["architecture"] = (cfg.get("architectures") or [None])[0]
        out["model_type"] = cfg.get("model_type")
        out["torch_dtype"] = cfg.get("torch_dtype")
        index = None
        try:
            index = hf_loader.SafetensorsIndex(pathlib.Path(path))
        except ValueError as e:
            refused.append(str(e))
        tensors = [(n, s, d) for n, (_, s, d) in (index.tensors.items() if index else ())]
        steps = [lambda: hf_loader.config_from_hf(cfg, dtype="float32"),
                 lambda: hf_loader.tokenizer_from_hf(pathlib.Path(path), cfg)]
    for i, step in enumerate(steps):
        try:
            r = step()
            if i == 0:
                config = r
        except (ValueError, KeyError) as e:
            refused.append(str(e))
    if config is not None:
        out.update(_config_fields(config))
        if fmt == "gguf":
            refused += gguf_loader.tensor_problems_gguf(reader, config)
        elif index is not None:
            refused += hf_loader.tensor_problems_hf(index, config)
    out["tensor_dtypes"] = dict(collections.Counter(d for _, _, d in tensors))
    out["parameters"] = sum(math.prod(s) for n, s, _ in tensors
                            if n != gguf_loader.ROPE_FREQS and not n.endswith(hf_loader.INV_FREQ_SUFFIX)
                            and not (config is not None and config.tie_word_embeddings and n == "lm_head.weight"))
    out["refused"] = refused
    out["loadable"] = not refused
    return out

