"""Sentence boundaries for Chinese (and mixed English) text: one definition for ingest's splitter and the prompt
builder.

Lives in `retrieval/` because `ingest` (higher) and `prompts` (a peer that already reads retrieval.types) may both
import it, while `prompts` must never import `ingest`. The pattern is the splitter's (ingest/splitter.py), moved here
so that "a sentence" means the same thing when a file is chunked and when a passage is trimmed to fit a prompt.

    split_sentences("你好。再见！") -> ["你好。", "再见！"]
"""
from __future__ import annotations

import re

CLOSERS = "”’」』）)】》〉\"'"
SENTENCE_END = re.compile(
    rf"""
      (?:[。！？!?；;]+|…+|\.{{3,}}) [{CLOSERS}]*     # Chinese / ASCII terminators, repeated (?!, ……), plus closers
    | (?<!\d)(?<!\b[A-Z])\.[{CLOSERS}]*(?=\s|$)      # an English full stop before whitespace (not "3.14", "1. ",
                                                     # nor an initial: "Thomas R. Holtz", "J. Frank")
    | \n                                             # a line break always ends a sentence
    """,
    re.X,
)


def sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence of `text` (the last one is len(text) when text does not end a sentence).

    text[:end] for any returned end is a prefix made of whole sentences: what a trimmer may keep.

    >>> sentence_ends("你好。再见！还有")
    [3, 6, 8]
    """
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    if text and (not ends or ends[-1] < len(text)):
        ends.append(len(text))
    return ends


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, terminators and closing quotes kept with their sentence, whitespace at the ends stripped.

    >>> split_sentences("你好。再见！")
    ['你好。', '再见！']
    >>> split_sentences("他说：“好的。”然后走了。Fine. Thanks!")
    ['他说：“好的。”', '然后走了。', 'Fine.', 'Thanks!']
    >>> split_sentences("汤玛斯·霍尔兹（Thomas R. Holtz）建立了它。J. Frank Scrase 来自维多利亚。")
    ['汤玛斯·霍尔兹（Thomas R. Holtz）建立了它。', 'J. Frank Scrase 来自维多利亚。']
    """
    out, start = [], 0
    for end in sentence_ends(text):
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out
