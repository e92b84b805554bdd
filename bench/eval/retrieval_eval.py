"""Retrieval quality of one configuration: strict and loose hit@k / MRR@10, evidence rates and latency.

strict  a result counts when it comes from a gold passage's file AND its text contains a gold answer
        (any alternative of any part); this is what "the retriever found the evidence" means.
loose   a result counts when its text contains a gold answer, whichever file it came from (CMRC answers are
        often short names or numbers that other passages also contain, so loose ≥ strict).
Ranking is judged on 10 results, threshold ignored (a no-evidence search still returns its closest
passages as `low_relevance`); the threshold is judged separately as evidence rates.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.eval.datasets import Question
from bench.eval.metrics import contains_any_answer, first_rank, hit_at, mean, percentile, reciprocal_rank
from bench.eval.report import HIT_KS

RANK_DEPTH = 10


def judge_hits(hits: Sequence[Any], question: Question, passage_of_file: Mapping[str, str]) -> dict[str, Any]:
    """Strict and loose first ranks of one result list (objects with .text and .source, i.e. Hits)."""
    gold = set(question.positives)
    strict = [passage_of_file.get(Path(h.source).name) in gold and contains_any_answer(h.text, question.answer)
              for h in hits]
    loose = [contains_any_answer(h.text, question.answer) for h in hits]
    return {"strict_rank": first_rank(strict), "loose_rank": first_rank(loose)}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-question rows (answerable ones carry ranks) into the report's retrieval block."""
    ans = [r for r in rows if r["answerable"]]
    una = [r for r in rows if not r["answerable"]]
    out: dict[str, Any] = {"n": len(ans), "n_unanswerable": len(una)}
    for kind in ("strict", "loose"):
        ranks = [r[f"{kind}_rank"] for r in ans]
        block = {f"hit@{k}": mean([hit_at(x, k) for x in ranks]) for k in HIT_KS}
        block["mrr@10"] = mean([reciprocal_rank(x, RANK_DEPTH) for x in ranks])
        out[kind] = block
    lat = [r["latency_ms"] for r in rows]
    out["latency_ms"] = {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "mean": mean(lat)}
    # The threshold's two errors, from retrieval alone (no LLM): evidence found for a question whose passage
    # is not in the KB, and no evidence for one whose passage is.
    out["no_evidence_rate_answerable"] = mean([float(not r["evidence"]) for r in ans])
    out["no_evidence_rate_unanswerable"] = mean([float(not r["evidence"]) for r in una])
    return out


def evaluate_retrieval(searcher: Any, kb: Any, questions: Sequence[Question], unanswerable_ids: set[str],
                       passage_of_file: Mapping[str, str], *, mode: str, threshold: float,
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every question through `searcher.search(kb, ...)` and judge the ranked results."""
    rows = []
    for q in questions:
        t0 = time.perf_counter()
        res = searcher.search(kb, q.query, k=RANK_DEPTH, mode=mode, threshold=threshold)
        ms = (time.perf_counter() - t0) * 1000
        hits = res.hits if res.evidence else res.low_relevance
        row = {"id": q.id, "answerable": q.id not in unanswerable_ids, "evidence": bool(res.evidence),
               "best_dense": res.best_dense, "latency_ms": ms,
               "top_sources": [Path(h.source).name for h in hits[:3]]}
        row.update(judge_hits(hits, q, passage_of_file))
        rows.append(row)
    return summarize(rows), rows
