"""Strict loading of a Hugging Face checkpoint directory (Llama 1/2/3.x, Qwen2/2.5) into the Flax Llama.

A directory holds ``config.json``, ``model.safetensors`` or shards listed by ``model.safetensors.index.json``,
``tokenizer.json`` and optionally ``tokenizer_config.json`` (chat template, bos/eos) and
``generation_config.json`` (extra stop ids). Safetensors are memory-mapped (``safe_open``, numpy) and every
tensor goes to the device on its own; Hugging Face's rotate-half Q/K layout is ours, so nothing is permuted.
A missing, unknown or wrong-shaped tensor, an unsupported tensor dtype, architecture, activation or RoPE
scaling is a ``ValueError`` naming it.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import numpy as np

from alaya_jax.errors import InputFileNotFoundError, UnsupportedModelError
from models.config import LlamaConfig, RopeScaling
from models.rope import inv_frequencies
from models.tokenizer import Tokenizer
from models.weights import expected_tensors, fill_model, raise_problems, tensor_problems

# Hugging Face ``architectures`` → ``model_type`` read here.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
TENSOR_DTYPES = ("F32", "F16", "BF16")
ROPE_TYPES = ("default", "llama3")
# A buffer some old Llama conversions saved: checked against our frequencies, not loaded.
INV_FREQ_SUFFIX = "self_attn.rotary_emb.inv_freq"
_REQUIRED = object()


def _read_json(path: pathlib.Path, *, required: bool = True) -> Optional[dict]:
    if not path.exists():
        if required:
            raise UnsupportedModelError(f"{str(path)!r} is missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(d, dict):
        raise UnsupportedModelError(f"{str(path)!r} does not hold a JSON object")
    return d


def _key(cfg: dict, key: str, default: Any = _REQUIRED):
    if cfg.get(key) is None:
        if default is _REQUIRED:
            raise UnsupportedModelError(f"config.json has no {key!r}")
        return default
    return cfg[key]


def _rope_scaling(cfg: dict) -> Optional[RopeScaling]:
    rs = cfg.get("rope_scaling")
    if rs is None:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r} in config.json (supported: "
                                    f"{', '.join(ROPE_TYPES)})")
    if kind == "default":
        return None
    try:
        return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    except KeyError as e:
        raise UnsupportedModelError(f"config.json rope_scaling of type 'llama3' has no {e.args[0]!r}") from None


def config_from_hf(cfg: dict, *, dtype: str) -> LlamaConfig:
    """``LlamaConfig`` from a ``config.json`` dict; anything the model here cannot run is an error naming it."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported architectures {archs!r} in config.json (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    if model_type != ARCHITECTURES[archs[0]]:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} for {archs[0]} in config.json "
                         f"(expected {ARCHITECTURES[archs[0]]!r})")
    if "quantization_config" in cfg:
        method = (cfg["quantization_config"] or {}).get("quant_method")
        raise UnsupportedModelError(f"quantized Hugging Face checkpoints are not supported (quantization_config "
                         f"quant_method {method!r}); use an unquantized one or a GGUF file")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {act!r} in config.json (only 'silu')")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor {cfg['partial_rotary_factor']} is not supported (only 1.0)")
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"Llama config with {flag}=true is not supported")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 config with use_sliding_window=true is not supported")
    heads = int(_key(cfg, "num_attention_heads"))
    hidden = int(_key(cfg, "hidden_size"))
    return LlamaConfig(
        vocab_size=int(_key(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_key(cfg, "intermediate_size")),
        num_layers=int(_key(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(_key(cfg, "num_key_value_heads", heads)),
        head_dim=int(_key(cfg, "head_dim", hidden // heads)),
        rope_theta=float(_key(cfg, "rope_theta", 10000.0)),
        rms_norm_eps=float(_key(cfg, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_key(cfg, "max_position_embeddings")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=_rope_scaling(cfg),
        dtype=dtype,
        attention_bias=model_type == "qwen2",
    )


class SafetensorsIndex:
    """Where every tensor of a checkpoint directory lives: ``{name: (file, shape, dtype)}`` from the headers."""

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open

        index = _read_json(directory / "model.safetensors.index.json", required=False)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UnsupportedModelError("model.safetensors.index.json has no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            if not found:
                raise UnsupportedModelError(f"{str(directory)!r} holds no *.safetensors file")
            if len(found) > 1 and "model.safetensors" not in found:
                raise UnsupportedModelError(f"{str(directory)!r} holds several .safetensors files {found} but no "
                                 f"model.safetensors.index.json saying which tensor is where")
            files = ["model.safetensors" if "model.safetensors" in found else found[0]]
            weight_map = None
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
        self._handles = {}
        for fname in files:
            path = directory / fname
            if not path.is_file():
                raise UnsupportedModelError(f"safetensors shard {fname!r} listed in the index does not exist")
            try:
                h = safe_open(str(path), framework="np")
                names = list(h.keys())
            except Exception as e:
                raise UnsupportedModelError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
            self._handles[fname] = h
            for n in names:
                if n in self.tensors:
                    raise UnsupportedModelError(f"tensor {n!r} appears in both {self.tensors[n][0]!r} and {fname!r}")
                if weight_map is not None and weight_map.get(n) != fname:
                    raise UnsupportedModelError(f"tensor {n!r} is in {fname!r} but the index puts it in "
                                                f"{weight_map.get(n)!r}")
                s = h.get_slice(n)
                self.tensors[n] = (fname, tuple(int(x) for x in s.get_shape()), str(s.get_dtype()))
        if weight_map is not None:
            lost = sorted(n for n in weight_map if n not in self.tensors)
            if lost:
                raise UnsupportedModelError(f"tensor {lost[0]!r} is in the index but not in its shard "
                                            f"{weight_map[lost[0]]!r}"
                                 + (f" ({len(lost)} such)" if len(lost) > 1 else ""))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s for n, (_, s, _) in self.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (memory-mapped where safetensors can)."""
        return self._handles[self.tensors[name][0]].get_tensor(name)


def tensor_problems_hf(index: SafetensorsIndex, config: LlamaConfig) -> list[str]:
    """Missing, unknown, wrong-shaped and unsupported-dtype tensors (empty: loadable). A tied model may carry
    ``lm_head.weight`` (it must equal the embedding, checked when loading); old Llama conversions may carry
    ``rotary_emb.inv_freq`` buffers (they must equal our frequencies, checked when loading)."""
    present = {n: s for n, s in index.shapes().items() if not n.endswith(INV_FREQ_SUFFIX)}
    if config.tie_word_embeddings:
        present.pop("lm_head.weight", None)
    problems = tensor_problems({k: s for k, (s, _) in expected_tensors(config).items()}, present,
                               what="the checkpoint")
    problems += [f"tensor {n!r} has dtype {d}, which is not supported (supported: {', '.join(TENSOR_DTYPES)})"
                 for n, (_, _, d) in index.tensors.items() if d not in TENSOR_DTYPES]
    return problems


def _token_text(t) -> Optional[str]:
    return t.get("content") if isinstance(t, dict) else t


def _ids(v) -> list[int]:
    return [] if v is None else [int(x) for x in (v if isinstance(v, list) else [v])]


def tokenizer_from_hf(directory: pathlib.Path, cfg: dict) -> Tokenizer:
    """``tokenizer.json`` with bos/eos and the chat template of ``tokenizer_config.json`` and the stop ids of
    ``generation_config.json``."""
    from tokenizers import Tokenizer as HFTokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{str(path)!r} is missing (only tokenizer.json tokenizers are supported)")
    try:
        tk = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise UnsupportedModelError(f"cannot read {str(path)!r}: {e}") from None
    tcfg = _read_json(directory / "tokenizer_config.json", required=False) or {}
    gen = _read_json(directory / "generation_config.json", required=False) or {}

    def token_id(key: str) -> Optional[int]:
        text = _token_text(tcfg.get(key))
        if text is None:
            return None
        i = tk.token_to_id(text)
        if i is None:
            raise UnsupportedModelError(f"tokenizer_config.json {key} {text!r} is not a token of tokenizer.json")
        return i

    bos = token_id("bos_token")
    bos = bos if bos is not None else next(iter(_ids(cfg.get("bos_token_id"))), None)
    eos_all = _ids(token_id("eos_token")) + _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
    if not eos_all:
        raise UnsupportedModelError("no eos token: neither tokenizer_config.json, generation_config.json nor "
                                    "config.json "
                         "names one")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise UnsupportedModelError("tokenizer_config.json chat_template is neither a string nor a list with a "
                                    "'default' entry")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer.from_tokenizers(tk, bos_id=bos, eos_id=eos_all[0], extra_stop_ids=eos_all[1:],
                                     chat_template=template)


def _check_directory(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise InputFileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UnsupportedModelError(f"{str(path)!r} is not a directory")
    return path


def read_hf_config(path) -> dict:
    return _read_json(_check_directory(path) / "config.json")


def load_hf(path, *, dtype: str = "float32", device=None):
    """Load ``(LlamaConfig, Llama, Tokenizer)`` from a Hugging Face checkpoint directory, strictly.

    Names, shapes and dtypes are all checked before any data is read; then each tensor is read from its
    memory-mapped shard, put on ``device`` (default: the first) and cast to ``dtype`` there."""
    directory = _check_directory(path)
    cfg = read_hf_config(directory)
    config = config_from_hf(cfg, dtype=dtype)
    tok = tokenizer_from_hf(directory, cfg)
    if tok.vocab_size > config.vocab_size:
        raise UnsupportedModelError(f"tokenizer.json has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{config.vocab_size}")
    index = SafetensorsIndex(directory)
    raise_problems(tensor_problems_hf(index, config))
    want_inv = inv_frequencies(config.head_dim, theta=config.rope_theta, scaling=config.rope_scaling)
    for n in index.tensors:
        if n.endswith(INV_FREQ_SUFFIX) and not np.allclose(np.asarray(index.read(n), np.float32), want_inv,
                                                           rtol=1e-5):
            raise UnsupportedModelError(f"tensor {n!r} differs from the RoPE frequencies of config.json")
    if config.tie_word_embeddings and "lm_head.weight" in index.tensors:
        if not np.array_equal(index.read("lm_head.weight"), index.read("model.embed_tokens.weight")):
            raise UnsupportedModelError("config.json ties the output head to the embedding, but the checkpoint's "
                             "'lm_head.weight' differs from 'model.embed_tokens.weight'")
    return config, fill_model(config, index.read, device=device), tok
