"""Milvus Lite at 10k / 100k chunks through the product's Milvus store (`store.backend: milvus`): retrieval latency
with question encoding, RSS, and one file added / deleted → searchable.

    flock /tmp/zhiwen-bench.lock .venv/bin/python -m bench.scale_milvus                    # 10k
    flock /tmp/zhiwen-bench.lock .venv/bin/python -m bench.scale_milvus --sizes 10000 100000 --queries 50
    .venv/bin/python -m bench.scale_milvus --uri http://milvus-host:19530 --sizes 100000 1000000   # your server

Corpus: bench.latency's replica method (real CMRC trial chunks embedded once with the product's Embedder; replicas
get perturbed text and noisy, re-normalised vectors; each replica of a passage is its own file). The KB is written by
the product's MilvusKBWriter (rows + Milvus's own BM25 over the jieba analyzer, FLAT cosine index) in a temporary
Milvus Lite file (or, with --uri, on a Milvus server: the KB "zwbench<size>" is created there and deleted at the end;
store.index_type auto builds AUTOINDEX), opened with KnowledgeBase.open, and searched with HybridSearcher.search like
the app does (retrieval.mode hybrid: Milvus's hybrid_search with the weighted ranker, then threshold / merging /
dedupe here).

Printed per size:
  build                 seconds to write all rows (insert + Milvus's BM25 + index) and switch the head
  rss                   resident memory of this process (Milvus Lite runs inside it; the e5 model included)
  search-full           HybridSearcher.search(kb, question) incl. encoding the question: p50 / p95
  search-cached         the same with the question's vector pre-computed
  engine-dense / -bm25 / -hybrid
                        the engine alone: one MilvusClient.search on the dense field, one on the BM25 field, one
                        hybrid_search with the weighted ranker, each with the fields the store asks for (what Milvus
                        Lite itself costs; search-cached minus engine-hybrid is the store's and retriever's share:
                        the neighbours' batched get, threshold, merging, de-duplication)
  add / delete          one file (a real CMRC passage, embedded now): writer, embed, commit, reopen, first search
                        — total = "searchable"; first-query = that first search alone
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import psutil

from bench.corpus import cmrc_chunks
from bench.eval.metrics import percentile
from bench.latency import _CachedQueries, real_vectors, replicate
from bench.machine import describe_machine
from configs import load_settings
from retrieval.retriever import HybridSearcher
from retrieval.store import FileEntry, IndexSpec, KnowledgeBase
from retrieval.types import Chunk


def _ms(xs: list[float]) -> str:
    return f"p50 {percentile(xs, 50):7.1f} ms  p95 {percentile(xs, 95):7.1f} ms"


def _timed(fn, items: list[str], warmup: int = 3) -> list[float]:
    for q in items[:warmup]:
        fn(q)
    out = []
    for q in items:
        t0 = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench_size(size: int, real: list[Chunk], real_vecs: np.ndarray, questions: list[str], emb, spec: IndexSpec,
               root: Path, uri: str = "") -> None:
    from retrieval import milvus_store

    settings = load_settings(paths={"kb_root": str(root / f"kb-{size}")},
                             store={"backend": "milvus", "uri": uri or str(root / f"kb-{size}" / "milvus.db")})
    name = f"zwbench{size}" if uri else "bench"
    try:
        _bench(settings, name, size, real, real_vecs, questions, emb, spec)
    finally:
        if uri:
            from retrieval.store import delete_knowledge_base

            delete_knowledge_base(name, settings)
        milvus_store.close_clients()


def _bench(settings, name: str, size: int, real: list[Chunk], real_vecs: np.ndarray, questions: list[str], emb,
           spec: IndexSpec) -> None:
    from retrieval import milvus_store

    chunks, vecs = replicate(real, real_vecs, size)
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(chunks):
        by_sha[c.sha256].append(i)
    t0 = time.perf_counter()
    with KnowledgeBase.open_writer(name, settings) as w:
        w.set_spec(spec)
        for sha, rows in by_sha.items():
            w.add_content(sha, [chunks[i] for i in rows], vecs[rows])
            w.put(FileEntry(chunks[rows[0]].source, sha, 1, 0.0, "ok", ingested_at="2026-01-01T00:00:00"))
        w.commit()
    build = time.perf_counter() - t0
    kb = KnowledgeBase.open(name, settings)
    rss = psutil.Process().memory_info().rss / 2**30
    print(f"\n[{time.strftime('%H:%M:%S', time.gmtime())} UTC] load average {os.getloadavg()[0]:.1f}")
    print(f"== Milvus Lite, {len(kb):,} chunks in {len(kb.manifest.files):,} files: build {build:.1f} s, "
          f"RSS {rss:.2f} GiB")
    full = HybridSearcher(settings.retrieval, emb)
    qvecs = {q: emb.encode_query(q) for q in questions}
    cached = HybridSearcher(settings.retrieval, _CachedQueries(qvecs))
    print(f"search-full      {_ms(_timed(lambda q: full.search(kb, q), questions))}")
    print(f"search-cached    {_ms(_timed(lambda q: cached.search(kb, q), questions))}")
    from pymilvus import AnnSearchRequest, WeightedRanker

    c, coll = milvus_store.client(settings), milvus_store.collection_name(name)
    fields, limit = milvus_store._FIELDS + ["vector"], settings.retrieval.fetch_k + 16

    def dense(q: str):
        return c.search(coll, data=[qvecs[q].tolist()], anns_field="vector", limit=limit,
                        search_params={"metric_type": "COSINE"}, output_fields=fields)

    def sparse(q: str):
        return c.search(coll, data=[q], anns_field="sparse", limit=limit, search_params={"metric_type": "BM25"},
                        output_fields=fields)

    def hybrid(q: str):
        reqs = [AnnSearchRequest([qvecs[q].tolist()], "vector", {"metric_type": "COSINE"}, limit),
                AnnSearchRequest([q], "sparse", {"metric_type": "BM25"}, limit)]
        return c.hybrid_search(coll, reqs, ranker=WeightedRanker(0.5, 0.5), limit=limit, output_fields=fields)

    for label, fn in (("engine-dense", dense), ("engine-bm25", sparse), ("engine-hybrid", hybrid)):
        print(f"{label:<16} {_ms(_timed(fn, questions))}")

    # One new file: a real passage with a new first sentence (so it is new content, not a near-duplicate the
    # searcher would drop), embedded now; the question asks for that sentence.
    from dataclasses import replace

    passage = [replace(c, text="紫檀木家具的鉴定流程分为三步。" + c.text) for c in real if c.sha256 == real[0].sha256]
    sha = "f" * 64
    question = "紫檀木家具的鉴定流程分几步？"
    t0 = time.perf_counter()
    with KnowledgeBase.open_writer(name, settings) as w:
        v = emb.encode_passages([c.embedding_text() for c in passage])
        w.add_content(sha, passage, v)
        w.put(FileEntry("new/added.txt", sha, 1, 0.0, "ok"))
        w.commit()
    kb = kb.reopen()
    t1 = time.perf_counter()
    hits = full.search(kb, question, threshold=-1.0)
    t2 = time.perf_counter()
    print(f"add one file     searchable after {t2 - t0:6.2f} s (first query {1000 * (t2 - t1):.0f} ms; "
          f"{len(passage)} chunks; found: {any(h.source == 'new/added.txt' for h in hits.hits)})")
    t0 = time.perf_counter()
    with KnowledgeBase.open_writer(name, settings) as w:
        w.remove("new/added.txt")
        w.commit()
    kb = kb.reopen()
    t1 = time.perf_counter()
    hits = full.search(kb, question, threshold=-1.0)
    t2 = time.perf_counter()
    print(f"delete one file  gone after {t2 - t0:6.2f} s (first query {1000 * (t2 - t1):.0f} ms; "
          f"still found: {any(h.source == 'new/added.txt' for h in hits.hits)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--uri", default="", help="a Milvus server (http://host:19530) instead of a Milvus Lite file")
    args = ap.parse_args(argv)
    settings = load_settings()
    real, questions = cmrc_chunks(settings)
    emb, real_vecs = real_vectors(settings, real)
    spec = IndexSpec(emb.model_id, emb.dim, settings.embedding.passage_prefix, settings.embedding.max_seq_length,
                     settings.ingest.chunk_size, settings.ingest.chunk_overlap)
    print(f"machine: {describe_machine()}")
    import milvus_lite
    import pymilvus

    print(f"pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__}")
    print(f"embedder precision {emb.precision}; {len(real)} real chunks, {args.queries} questions")
    root = Path(tempfile.mkdtemp(prefix="zhiwen-scale-milvus-"))
    try:
        for size in args.sizes:
            bench_size(size, real, real_vecs, questions[: args.queries], emb, spec, root, args.uri)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
