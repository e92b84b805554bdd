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

from bench.eval.cache import AnswerCache, Budget
from bench.eval.datasets import Question
from bench.eval.metrics import char_f1, contains_answer, exact_match, mean, percentile, references
from grounding.check import REFUSAL_MARKERS, looks_like_refusal  # one refusal list for the product and its evaluation

__all__ = ["REFUSAL_MARKERS", "ask_raw", "default_check", "evaluate_answers", "looks_like_refusal", "score_answer",
           "summarize_answers", "timed_stream"]


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


def _hit_scores(hits: Sequence[Any]) -> list[list[float | None]]:
    return [[getattr(h, "dense_score", None), getattr(h, "bm25_score", None)] for h in hits]


def ask_raw(stream: Any, t0: float, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """Consume one AnswerStream into the record the cache keeps: what the model wrote and what it was given."""
    text, ttft, decode_s, pieces = timed_stream(stream, t0)
    total = time.perf_counter() - t0
    hits = list(getattr(stream, "sources", None) or [])
    service_refused = bool(getattr(stream, "refused", False))
    return {
        "text": text, "service_refused": service_refused,
        "ttft_s": None if service_refused else ttft, "decode_s": decode_s, "total_s": total,
        "tokens": count_tokens(text) if (count_tokens and text) else pieces,
        "sources": [getattr(h, "source", str(h)) for h in hits],
        # the passages as given to the model, so the grounding check can be re-run on the saved answer
        "source_texts": [getattr(h, "text", "") for h in hits],
        "hit_scores": _hit_scores(hits),
        "second_pass": getattr(stream, "second_pass", None),
        "error": getattr(stream, "error", "") or "",
    }


def default_check(question: str, text: str, passages: Sequence[str], documents: Sequence[str] | None = None) -> Any:
    from grounding.check import check_answer

    return check_answer(text, question, passages, documents=documents)


def score_answer(q: Question, raw: dict[str, Any], answerable: bool,
                 judge: Callable[[Question, str, dict[str, Any]], dict[str, Any]] | None = None,
                 check: Callable[..., Any] | None = None) -> dict[str, Any]:
    """One report row from a raw record: refusal, EM/F1/contains, the grounding verdict, the judge's fields."""
    from grounding.evidence import answer_candidate
    from grounding.quote import split_quote

    full = raw["text"]
    text, quote = split_quote(full)         # the answer without its 「原文：」 quote is what is scored
    service_refused = raw["service_refused"]
    refused = service_refused or looks_like_refusal(text)
    verdict = None if refused else (check or default_check)(q.query, full, raw["source_texts"], raw.get("sources"))
    extra = judge(q, text, raw) if judge else {}
    model_refused = refused and not service_refused
    # a model refusal while the top passage holds a sentence that scores as an answer: a likely false refusal
    likely = model_refused and answer_candidate(q.query, raw["source_texts"]) is not None
    ungrounded = verdict is not None and not verdict.ok
    n_tokens = raw.get("tokens") or 0
    decode_s = raw.get("decode_s")
    return {
        **extra,
        "grounding": None if verdict is None else verdict.status,
        "grounding_failures": [] if verdict is None else [f.kind for f in verdict.failures],
        "grounding_message": "" if verdict is None else verdict.summary(),
        "cited": bool(verdict is not None and verdict.cited),
        "quoted": quote is not None, "quote_found": bool(verdict is not None and verdict.quote is not None),
        "refused_grounded": refused or ungrounded,
        "from_noise": bool(not refused and extra.get("noise_claims")),
        "from_noise_grounded": bool(not refused and not ungrounded and extra.get("noise_claims")),
        "id": q.id, "query": q.query, "answerable": answerable,
        "references": references(q.answer), "prediction": full, "refused": refused,
        "service_refused": service_refused, "model_refused": model_refused, "likely_false_refusal": likely,
        "second_pass": raw.get("second_pass"),
        "em": exact_match(text, q.answer), "f1": char_f1(text, q.answer),
        "contains": float(contains_answer(text, q.answer)),
        "ttft_s": raw.get("ttft_s"), "total_s": raw.get("total_s"), "tokens": n_tokens,
        "decode_tokens_per_s": (n_tokens - 1) / decode_s if decode_s and n_tokens > 1 and not service_refused
        else None,
        "sources": raw["sources"][:5], "source_texts": raw["source_texts"],
        "error": raw.get("error", ""),
    }


def evaluate_answers(ask: Callable[[str], Any], questions: Sequence[Question], unanswerable_ids: set[str],
                     count_tokens: Callable[[str], int] | None = None,
                     progress: Callable[[str], None] | None = None,
                     judge: Callable[[Question, str, dict[str, Any]], dict[str, Any]] | None = None,
                     check: Callable[..., Any] | None = None,
                     cache: AnswerCache | None = None, config_key: str = "", budget: Budget | None = None,
                     base_key: str | None = None,
                     derive: Callable[[Question, dict[str, Any]], tuple[dict[str, Any], bool]] | None = None,
                     gate: Callable[[str], Any] | None = None,
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`ask(question)` returns the service's AnswerStream (iterable of text pieces, with `.refused`, `.sources`).

    `judge(question, text, raw)` adds fields to a row (the noise mode's `noise_claims`). `check(question, text,
    passages, documents)` is the grounding check (default grounding.check_answer; documents: each passage's file);
    `refused_grounded` counts an answer it marks 「资料中没有找到可靠依据」 as a refusal. With a `cache`, answers
    already there (same `config_key`) are not asked again; with a `budget`, at most that many questions go through
    the LLM (service refusals are free) and the rest are left for the next call — the summary then covers the
    answered ones and says how many are pending.
    `base_key` + `derive(question, base_raw) -> (raw, used_llm)`: a configuration that only adds a step after the
    first answer (prompt.second_pass) starts from the cached answer of its base configuration instead of asking
    again; a fresh answer that carries `second_pass["first"]` is cached for the base configuration too.
    `gate(question)`: the service's refusal before the LLM under the current rules (QAService.refusal_before_llm),
    else None. A cached answer is re-decided with it, since the cache keys on settings, not code: a question the
    rules refuse now is scored as that refusal, and one they refused before but not now is asked again.
    """
    cache = AnswerCache(None) if cache is None else cache
    rows, pending, fresh = [], 0, 0
    for i, q in enumerate(questions, start=1):
        key = cache.key(config_key, q.id, q.query)
        raw = cache.get(key)
        base = cache.get(cache.key(base_key, q.id, q.query)) if raw is None and base_key and derive else None
        if gate is not None and (raw is not None or base is not None):
            now = gate(q.query)
            if now is not None and not (raw or base or {}).get("service_refused"):
                # scored as today's refusal (free: no LLM call); the cached answer stays for a later rule change
                raw, base = ask_raw(now, time.perf_counter(), count_tokens), None
            elif now is None:                                          # an old rule's refusal is stale: ask
                raw = None if raw is not None and raw.get("service_refused") else raw
                base = None if base is not None and base.get("service_refused") else base
        was_cached = raw is not None
        if base is not None:
            if budget is not None and budget.left == 0:
                pending += 1
                continue
            raw, used_llm = derive(q, base)
            if used_llm and budget is not None:
                budget.take()
            cache.put(key, raw)
            fresh += 1
        elif raw is None:
            if budget is not None and budget.left == 0:      # this call's batch is done: the rest waits
                pending += 1
                continue
            t0 = time.perf_counter()
            stream = ask(q.query)
            if not getattr(stream, "refused", False) and budget is not None:
                budget.take()                                # a refusal before the LLM costs nothing
            raw = ask_raw(stream, t0, count_tokens)
            cache.put(key, raw)
            if base_key:                                     # the first answer is the base configuration's
                first = raw["second_pass"]["first"] if raw.get("second_pass") else raw["text"]
                cache.put(cache.key(base_key, q.id, q.query), {**raw, "text": first, "second_pass": None})
            fresh += 1
        rows.append(score_answer(q, raw, q.id not in unanswerable_ids, judge, check))
        if progress and not was_cached:
            r = rows[-1]
            progress(f"  {i}/{len(questions)} {q.query[:30]} → {raw['text'][:40]!r} (F1 {r['f1']:.2f}, "
                     f"{r['total_s'] or 0:.1f} s)")
    summary = summarize_answers(rows)
    summary.update(pending=pending, answered_now=fresh, cached=len(rows) - fresh)
    return summary, rows


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
        "model_refusal_rate_answerable": mean([float(r.get("model_refused", False)) for r in ans]),
        "model_refusal_rate_unanswerable": mean([float(r.get("model_refused", False)) for r in una]),
        "likely_false_refusals_answerable": sum(bool(r.get("likely_false_refusal")) for r in ans),
        "likely_false_refusals_unanswerable": sum(bool(r.get("likely_false_refusal")) for r in una),
        "cited_rate": mean([float(r.get("cited", False)) for r in rows if not r["refused"]]),
        "quoted_rate": mean([float(r.get("quoted", False)) for r in rows if not r["refused"]]),
        "quote_found_rate": mean([float(r.get("quote_found", False)) for r in rows if r.get("quoted")
                                  and not r["refused"]]),
        # EM/F1 over answered questions only: answer quality when the model does answer
        "f1_when_answered": mean([r["f1"] for r in ans if not r["refused"]]),
        "ttft_s_p50": percentile(ttft, 50), "ttft_s_p95": percentile(ttft, 95),
        "tokens_per_s": mean(speed),
        "total_s_mean": mean([r["total_s"] for r in rows]),
    }
