"""Quote-then-verify: the answer copies the sentence it came from, and the copy is checked against the passages.

Small models copy text well, so asking for the supporting sentence verbatim (template `knowledge_qa_quoted`:
「原文：…」 after the answer) gives a strong, data-independent grounding signal: a quote that is in no passage was
invented; a quote that does not hold the answer's numbers/dates/names is not the answer's source; a quote about
something else than the question (few of its key terms) is a near miss.

    answer, quote = split_quote("1963年。\\n原文：范廷颂于1963年被任命为主教。")
    answer -> "1963年。"     quote -> "范廷颂于1963年被任命为主教。"
    found = find_quote(quote, passages)      # QuoteMatch(passage=1, start, end, text) or None

Matching ignores punctuation, whitespace and character width (models re-punctuate) and tolerates a small copy
error: at least MIN_QUOTE_SHARE of the quote's character pairs in one stretch of a passage of about its length.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from common.text import char_bigrams
from grounding.claims import normalize

# 「原文：」 is what the template asks for; the others are what models write instead.
_QUOTE_LABEL = re.compile(r"(?:^|\n|\s|[。！？!?；;])\s*[*#【\[(（]*\s*(?:原文|依据|出处|引文|引用原文|支持的原文|原句)"
                          r"\s*[*】\])）]*\s*[：:]\s*")
_QUOTE_MARKS = "「」『』“”\"'‘’《》"
# Share of the quote's character pairs that must be found in one passage stretch (a copy with a slip still counts).
MIN_QUOTE_SHARE = 0.85
# Quotes shorter than this (alphanumeric characters) verify nothing.
MIN_QUOTE_CHARS = 4


@dataclass(frozen=True)
class QuoteMatch:
    passage: int          # 1-based, as the prompt numbers them
    start: int            # offsets in the passage's text
    end: int
    text: str             # the passage's own text of the quoted stretch, widened to whole sentences
    share: float          # share of the quote's character pairs found (1.0 = verbatim up to punctuation)
    stretch: str = ""     # the passage's text of exactly the quoted stretch (what the answer's claims must be in)
    stretch_end: int = -1  # offset in the passage's text right after that stretch


def split_quote(answer: str) -> tuple[str, str | None]:
    """(the answer without its quote, the quote) — (answer, None) when there is no 「原文：」 part.

    >>> split_quote("3个。原文：“共有3个。”")
    ('3个。', '共有3个。')
    """
    labels = list(_QUOTE_LABEL.finditer(answer))
    if not labels:
        return answer, None
    # The last label whose quote says something: an answer may mention 原文 before its quote, and a small model may
    # go on after its quote with a blank line and a second, cut-off answer and quote (「…原文：元」), which is dropped.
    quoted = [(m, _quote_at(answer, m)) for m in labels]
    m, quote = next(((m, q) for m, q in reversed(quoted) if len(_alnum_map(q)[0]) >= MIN_QUOTE_CHARS), quoted[-1])
    keep = 1 if answer[m.start(): m.start() + 1] in "。！？!?；;" else 0     # the answer's own full stop
    head = answer[: m.start() + keep]
    return head.rstrip(), quote or None


def _quote_at(answer: str, label: re.Match) -> str:
    """The quote after `label`: up to the first blank line (what follows is no longer the quote)."""
    quote = re.split(r"\n\s*\n", answer[label.end():].strip(), maxsplit=1)[0]
    return quote.strip().strip(_QUOTE_MARKS + " \n").strip()


def is_cut(match: QuoteMatch, passages: Sequence[str]) -> bool:
    """True when the quoted stretch stops inside a word or clause of its passage (the next character is a letter,
    digit or CJK character, not punctuation): the answer hit its token limit mid-quote, so its claims are checked
    against the whole sentence the quote starts. A quote that stops at a comma or full stop is complete."""
    text = passages[match.passage - 1]
    end = match.stretch_end
    return 0 <= end < len(text) and text[end].isalnum()


def _alnum_map(text: str) -> tuple[str, list[int]]:
    """`text` normalised to letters and digits only, with the offset in `text` of each kept character."""
    out, pos = [], []
    for i, ch in enumerate(text):
        n = normalize(ch)
        for c in n:
            if c.isalnum():
                out.append(c)
                pos.append(i)
    return "".join(out), pos


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to whole sentences of `text`."""
    from retrieval.sentences import sentence_ends

    ends = sentence_ends(text)
    s = max([0] + [e for e in ends if e <= start])
    e = min([len(text)] + [e for e in ends if e >= end])
    return s, e


def find_quote(quote: str, passages: Sequence[str]) -> QuoteMatch | None:
    """Where `quote` is written in `passages` (verbatim up to punctuation/width, or with a small slip), else None."""
    q, _ = _alnum_map(quote)
    if len(q) < MIN_QUOTE_CHARS:
        return None
    for i, p in enumerate(passages, start=1):                 # verbatim first, in prompt order
        t, pos = _alnum_map(p)
        at = t.find(q)
        if at >= 0:
            a, b = pos[at], pos[at + len(q) - 1] + 1
            s, e = _widen(p, a, b)
            return QuoteMatch(i, s, e, p[s:e].strip(), 1.0, p[a:b], b)
    qg = char_bigrams(q)
    best: QuoteMatch | None = None
    for i, p in enumerate(passages, start=1):
        t, pos = _alnum_map(p)
        if len(t) < 2:
            continue
        width = len(q)
        step = max(1, width // 4)
        for a in range(0, max(1, len(t) - width + 1), step):
            window = t[a: a + width + width // 5]
            share = len(qg & char_bigrams(window)) / len(qg)
            if share >= MIN_QUOTE_SHARE and (best is None or share > best.share):
                b = min(len(pos) - 1, a + len(window) - 1)
                s, e = _widen(p, pos[a], pos[b] + 1)
                best = QuoteMatch(i, s, e, p[s:e].strip(), share, p[pos[a]: pos[b] + 1], pos[b] + 1)
    return best
