"""The token ids a prompt about a context becomes, shared by ``alaya generate``,
``alaya snapshot save`` and ``alaya serve`` so that a stored context is found again by all
three (``prompt_ids``, ``context_prefix_ids``)."""

from __future__ import annotations

# Prompts used to find where the context's tokens stop being stable (see context_prefix_ids).
_PROBES = ("Q", "?\n1. What is it?")


def prompt_ids(tok, context, prompt: str, *, raw: bool) -> list[int]:
    """The token ids ``alaya generate`` builds (must stay identical to ``cli.cmd_generate``)."""
    if raw:
        return tok.encode((context + "\n\n" if context else "") + prompt)
    user = (context.strip() + "\n\n" + prompt) if context else prompt
    return tok.encode(tok.chat_prompt(user))


def context_prefix_ids(tok, context: str, *, raw: bool) -> list[int]:
    """The token ids that every ``generate --prompt P`` about ``context`` starts with:
    the common prefix of the prompts built for two unlike questions, so that the BPE
    merges across the context/question boundary never make a snapshot unusable."""
    a, b = (prompt_ids(tok, context, p, raw=raw) for p in _PROBES)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
