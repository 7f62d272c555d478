"""Byte-level BPE tokenizer built from GGUF metadata or a Hugging Face ``tokenizer.json``, with the model's
own chat template (ChatML when the file carries none)."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from alaya_jax.errors import UnsupportedModelError
from models.chat_template import render_chat_template

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# llama.cpp's ``tokenizer.ggml.pre`` names → does the pre-tokenizer split every digit on its own first?
# (llama-vocab.cpp: SMOLLM, STARCODER, REFACT, COMMAND_R, CODESHELL, EXAONE, MINERVA use "\p{N}" before the
# GPT-2 regex; GPT2/MPT/OLMO/JAIS use the GPT-2 regex alone. llama.cpp's "default" is yet another regex,
# which we do not implement.)
_PRE_SPLITS_DIGITS = {"gpt2": False, "mpt": False, "olmo": False, "jais": False,
                      "smollm": True, "starcoder": True, "refact": True, "command-r": True, "codeshell": True,
                      "exaone": True, "minerva-7b": True}
# Pre-tokenizers that are one regex split (isolated) before a regex-free ByteLevel, as in the models'
# tokenizer.json (llama-vocab.cpp: LLAMA3 for llama3/llama-v3/llama-bpe; QWEN2 for qwen2).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_REGEX = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "llama-v3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}
# Turn-end tokens that stop generation besides eos (when the vocabulary has them).
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")
_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_REGEX:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _PRE_SPLITS_DIGITS:
        raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r}; known: "
                                    f"{sorted(_PRE_SPLITS_DIGITS | _PRE_REGEX)}")
    if _PRE_SPLITS_DIGITS[pre]:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


class Tokenizer:
    """GPT-2 style byte-level BPE (``tokenizers``) with the GGUF's control tokens as special tokens."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
                 bos_id: Optional[int], eos_id: int, pre: str = "gpt2", chat_template: Optional[str] = None,
                 extra_stop_ids: Iterable[int] = ()):
        """Byte-level BPE from GGUF ``tokenizer.ggml.*`` metadata.

        ``pre`` is ``tokenizer.ggml.pre`` (e.g. ``"smollm"``: digits split one by one before the GPT-2 regex;
        ``"llama-bpe"``: Llama-3's regex); an unknown name is an error rather than a silently different
        tokenization. ``chat_template``: ``tokenizer.chat_template`` (None: ChatML).
        """
        pre_tokenizer = _pre_tokenizer(pre)
        if not 0 <= eos_id < len(tokens) or (bos_id is not None and not 0 <= bos_id < len(tokens)):
            raise UnsupportedModelError(f"bos/eos ids ({bos_id}, {eos_id}) outside the vocabulary of {len(tokens)} "
                                        "tokens")
        if len(token_types) != len(tokens):
            raise UnsupportedModelError(f"{len(token_types)} token types for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise UnsupportedModelError("the GGUF vocabulary has duplicate tokens")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = pre_tokenizer
        tk.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, token_types) if ty in (_CONTROL, _USER_DEFINED)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self.pre = pre
        h = hashlib.sha256()
        h.update((f"pre={pre}|regex={_PRE_REGEX[pre]}\0" if pre in _PRE_REGEX
                  else f"pre={pre}|digits={_PRE_SPLITS_DIGITS[pre]}\0").encode())
        for t in tokens:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        h.update(b"\1")
        for m in merges:
            h.update(m.encode("utf-8", "surrogatepass") + b"\0")
        self._setup(tk, bos_id=bos_id, eos_id=eos_id, extra_stop_ids=extra_stop_ids, chat_template=chat_template,
                    fingerprint=h.hexdigest())

    @classmethod
    def from_tokenizers(cls, tk: HFTokenizer, *, bos_id: Optional[int], eos_id: int, extra_stop_ids: Iterable[int] = (),
                        chat_template: Optional[str] = None) -> "Tokenizer":
        """Wrap a ``tokenizers.Tokenizer`` (e.g. from a model's ``tokenizer.json``) as it is."""
        self = cls.__new__(cls)
        self.pre = "tokenizer.json"
        self._setup(tk, bos_id=bos_id, eos_id=eos_id, extra_stop_ids=extra_stop_ids, chat_template=chat_template,
                    fingerprint=hashlib.sha256(tk.to_str().encode()).hexdigest())
        return self

    def _setup(self, tk, *, bos_id, eos_id, extra_stop_ids, chat_template, fingerprint):
        n = tk.get_vocab_size(with_added_tokens=True)
        for what, i in (("eos", eos_id), ("bos", bos_id), *(("stop", s) for s in extra_stop_ids)):
            if i is not None and not 0 <= i < n:
                raise UnsupportedModelError(f"{what} id {i} is outside the vocabulary of {n} tokens")
        self._tk = tk
        self._fingerprint = fingerprint
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = n
        self.chat_template = chat_template
        stops = {eos_id, *extra_stop_ids}
        for t in _TURN_END_TOKENS:
            if (i := tk.token_to_id(t)) is not None:
                stops.add(i)
        self.stop_ids = frozenset(stops)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text → ids; special tokens written in the text (e.g. ``<|im_start|>``) become their single id."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """``messages`` (``[{"role", "content"}]``) through the model's chat template (ChatML if it has none)."""
        def text(i):
            return "" if i is None else self._tk.id_to_token(i)

        return render_chat_template(self.chat_template or _CHATML, messages,
                                    add_generation_prompt=add_generation_prompt, bos_token=text(self.bos_id),
                                    eos_token=text(self.eos_id))

    def chat_prompt(self, user: str, *, system: Optional[str] = None) -> str:
        """One user turn (after an optional system turn), ending where the assistant's answer starts."""
        msgs = ([{"role": "system", "content": system}] if system is not None else [])
        return self.render_chat(msgs + [{"role": "user", "content": user}])

    def fingerprint(self) -> str:
        """sha256 of all that decides the ids: the vocabulary, the merges and the pre-tokenizer (GGUF), or the
        whole serialized ``tokenizer.json``."""
        return self._fingerprint
