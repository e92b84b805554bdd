"""Answer quality and speed through the real QA service (app.service.QAService), one question at a time.

Per question: the streamed answer, whether the service refused, time to first token (from the call to the
first non-empty piece: retrieval + prompt + prefill), and decode speed (tokens after the first / time after
the first). Summaries: EM, F1, contains on answerable questions; refusal rate on unanswerable ones; false
refusals on answerable ones.

A refusal is the service's own `.refused` flag (no evidence: the LLM was not called), or an answer that says
it cannot answer from the known information (the template tells the model to say 「根据已知信息无法回答该问题」).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bench.eval.datasets import Question
from bench.eval.metrics import char_f1, contains_answer, exact_match, mean, percentile, references

# The template's two refusal sentences (「根据已知信息无法回答该问题」「没有提供足够的相关信息」) and close variants.
REFUSAL_MARKERS: tuple[str, ...] = ("无法回答", "不能回答", "无法根据已知信息", "没有提供足够的相关信息",
                                    "没有提供相关信息", "没有足够的相关信息", "没有相关信息", "未提及", "没有提及")


def looks_like_refusal(text: str) -> bool:
    """looks_like_refusal("根据已知信息无法回答该问题。") -> True; a short answer like "4分钟" -> False."""
    return any(m in text for m in REFUSAL_MARKERS)


def timed_stream(pieces: Iterable[str], t0: float | None = None) -> tuple[str, float | None, float | None, int]:
    """Consume a token stream: (text, seconds from t0 to the first piece, seconds first → last piece, pieces).
    t0 defaults to now; pass the time of the call that created the stream so that eager work counts."""
    t0 = time.perf_counter() if t0 is None else t0
    first = last = None
    parts: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        parts.append(piece)
    ttft = None if first is None else first - t0
    decode = None if first is None else last - first
    return "".join(parts), ttft, decode, len(parts)


def grounding_of(stream: Any, question: str, text: str) -> Any:
    """The grounding verdict of an answer: the service's own (`stream.grounding`) when it made one, else the same
    check (grounding.check_answer) over the passages the model was given."""
    verdict = getattr(stream, "grounding", None)
    if verdict is not None:
        return verdict
    from grounding.check import check_answer

    return check_answer(text, question, [h.text for h in (getattr(stream, "sources", None) or [])])


def evaluate_answers(ask: Callable[[str], Any], questions: Sequence[Question], unanswerable_ids: set[str],
                     count_tokens: Callable[[str], int] | None = None,
                     progress: Callable[[str], None] | None = None,
                     judge: Callable[[Question, str, Any], dict[str, Any]] | None = None,
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`ask(question)` returns the service's AnswerStream (iterable of text pieces, with `.refused`).

    `judge(question, text, stream)` adds fields to a row (the noise mode's `noise_claims`). Every row also carries
    the grounding verdict; `refused_grounded` counts an answer the check marks 「资料中没有找到可靠依据」 as a refusal.
    """
    rows = []
    for i, q in enumerate(questions, start=1):
        t0 = time.perf_counter()
        stream = ask(q.query)
        text, ttft, decode_s, pieces = timed_stream(stream, t0)
        total = time.perf_counter() - t0
        service_refused = bool(getattr(stream, "refused", False))
        refused = service_refused or looks_like_refusal(text)
        n_tokens = count_tokens(text) if (count_tokens and text) else pieces
        verdict = None if service_refused or refused else grounding_of(stream, q.query, text)
        extra = judge(q, text, stream) if judge else {}
        ungrounded = verdict is not None and not verdict.ok
        rows.append({
            **extra,
            "grounding": None if verdict is None else verdict.status,
            "grounding_failures": [] if verdict is None else [f.kind for f in verdict.failures],
            "grounding_message": "" if verdict is None else verdict.summary(),
            "cited": bool(verdict is not None and verdict.cited),
            "refused_grounded": refused or ungrounded,
            "from_noise": bool(not refused and extra.get("noise_claims")),
            "from_noise_grounded": bool(not refused and not ungrounded and extra.get("noise_claims")),
            "id": q.id, "query": q.query, "answerable": q.id not in unanswerable_ids,
            "references": references(q.answer), "prediction": text, "refused": refused,
            "service_refused": service_refused,
            "em": exact_match(text, q.answer), "f1": char_f1(text, q.answer),
            "contains": float(contains_answer(text, q.answer)),
            "ttft_s": None if service_refused else ttft, "total_s": total, "tokens": n_tokens,
            "decode_tokens_per_s": (n_tokens - 1) / decode_s if decode_s and n_tokens > 1 and not service_refused
            else None,
            "sources": [getattr(s, "source", str(s)) for s in (getattr(stream, "sources", None) or [])][:5],
            # the passages as given to the model, so the grounding check can be re-run on the saved report
            "source_texts": [getattr(s, "text", "") for s in (getattr(stream, "sources", None) or [])],
            "error": getattr(stream, "error", "") or "",
        })
        if progress:
            r = rows[-1]
            progress(f"  {i}/{len(questions)} {q.query[:30]} → {text[:40]!r} (F1 {r['f1']:.2f}, {total:.1f} s)")
    return summarize_answers(rows), rows


def summarize_answers(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ans = [r for r in rows if r["answerable"]]
    una = [r for r in rows if not r["answerable"]]
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    speed = [r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"] is not None]
    return {
        "n_answerable": len(ans), "n_unanswerable": len(una),
        "em": mean([r["em"] for r in ans]), "f1": mean([r["f1"] for r in ans]),
        "contains": mean([r["contains"] for r in ans]),
        "false_refusal_rate": mean([float(r["refused"]) for r in ans]),
        "refusal_rate": mean([float(r["refused"]) for r in una]),
        "answered_from_noise": mean([float(r.get("from_noise", False)) for r in rows]),
        # the same after the grounding check (an ungrounded answer is shown as 「资料中没有找到可靠依据」)
        "grounded_contains": mean([r["contains"] * (not r.get("refused_grounded", r["refused"])) for r in ans]),
        "grounded_false_refusal_rate": mean([float(r.get("refused_grounded", r["refused"])) for r in ans]),
        "grounded_refusal_rate": mean([float(r.get("refused_grounded", r["refused"])) for r in una]),
        "grounded_answered_from_noise": mean([float(r.get("from_noise_grounded", False)) for r in rows]),
        "cited_rate": mean([float(r.get("cited", False)) for r in rows if not r["refused"]]),
        # EM/F1 over answered questions only: answer quality when the model does answer
        "f1_when_answered": mean([r["f1"] for r in ans if not r["refused"]]),
        "ttft_s_p50": percentile(ttft, 50), "ttft_s_p95": percentile(ttft, 95),
        "tokens_per_s": mean(speed),
        "total_s_mean": mean([r["total_s"] for r in rows]),
    }
