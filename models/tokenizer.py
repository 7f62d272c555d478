"""Byte-level BPE tokenizer built from GGUF metadata, with the ChatML template."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# llama.cpp's ``tokenizer.ggml.pre`` names → does the pre-tokenizer split every digit on its own first?
# (llama-vocab.cpp: SMOLLM, STARCODER, REFACT, COMMAND_R, CODESHELL, EXAONE, MINERVA use "\p{N}" before the
# GPT-2 regex; GPT2/MPT/OLMO/JAIS use the GPT-2 regex alone. llama.cpp's "default" is yet another regex,
# which we do not implement.)
_PRE_SPLITS_DIGITS = {"gpt2": False, "mpt": False, "olmo": False, "jais": False,
                      "smollm": True, "starcoder": True, "refact": True, "command-r": True, "codeshell": True,
                      "exaone": True, "minerva-7b": True}


class Tokenizer:
    """GPT-2 style byte-level BPE (``tokenizers``) with the GGUF's control tokens as special tokens."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
                 bos_id: Optional[int], eos_id: int, pre: str = "gpt2"):
        """Byte-level BPE from GGUF ``tokenizer.ggml.*`` metadata.

        ``pre`` is ``tokenizer.ggml.pre`` (e.g. ``"smollm"``: digits split one by one before the GPT-2 regex);
        an unknown name is an error rather than a silently different tokenization.
        """
        if pre not in _PRE_SPLITS_DIGITS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; known: {sorted(_PRE_SPLITS_DIGITS)}")
        if not 0 <= eos_id < len(tokens) or (bos_id is not None and not 0 <= bos_id < len(tokens)):
            raise ValueError(f"bos/eos ids ({bos_id}, {eos_id}) outside the vocabulary of {len(tokens)} tokens")
        if len(token_types) != len(tokens):
            raise ValueError(f"{len(token_types)} token types for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("the GGUF vocabulary has duplicate tokens")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                            if _PRE_SPLITS_DIGITS[pre] else byte_level)
        tk.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, token_types) if ty in (_CONTROL, _USER_DEFINED)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._tk = tk
        self._tokens = list(tokens)
        self._merges = list(merges)
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = len(tokens)
        stops = {eos_id}
        if "<|im_end|>" in vocab:
            stops.add(vocab["<|im_end|>"])
        self.stop_ids = frozenset(stops)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text → ids; special tokens written in the text (e.g. ``<|im_start|>``) become their single id."""
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
        """sha256 of the vocabulary, the merges and the pre-tokenizer (all that decides the ids)."""
        h = hashlib.sha256()
        h.update(f"pre={self.pre}|digits={_PRE_SPLITS_DIGITS[self.pre]}\0".encode())
        for t in self._tokens:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        h.update(b"\1")
        for m in self._merges:
            h.update(m.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()
