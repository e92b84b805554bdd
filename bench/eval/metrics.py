"""Answer and retrieval metrics, CMRC 2018 style, as small pure functions.

Answers
    A gold answer is a tuple of *parts*; each part is a tuple of *alternatives*:
        (("北京", "北京市"),)             one part, two acceptable spellings (SQuAD/CMRC: several annotators)
        (("1月2日",), ("1月3日",))         two parts, both needed (the JSONL format's list of answers)
    exact_match / char_f1 compare the prediction with every reference string (see `references`) and keep the
    best, as the CMRC 2018 and SQuAD scripts do. `contains_answer` asks that every part has one alternative
    inside the prediction (the RGB benchmark's check).

Normalisation (CMRC 2018's evaluate script, simplified to characters)
    lower-case, NFKC (full-width letters and digits become ASCII), then drop whitespace and punctuation
    (Chinese and ASCII). F1 counts characters, so 「北京市」 vs 「北京」 scores 2·(2/3·1)/(2/3+1) = 0.8.

Retrieval
    `first_rank(flags)` gives the 1-based rank of the first relevant result; hit@k and MRR@k follow from it.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

Answer = tuple[tuple[str, ...], ...]

# Punctuation the CMRC 2018 script removes, plus everything Unicode calls punctuation or a symbol.
_CMRC_PUNCT = set("-:_*^/\\~`+=，。：？！“”；’《》【】~·、…（）「」『』〈〉〔〕—－｀")


def _is_punct(ch: str) -> bool:
    return ch in _CMRC_PUNCT or unicodedata.category(ch)[0] in ("P", "S")


def normalize_answer(text: str) -> str:
    """normalize_answer(" 《北京》 市。") -> "北京市" ; normalize_answer("ＡＢc 1２") -> "abc12"."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and not _is_punct(ch))


def normalize_for_match(text: str) -> str:
    """Looser form used to look for an answer inside a chunk or a parsed file.

    Only whitespace is dropped (PDF text layers break lines inside words) and widths are unified (NFKC);
    punctuation stays, so 「4分钟」 does not match 「4，分钟」.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", "", text)


def references(answer: Answer) -> list[str]:
    """The reference strings EM/F1 compare with: all alternatives of a one-part answer; for a multi-part
    answer, every part's first alternative joined with 「、」 (the prediction must name them all)."""
    if not answer:
        return []
    if len(answer) == 1:
        return [a for a in answer[0] if a.strip()]
    return ["、".join(part[0] for part in answer if part)]


def exact_match(prediction: str, answer: Answer) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references(answer)))


def _f1(pred: str, ref: str) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def char_f1(prediction: str, answer: Answer) -> float:
    """Best character-level F1 of the normalised prediction against the references."""
    pred = normalize_answer(prediction)
    scores = [_f1(pred, normalize_answer(r)) for r in references(answer)]
    return max(scores, default=0.0)


def contains_answer(text: str, answer: Answer) -> bool:
    """True when every part of the answer has an alternative inside `text` (whitespace and width ignored)."""
    if not answer:
        return False
    hay = normalize_for_match(text)
    return all(any(normalize_for_match(alt) and normalize_for_match(alt) in hay for alt in part) for part in answer)


def contains_any_answer(text: str, answer: Answer) -> bool:
    """True when any alternative of any part occurs in `text`: a chunk holding one part of a multi-part
    answer is useful evidence even if the other part sits in another chunk."""
    hay = normalize_for_match(text)
    return any(normalize_for_match(alt) and normalize_for_match(alt) in hay for part in answer for alt in part)


# --- retrieval ------------------------------------------------------------------------------------

def first_rank(relevant: Iterable[bool]) -> int | None:
    """1-based rank of the first True, or None: first_rank([False, True, True]) -> 2."""
    for i, flag in enumerate(relevant, start=1):
        if flag:
            return i
    return None


def hit_at(rank: int | None, k: int) -> float:
    """1.0 when the first relevant result is within the top k."""
    return float(rank is not None and rank <= k)


def reciprocal_rank(rank: int | None, cutoff: int = 10) -> float:
    """1/rank when rank <= cutoff, else 0 (MRR@cutoff averages this)."""
    return 1.0 / rank if rank is not None and rank <= cutoff else 0.0


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, None for no values (a report shows "–" rather than a made-up 0)."""
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default): percentile([1, 2, 3, 4], 50) -> 2.5; None for none."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    return float(np.percentile(np.asarray(values, dtype=float), q))
