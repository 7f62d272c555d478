"""Long texts available without any download: Python's own ``pydoc_data.topics``, IDLE's help, and the
licence text that numpy ships (legal English prose)."""

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


def idle_help() -> str:
    """IDLE's user documentation (``idlelib/help.html`` of the standard library) as plain text: tags
    dropped, block elements as line breaks, runs of blank lines collapsed (~9.8K SmolLM2 tokens)."""
    import html.parser
    import idlelib
    import os
    import re

    class _Text(html.parser.HTMLParser):
        BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "dt", "dd", "pre", "tr", "table", "ul", "ol"}

        def __init__(self):
            super().__init__()
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("script", "style")
            if tag in self.BLOCKS:
                self.parts.append("\n")

        def handle_endtag(self, tag):
            self.skip -= tag in ("script", "style")

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    with open(os.path.join(os.path.dirname(idlelib.__file__), "help.html"), encoding="utf-8") as f:
        parser = _Text()
        parser.feed(f.read())
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def numpy_license() -> str:
    """The ``LICENSE.txt`` that the installed numpy distribution ships: numpy's BSD licence and the licences
    of the libraries its wheels bundle, the GPL-3 in full (~9K SmolLM2 tokens of legal English prose, a text
    that none of the attention tuning saw). Runs of blank lines collapsed as in :func:`idle_help`."""
    import importlib.metadata
    import re

    dist = importlib.metadata.distribution("numpy")
    names = [f for f in (dist.files or ()) if f.name in ("LICENSE.txt", "LICENSE")]
    if not names:
        raise FileNotFoundError("the installed numpy distribution lists no LICENSE.txt")
    text = names[0].read_text(encoding="utf-8")
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


TEXTS = {"pydoc": pydoc_topics, "idle-help": idle_help, "numpy-license": numpy_license}
