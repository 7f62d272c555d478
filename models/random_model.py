"""Random-weight models of the presets with a byte tokenizer: for tests and benchmarks
where speed, shapes and determinism matter but the text does not (``alaya serve
--random-weights``, ``bench/serve_bench.py``). Nothing is downloaded."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from models.config import LlamaConfig, llama3_8b, smollm2_135m, tiny
from models.tokenizer import Tokenizer

PRESETS = {"tiny": tiny, "smollm2": smollm2_135m, "llama3-8b": llama3_8b}


class ByteTokenizer:
    """Text ↔ ids by UTF-8 bytes: ids 0-255 are bytes, ``eos_id`` (256) ends a sequence,
    larger ids (a random model's vocabulary) decode as ``<id>``. ChatML like ``Tokenizer``."""

    eos_id = 256
    bos_id = None
    fingerprint = "byte-tokenizer-v1"
    chat_template = None
    chat_prompt = Tokenizer.chat_prompt

    def render_chat(self, messages, *, add_generation_prompt: bool = True) -> str:
        """``messages`` as ChatML (the byte tokenizer has no template of its own)."""
        from models.chat_template import render_chat_template
        from models.tokenizer import _CHATML

        return render_chat_template(_CHATML, messages, add_generation_prompt=add_generation_prompt, bos_token="",
                                    eos_token="")

    def __init__(self, vocab_size: int):
        if vocab_size <= self.eos_id:
            raise ValueError(f"a byte tokenizer needs a vocabulary of more than {self.eos_id} ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif i != self.eos_id or not skip_special:
                out += f"<{i}>".encode()
        return out.decode("utf-8", errors="replace")


def random_config(name: str, *, dtype: Optional[str] = None, max_context: Optional[int] = None) -> LlamaConfig:
    """The preset ``name`` (``tiny`` gets a 259-id vocabulary to hold the byte tokenizer and a
    2048-token context); ``max_context`` overrides the context length."""
    if name not in PRESETS:
        raise ValueError(f"unknown random-weight preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]() if dtype is None else PRESETS[name](dtype=dtype)
    if name == "tiny":
        cfg = dataclasses.replace(cfg, vocab_size=259, max_position_embeddings=2048)
    if max_context is not None:
        cfg = dataclasses.replace(cfg, max_position_embeddings=int(max_context))
    return cfg


def random_model(name: str, *, dtype: Optional[str] = None, max_context: Optional[int] = None, seed: int = 0):
    """``(LlamaConfig, Llama with random weights, ByteTokenizer)`` of a preset."""
    from flax import nnx

    from models.llama import Llama

    cfg = random_config(name, dtype=dtype, max_context=max_context)
    return cfg, Llama(cfg, rngs=nnx.Rngs(seed)), ByteTokenizer(cfg.vocab_size)
