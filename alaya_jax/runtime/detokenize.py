"""Incremental detokenization: the text of a growing list of token ids, decoding only a short
window of ids per update instead of the whole list (which made streaming quadratic)."""

from __future__ import annotations

from typing import Sequence


class IncrementalDecoder:
    """``add(new_ids)`` → the text those ids complete (``""`` while they end inside a character).

    The scheme of vLLM's detokenizer: decode the ids from the previous emission point on, and
    emit what goes beyond the text of the ids up to the last emission point. Windows start where
    all earlier text was complete, so for byte-level tokenizers ``text`` equals
    ``tok.decode(ids)`` minus an incomplete trailing character; ``flush()`` returns the rest
    of a full decode at the end."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are in ``text``

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still missing at the end (an incomplete character, as the full decode gives it)."""
        full = self.tok.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta
