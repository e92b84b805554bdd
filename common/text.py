"""Text helpers shared by the rooms: what counts as a CJK character, and character bigrams."""
from __future__ import annotations

import re

# CJK symbols and punctuation, Extension A, the Unified Ideographs, compatibility ideographs, full-width forms.
CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def char_bigrams(text: str) -> set[str]:
    """The adjacent character pairs of `text` as given (normalise first if you need to); a one-character text gives
    itself and an empty text nothing. Chinese needs no tokenizer for this, and reordered or lightly edited copies
    still share most of their bigrams."""
    return {text[i:i + 2] for i in range(len(text) - 1)} or ({text} if text else set())
