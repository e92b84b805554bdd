"""The noise-robustness mode: same-topic "near-miss" passages in the knowledge base, so a wrong answer is at hand.

For every gold passage of the evaluated questions, a near-miss copy is added: the same passage with every sentence
that holds an answer of any of its questions removed (same title, same topic, same entities and numbers around
the answer, but no answer). An unanswerable question then still finds a passage about exactly its topic — the
situation in which a model answers with a near miss (another year's figure, a neighbouring fact) — and an
answerable one finds its gold passage next to a look-alike. The other passages of the same article, already in the
knowledge base, are the second kind of same-topic noise.

"Answered from noise": an answer (not a refusal) that states a number, date or entity (grounding.claims) that a
noise passage given to the model holds and the question's gold passage does not.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.eval.datasets import EvalSet, Passage, Question
from bench.eval.metrics import normalize_for_match
from grounding.claims import extract_claims, supports
from retrieval.sentences import split_sentences

NEAR_MISS_PREFIX = "nearmiss-"
MIN_NEAR_MISS_CHARS = 60


def _holds_answer(sentence: str, answers: Iterable[str]) -> bool:
    hay = normalize_for_match(sentence)
    return any(a and normalize_for_match(a) in hay for a in answers)


def near_miss_passages(ds: EvalSet, questions: Sequence[Question]) -> list[Passage]:
    """One near-miss per gold passage of `questions`: the passage without the sentences that answer any question
    asked of it. Passages left with fewer than two sentences or MIN_NEAR_MISS_CHARS characters get none."""
    answers_of: dict[str, set[str]] = {}
    for q in ds.questions:
        for pid in q.positives:
            answers_of.setdefault(pid, set()).update(alt for part in q.answer for alt in part)
    out: list[Passage] = []
    for pid in dict.fromkeys(p for q in questions for p in q.positives):
        passage = ds.passages.get(pid)
        if passage is None:
            continue
        kept = [s for s in split_sentences(passage.text) if not _holds_answer(s, answers_of.get(pid, ()))]
        text = "".join(kept)
        if len(kept) < 2 or len(text) < MIN_NEAR_MISS_CHARS:
            continue
        if _holds_answer(text, answers_of.get(pid, ())):    # an answer across a sentence seam: skip, never leak
            continue
        out.append(Passage(NEAR_MISS_PREFIX + pid, text, passage.title))
    return out


def noise_claims(answer: str, question: Question, gold_texts: Sequence[str], noise_texts: Sequence[str]) -> list[str]:
    """Claims of `answer` found in a noise passage and in no gold passage (text of each claim)."""
    out = []
    for claim in extract_claims(answer, ignore=question.query):
        if any(supports(t, claim) for t in gold_texts):
            continue
        if any(supports(t, claim) for t in noise_texts):
            out.append(claim.text)
    return out


def noise_judge(ds: EvalSet, passage_of_file: Mapping[str, str], kb_texts: Mapping[str, str]):
    """A per-answer judge for bench.eval.answer_eval: which claims came from noise passages the model was given.
    `raw` is the cached record of the answer (bench.eval.answer_eval.ask_raw: sources, source_texts, hit_scores)."""
    from pathlib import Path

    def judge(question: Question, text: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        gold = [ds.passages[p].text for p in question.positives if p in ds.passages]
        noise = []
        for source, passage in zip(raw.get("sources") or [], raw.get("source_texts") or [], strict=False):
            pid = passage_of_file.get(Path(source).name)
            if pid is None or pid not in question.positives:
                noise.append(passage or kb_texts.get(pid or "", ""))
        claims = noise_claims(text, question, gold, noise)
        return {"noise_claims": claims, **refusal_signals(question.query, raw.get("source_texts") or [],
                                                          raw.get("hit_scores") or [])}

    return judge


def refusal_signals(question: str, texts: Sequence[str], scores: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """What retrieval already knows about a question, for refusal calibration (measured, not acted on here):
    sig_coverage  share of the question's key terms (grounding.evidence.key_terms) written in the best passage
    sig_agree     the best passage is also the best of the passages by BM25 and by dense score
    sig_dense     the best passage's dense cosine
    """
    from grounding.claims import normalize
    from grounding.evidence import key_terms

    if not texts:
        return {"sig_coverage": None, "sig_agree": None, "sig_dense": None}
    terms = key_terms(question)
    text = normalize(texts[0])
    coverage = sum(t in text for t in terms) / len(terms) if terms else 1.0
    de = [(s[0] if s and s[0] is not None else 0.0) for s in scores] or [0.0]
    bm = [(s[1] if len(s) > 1 and s[1] is not None else 0.0) for s in scores] or [0.0]
    agree = bm[0] == max(bm) and de[0] == max(de) and bm[0] > 0
    return {"sig_coverage": coverage, "sig_agree": bool(agree), "sig_dense": de[0]}
