"""A second, stricter extraction when the model refused although a passage seems to hold the answer.

Small models refuse answerable questions when the answer sits in a long context (issue 14: 「zip 压缩包里最多能放多少个
文件？」 refused while source [1] says 「一个 zip 压缩包里最多 2000 个文件」). When the model's answer is a refusal and
the top passage holds a sentence that scores as an answer (grounding.evidence.answer_candidate: most of the
question's key terms and a number/date/name of the asked kind), the service asks once more with only that sentence
and its neighbours as the 「已知信息」 (template extract_answer) and shows that answer instead — still under the
grounding check, so a near miss found this way is caught like any other.

    gated = refusal_gate(pieces, retry)     # streams as usual; holds back what may be a refusal until it is one

`refusal_gate` lets an answer stream at once unless its start may be a refusal sentence; a finished refusal is then
given to `retry()`, whose pieces replace it (or, when it returns None, the refusal is released unchanged).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from grounding.check import looks_like_refusal
from grounding.claims import normalize
from retrieval.sentences import split_sentences

# How refusals start (the templates' two sentences, and what models put before them).
REFUSAL_STARTS: tuple[str, ...] = ("根据已知信息无法回答该问题", "没有提供足够的相关信息", "根据已知信息，无法回答",
                                   "根据提供的已知信息无法", "根据提供的信息无法", "抱歉", "对不起", "很抱歉",
                                   "无法回答", "已知信息中没有", "已知信息中未", "无法从已知信息")
_LEAD = " \n\t\"'“”「」『』*#:："


def may_be_refusal(text: str) -> bool:
    """True while `text` (the answer so far) could still become one of the refusal sentences.

    >>> may_be_refusal("根据已知"), may_be_refusal("根据已知信息，年假有5天"), may_be_refusal("5天")
    (True, False, False)
    """
    t = normalize(text).lstrip(_LEAD)
    if not t:
        return True
    if looks_like_refusal(t):
        return True
    return any(s.startswith(t) or t.startswith(s) for s in REFUSAL_STARTS)


def refusal_gate(pieces: Iterable[str], retry: Callable[[str], Iterable[str] | None]) -> Iterator[str]:
    """Yield `pieces`, holding back a start that may be a refusal; a finished refusal goes to `retry(text)`, whose
    pieces are yielded instead (the refusal itself when it returns None)."""
    held = ""
    for piece in pieces:
        if held is None:
            yield piece
            continue
        held += piece
        if not may_be_refusal(held):
            yield held
            held = None
    if held is None or not held:
        return
    second = retry(held) if looks_like_refusal(held) else None
    if second is None:
        yield held
        return
    yield from second


def candidate_window(passage: str, sentence: str) -> str:
    """The candidate sentence with the sentences right before and after it (what the second pass is given)."""
    sents = split_sentences(passage)
    if sentence not in sents:
        return sentence
    i = sents.index(sentence)
    return "".join(sents[max(0, i - 1): i + 2])


# A window around the top passage's sentence closest in meaning to the question is a candidate when it holds at
# least this share of the question's key words (docs/benchmarks.md §10.7).
CLOSEST_MIN_COVERAGE = 0.5


def second_pass_context(question: str, passages: Sequence[str], *, top: int = 1,
                        closest: Callable[[str, str], str | None] | None = None) -> tuple[int, str] | None:
    """(1-based passage, context for the second pass) when one of the `top` passages scores as holding the answer
    (prompt.second_pass_passages), else None.

    When none does by its words (grounding.evidence.answer_candidate: a 什么/为什么 question needs all its key words
    around one sentence), `closest(question, passage)` — the page's question highlight, by meaning — names the top
    passage's sentence closest to the question; its window is the context when it holds CLOSEST_MIN_COVERAGE of the
    key words (「对于加利西亚语和葡萄牙语的关系，专家们有哪些观点？」: the passage says 「有语言学家认为…」,
    not 专家/观点)."""
    from grounding.evidence import answer_candidate, key_term_coverage

    found = answer_candidate(question, passages, top=top)
    if found is not None:
        n, sentence = found
        return n, candidate_window(passages[n - 1], sentence)
    if closest is None or not passages:
        return None
    sentence = closest(question, passages[0])
    if not sentence:
        return None
    window = candidate_window(passages[0], sentence)
    return (1, window) if key_term_coverage(question, window) >= CLOSEST_MIN_COVERAGE else None
