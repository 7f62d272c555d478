"""Long texts available without any download: Python's own ``pydoc_data.topics``."""

from __future__ import annotations

from typing import Sequence

# The Python language reference's "simple statements" and loops, several thousand tokens.
DEMO_TOPICS: tuple[str, ...] = (
    "assert", "pass", "del", "return", "yield", "raise", "break", "continue",
    "import", "global", "nonlocal", "for", "while", "if",
)
# Measured with SmolLM2-135M-Instruct (greedy): "The "del" statement is used to delete a specified object ...".
# Harder questions about this context (e.g. which statement ends a loop) get wrong answers from a 135M model.
DEMO_QUESTION = 'What does the "del" statement do?'


def pydoc_topics(names: Sequence[str] | None = None) -> str:
    """The text of the given pydoc topics (all of them, sorted by name, if None), joined by blank lines."""
    from pydoc_data.topics import topics

    names = sorted(topics) if names is None else list(names)
    missing = [n for n in names if n not in topics]
    if missing:
        raise ValueError(f"unknown pydoc topics: {missing}")
    return "\n\n".join(topics[n].strip() for n in names)


def demo_context() -> str:
    return pydoc_topics(DEMO_TOPICS)
