"""Retrieval quality on CMRC 2018 (trial set): hit@1/3/5/10 and MRR@10 for dense, BM25 and hybrid, plus the
evidence-threshold calibration.

    .venv/bin/python -m bench.retrieval_cmrc                       # all 256 passages, 1,002 questions
    .venv/bin/python -m bench.retrieval_cmrc --passages 40         # the subset tests/test_retriever.py uses
    .venv/bin/python -m bench.retrieval_cmrc --chunk-size 300 --chunk-overlap 60 --fetch-k 80 --rrf-k 30

Each paragraph is written as a text file and ingested the way the product does it: the splitter with the
settings' chunk size / overlap (token-bounded by the embedder), passage embeddings from the Embedder, a FAISS
IndexFlatIP whose row i is chunk i. Vectors are cached under $TMPDIR/zhiwen-bench-cmrc/<key>, the key being the
model id + chunk settings + passage set, so a re-run only embeds the 1,002 questions.

Hit: a returned hit's chunks come from the question's own paragraph AND the hit's text contains a reference answer.
Ranks are judged on 10 hits with the threshold off; the threshold is judged separately (calibration block):
best dense cosine of each question with its paragraph in the KB (answerable) vs. with its paragraph removed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from configs import PROJECT_ROOT, Settings, load_settings
from retrieval.retriever import HybridSearcher, prepare
from retrieval.types import Chunk

CMRC_TRIAL = PROJECT_ROOT.parent / "shared" / "data" / "cmrc2018" / "squad-style-data_cmrc2018_trial.json"
KS = (1, 3, 5, 10)
MODES = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class Passage:
    id: str        # the file name the paragraph is written as
    text: str


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]
    passage_id: str


def read_cmrc(path: Path = CMRC_TRIAL, limit: int | None = None) -> tuple[list[Passage], list[Question]]:
    """Paragraphs (first `limit` of them) and their questions, in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except FileNotFoundError:
        raise SystemExit(f"CMRC file not found: {path} (the shared data folder /work/shared/data is missing)") from None
    passages, questions = [], []
    for article in data:
        for para in article["paragraphs"]:
            if limit is not None and len(passages) >= limit:
                return passages, questions
            pid = f"{para.get('id') or article.get('id') or len(passages)}.txt"
            passages.append(Passage(pid, para["context"]))
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if answers and qa["question"].strip():
                    questions.append(Question(qa["question"].strip(), answers, pid))
    return passages, questions


# ----------------------------------------------------------------------------------------------- the knowledge base
class CachedQueries:
    """The Embedder with query vectors remembered: each question is embedded once for all modes and configs, and,
    with a cache file, once across runs (tuning fusion settings then needs no model time at all)."""

    def __init__(self, embedder: Any, cache_file: Path | None = None) -> None:
        self._embedder = embedder
        self._file = cache_file
        self._queries: dict[str, np.ndarray] = {}
        self._dirty = False
        if cache_file is not None and cache_file.is_file():
            data = json.loads(cache_file.read_text(encoding="utf-8"))
            self._queries = {q: np.asarray(v, dtype=np.float32) for q, v in data.items()}

    def encode_query(self, text: str) -> np.ndarray:
        if text not in self._queries:
            self._queries[text] = self._embedder.encode_query(text)
            self._dirty = True
        return self._queries[text]

    def save(self) -> None:
        if self._file is not None and self._dirty:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._file.with_suffix(".tmp")
            tmp.write_text(json.dumps({q: v.tolist() for q, v in self._queries.items()}), encoding="utf-8")
            os.replace(tmp, self._file)
            self._dirty = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)


@dataclass
class BenchKB:
    chunks: list[Chunk]
    index: faiss.Index
    vectors: np.ndarray
    embedder: Any
    build_seconds: float
    cached: bool
    _prepared: Any = None

    def prepared(self) -> Any:
        """BM25 + neighbour map, built once (the product caches them per KB generation the same way)."""
        if self._prepared is None:
            self._prepared = prepare(self.chunks)
        return self._prepared


def _embedder(settings: Settings) -> Any:
    from retrieval.embeddings import Embedder

    return Embedder.from_settings(settings)


def _fingerprint(settings: Settings, passages: Sequence[Passage], model_id: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model_id, settings.embedding.passage_prefix, settings.embedding.max_seq_length,
                         settings.ingest.chunk_size, settings.ingest.chunk_overlap]).encode())
    for p in passages:
        h.update(p.id.encode() + b"\0" + p.text.encode() + b"\0")
    return h.hexdigest()[:16]


def build_kb(passages: Sequence[Passage], settings: Settings, *, cache_root: Path | None = None,
             embedder: Any = None) -> BenchKB:
    """Split every paragraph with the product's splitter, embed with the product's Embedder (cached on disk)."""
    from langchain_core.documents import Document

    from ingest.splitter import split_documents

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    embedder = embedder or _embedder(settings)
    t0 = time.perf_counter()
    chunks: list[Chunk] = []
    for p in passages:
        sha = hashlib.sha256(p.text.encode("utf-8")).hexdigest()
        doc = Document(page_content=p.text, metadata={"kind": "text"})
        for c in split_documents([doc], source=p.id, sha256=sha, chunk_size=settings.ingest.chunk_size,
                                 chunk_overlap=settings.ingest.chunk_overlap,
                                 count_tokens=embedder.count_tokens, max_tokens=embedder.max_tokens):
            chunks.append(Chunk(text=c.text, source=c.source, sha256=c.sha256, position=c.position, page=c.page,
                                heading_path=c.heading_path, id=len(chunks), metadata=c.metadata))

    cache_root = cache_root or Path(tempfile.gettempdir()) / "zhiwen-bench-cmrc"
    variant = f"{embedder.model_id}|{getattr(embedder, 'precision', 'fp32')}"  # bf16 vectors are cached apart
    cache = cache_root / _fingerprint(settings, passages, variant) / "vectors.npy"
    cached = cache.is_file()
    if cached:
        vectors = np.load(cache)
        cached = vectors.shape[0] == len(chunks)
    if not cached:
        vectors = np.asarray(embedder.encode_passages([c.embedding_text() for c in chunks]), dtype=np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    model_key = hashlib.sha256(f"{variant}|{settings.embedding.query_prefix}".encode()).hexdigest()[:12]
    queries = CachedQueries(embedder, cache_root / f"queries-{model_key}.json")
    return BenchKB(chunks, index, vectors, queries, time.perf_counter() - t0, cached)


# ------------------------------------------------------------------------------------------------------- metrics
def first_hit_rank(hits: Sequence[Any], chunks: Sequence[Chunk], q: Question) -> int | None:
    """1-based rank of the first hit from the question's paragraph whose text contains a reference answer."""
    for rank, h in enumerate(hits, start=1):
        from_passage = any(chunks[r].source == q.passage_id for r in h.metadata.get("rows", ()))
        if from_passage and any(a in h.text for a in q.answers):
            return rank
    return None


def summarise(ranks: Sequence[int | None]) -> dict[str, float]:
    n = len(ranks) or 1
    out = {f"hit@{k}": sum(r is not None and r <= k for r in ranks) / n for k in KS}
    out["mrr@10"] = sum(1 / r for r in ranks if r is not None and r <= 10) / n
    return out


def evaluate(kb: BenchKB, questions: Sequence[Question], settings: Settings, modes: Sequence[str] = MODES,
             depth: int = 10, on_progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """hit@k / MRR@10 per mode (threshold off, so abstention does not hide the ranking)."""
    searcher = HybridSearcher(settings.retrieval, kb.embedder)
    prepared = kb.prepared()
    ranks: dict[str, list[int | None]] = {m: [] for m in modes}
    for i, q in enumerate(questions):
        for m in modes:
            res = searcher.search_chunks(q.text, kb.chunks, kb.index, prepared=prepared, k=depth, mode=m,
                                         threshold=-1.0)
            ranks[m].append(first_hit_rank(res.hits, kb.chunks, q))
        if on_progress:
            on_progress(i + 1)
    if isinstance(kb.embedder, CachedQueries):
        kb.embedder.save()
    return {m: summarise(r) for m, r in ranks.items()}


# Everyday office questions no Wikipedia paragraph of CMRC answers: the "unrelated question" case of the threshold.
UNRELATED_QUESTIONS = (
    "公司的年假怎么申请？", "报销差旅费需要哪些发票？", "新员工试用期是多久？", "会议室怎么预订？",
    "打印机卡纸了怎么办？", "工资每个月几号发？", "如何重置邮箱密码？", "加班费怎么计算？",
    "今天午饭吃什么好？", "明天会下雨吗？", "怎样申请在家办公？", "合同到期后如何续签？",
)


def calibrate(kb: BenchKB, questions: Sequence[Question]) -> dict[str, list[float]]:
    """Best cosine per question: over the whole KB, over the KB without the question's own paragraph, and for
    unrelated office questions."""
    src = np.array([c.source for c in kb.chunks])
    present, removed = [], []
    for q in questions:
        cos = kb.vectors @ np.asarray(kb.embedder.encode_query(q.text), dtype=np.float32)
        present.append(float(cos.max()))
        removed.append(float(cos[src != q.passage_id].max()))
    unrelated = [float((kb.vectors @ np.asarray(kb.embedder.encode_query(q), dtype=np.float32)).max())
                 for q in UNRELATED_QUESTIONS]
    if isinstance(kb.embedder, CachedQueries):
        kb.embedder.save()
    return {"answerable": present, "passage_removed": removed, "unrelated": unrelated}


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def print_calibration(cal: dict[str, list[float]], thresholds: Sequence[float]) -> None:
    a, r, u = cal["answerable"], cal["passage_removed"], cal["unrelated"]
    print("\nbest dense cosine (question vs. its best chunk)")
    print("| set | n | p5 | p25 | median | p75 | p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, v in (("answerable (paragraph in KB)", a), ("paragraph removed", r), ("unrelated office questions", u)):
        print(f"| {name} | {len(v)} | " + " | ".join(f"{pct(v, q):.3f}" for q in (5, 25, 50, 75, 95)) + " |")
    print("\n| threshold | answerable kept as evidence | paragraph-removed rejected | unrelated rejected |")
    print("|---|---|---|---|")
    for t in thresholds:
        kept = sum(x >= t for x in a) / len(a)
        print(f"| {t:.3f} | {kept:.3f} | {sum(x < t for x in r) / len(r):.3f} | {sum(x < t for x in u) / len(u):.3f} |")


def print_table(results: dict[str, dict[str, float]], n: int) -> None:
    cols = [f"hit@{k}" for k in KS] + ["mrr@10"]
    print(f"\n{n} questions")
    print("| mode | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for mode, row in results.items():
        print(f"| {mode} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=None, help="use only the first N paragraphs (default: all 256)")
    ap.add_argument("--chunk-size", type=int, help="ingest.chunk_size (default from settings)")
    ap.add_argument("--chunk-overlap", type=int, help="ingest.chunk_overlap")
    ap.add_argument("--fetch-k", type=int, help="retrieval.fetch_k")
    ap.add_argument("--rrf-k", type=int, help="retrieval.rrf_k")
    ap.add_argument("--fusion", choices=("rrf", "weighted"), help="retrieval.fusion")
    ap.add_argument("--dense-weight", type=float, help="retrieval.dense_weight (weighted fusion)")
    ap.add_argument("--max-hit-chars", type=int, help="retrieval.max_hit_chars")
    ap.add_argument("--no-merge", action="store_true", help="retrieval.merge_neighbors: false")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of dense,bm25,hybrid")
    ap.add_argument("--no-calibration", action="store_true", help="skip the threshold calibration block")
    args = ap.parse_args(argv)

    ingest_over = {k: v for k, v in (("chunk_size", args.chunk_size), ("chunk_overlap", args.chunk_overlap))
                   if v is not None}
    retrieval_over = {k: v for k, v in (("fetch_k", args.fetch_k), ("rrf_k", args.rrf_k), ("fusion", args.fusion),
                                        ("dense_weight", args.dense_weight), ("max_hit_chars", args.max_hit_chars))
                      if v is not None}
    if args.no_merge:
        retrieval_over["merge_neighbors"] = False
    settings = load_settings(ingest=ingest_over, retrieval=retrieval_over)
    passages, questions = read_cmrc(limit=args.passages)
    kb = build_kb(passages, settings)
    print(f"knowledge base: {len(passages)} paragraphs -> {len(kb.chunks)} chunks "
          f"(chunk_size {settings.ingest.chunk_size}, overlap {settings.ingest.chunk_overlap}, "
          f"model {kb.embedder.model_id}, {getattr(kb.embedder, 'precision', 'fp32')}); "
          f"built in {kb.build_seconds:.1f} s"
          + (" (vectors from cache)" if kb.cached else ""))
    r = settings.retrieval
    print(f"retrieval: fusion {r.fusion}, rrf_k {r.rrf_k}, dense_weight {r.dense_weight}, fetch_k {r.fetch_k}, "
          f"merge_neighbors {r.merge_neighbors}, max_hit_chars {r.max_hit_chars}, dedupe {r.dedupe_threshold}")
    t0 = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = evaluate(kb, questions, settings, modes)
    dt = time.perf_counter() - t0
    print_table(results, len(questions))
    print(f"search: {1000 * dt / (len(questions) * len(modes)):.1f} ms per question per mode (incl. query embedding)")
    if not args.no_calibration:
        cal = calibrate(kb, questions)
        print_calibration(cal, [0.80, 0.82, 0.84, 0.85, 0.86, 0.865, 0.87, 0.875, 0.88])
    return 0


if __name__ == "__main__":
    sys.exit(main())
