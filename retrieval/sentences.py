"""Sentence boundaries for Chinese (and mixed English) text, shared by ingest's splitter and the prompt builder.

Lives in `retrieval/` because both `ingest` (higher) and `prompts` (a peer that already reads retrieval.types) may
import it; `prompts` must never import `ingest`.

    split_sentences("你好。再见！") -> ["你好。", "再见！"]

The split is lossless: "".join(split_sentences(t)) == t, so callers can cut text at a sentence end without dropping
characters.
"""
from __future__ import annotations

import re

# A sentence is the shortest run of text ending in one of:
#   - Chinese / full-width / ASCII terminators (。！？；!?;), repeated, plus any closing quotes or brackets after them;
#   - an ellipsis (…… or ...);
#   - an English full stop followed by whitespace or the end (so "3.14" and "e.g.x" stay whole);
#   - one or more line breaks;
#   - the end of the text.
_SENTENCE = re.compile(
    r"""
    .*?
    (?:
        [。！？!?；;]+ [”’」』）)\]】"']*
      | (?:…+|\.{3,}) [”’」』）)\]】"']*
      | \.[”’"')\]]* (?=\s|$)
      | \n+
      | $
    )
    """,
    re.S | re.X,
)


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences, keeping each terminator (and trailing closers) with its sentence.

    >>> split_sentences("你好。再见！")
    ['你好。', '再见！']
    >>> split_sentences("他说：“好的。”然后走了")
    ['他说：“好的。”', '然后走了']
    """
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]
