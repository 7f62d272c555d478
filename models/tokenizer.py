"""Byte-level BPE tokenizer built from GGUF metadata, with the ChatML template."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


class Tokenizer:
    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
                 bos_id: Optional[int], eos_id: int):
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("the GGUF vocabulary has duplicate tokens")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, token_types) if ty in (_CONTROL, _USER_DEFINED)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._tk = tk
        self._tokens = list(tokens)
        self._merges = list(merges)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = len(tokens)
        stops = {eos_id}
        if "<|im_end|>" in vocab:
            stops.add(vocab["<|im_end|>"])
        self.stop_ids = frozenset(stops)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def chat_prompt(self, user: str, *, system: Optional[str] = None) -> str:
        """ChatML, ending where the assistant's answer starts."""
        parts = []
        if system is not None:
            parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
        parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        return "".join(parts)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self._tokens:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        h.update(b"\1")
        for m in self._merges:
            h.update(m.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()
