"""grounding room: is an answer written in the passages it was given, and which passage and sentence support it.

    from grounding import check_answer, UNGROUNDED
    verdict = check_answer(answer_text, question, [hit.text for hit in used_hits])
    verdict.ok, verdict.failures, verdict.summary()      # 「资料中没有找到可靠依据：数字「3000」在资料中没有出现。」

Rooms: imports `retrieval` (sentences, BM25 stopwords) only; `app` and `bench` use it.
"""
from grounding.check import (
    UNGROUNDED,
    Citation,
    Failure,
    GroundingResult,
    check_answer,
    citations,
    looks_like_refusal,
    template_checks,
)
from grounding.evidence import (
    best_sentence,
    best_sentence_index,
    key_term_coverage,
    key_terms,
    missing_names,
    rank_by_question,
)

__all__ = [
    "UNGROUNDED",
    "Citation",
    "Failure",
    "GroundingResult",
    "best_sentence",
    "best_sentence_index",
    "check_answer",
    "citations",
    "key_term_coverage",
    "key_terms",
    "looks_like_refusal",
    "missing_names",
    "rank_by_question",
    "template_checks",
]
