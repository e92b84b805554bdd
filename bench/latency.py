"""Retrieval-only query latency (no LLM) at 10k and 100k chunks on CPU: FAISS + BM25 + fusion + merging.

    .venv/bin/python -m bench.latency                       # sizes 10000 and 100000, 200 queries each
    .venv/bin/python -m bench.latency --sizes 10000 --queries 100

How the large knowledge bases are built (embedding 100k chunks with e5-small on 2 cores would take ~2 hours):
  1. The CMRC 2018 trial passages are cut by the product's splitter (250/50 characters) and embedded once with
     the product's Embedder — a few hundred real chunks (cached under artifacts/bench/; --real-chunks N takes
     only the first N).
  2. Replica r > 0 of each chunk gets a perturbed copy: 10% of its characters are replaced by characters drawn
     from the corpus (so BM25 sees new token statistics, not exact duplicates), and its vector gets Gaussian
     noise (σ = 0.025 per dimension, cosine ≈ 0.9 to the original — below the searcher's 0.95 de-duplication
     threshold) and is re-normalised. Replicas are new files (own source and sha256), so neighbour merging and
     de-duplication work as on real data. Replicas are added until the target size is reached.
     With --same-text replicas keep the original text (vectors still perturbed): the BM25 build tokenizes each
     distinct text once, and the searcher's near-duplicate filter has to skip identical texts (worse for it).
  3. Queries are the CMRC trial questions. Each is timed through HybridSearcher.search_chunks — the same code
     KnowledgeBase search runs — with the store's index type (faiss.IndexFlatIP, exact search).

Printed per size: build time of the BM25 index; p50/p95/mean of
  search-full    search_chunks incl. encoding the question with the Embedder (what a user waits for)
  search-cached  the same with the question's vector pre-computed (FAISS + BM25 + fusion + merge/dedupe)
  faiss-only     IndexFlatIP.search for fetch_k
  bm25-only      BM25Index.search for fetch_k
  embed-query    Embedder.encode_query
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import psutil

from bench.corpus import cmrc_chunks
from bench.eval.metrics import mean, percentile
from bench.machine import describe_machine
from configs import PROJECT_ROOT, load_settings
from configs.settings import RetrievalSettings, Settings
from retrieval.types import Chunk

CACHE_DIR = PROJECT_ROOT / "artifacts" / "bench"
NOISE_SIGMA = 0.025
CHAR_SWAP = 0.10


def real_vectors(settings: Settings, chunks: list[Chunk]):
    """(embedder, vectors of `chunks`) — vectors cached per model fingerprint and chunk texts."""
    from retrieval.embeddings import Embedder

    emb = Embedder.from_settings(settings)
    emb.warm_up()
    key = hashlib.sha256((emb.model_id + "\x00".join(c.embedding_text() for c in chunks)).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"cmrc-vectors-{key}.npy"
    if path.is_file():
        return emb, np.load(path)
    t0 = time.perf_counter()
    vecs = emb.encode_passages([c.embedding_text() for c in chunks])
    print(f"embedded {len(chunks)} real chunks in {time.perf_counter() - t0:.1f} s (cached at {path})")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return emb, vecs


def replicate(chunks: list[Chunk], vectors: np.ndarray, size: int, seed: int = 0,
              perturb_text: bool = True) -> tuple[list[Chunk], np.ndarray]:
    """Grow the real chunks to `size` with perturbed replicas (see the module doc)."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(sorted({ch for c in chunks for ch in c.text if not ch.isspace()}))
    out_chunks: list[Chunk] = []
    out_vecs: list[np.ndarray] = []
    r = 0
    while len(out_chunks) < size:
        take = min(len(chunks), size - len(out_chunks))
        block = vectors[:take].copy()
        for c in chunks[:take]:
            text = c.text
            if r and perturb_text:
                chars = np.array(list(text))
                idx = rng.random(len(chars)) < CHAR_SWAP
                chars[idx] = rng.choice(alphabet, int(idx.sum()))
                text = "".join(chars)
            sha = hashlib.sha256(f"{r}:{c.sha256}".encode()).hexdigest()
            out_chunks.append(replace(c, text=text, source=f"rep{r}/{c.source}", sha256=sha, id=len(out_chunks)))
        if r:
            block += rng.normal(0, NOISE_SIGMA, block.shape).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out_vecs.append(block)
        r += 1
    return out_chunks, np.ascontiguousarray(np.vstack(out_vecs), dtype=np.float32)


class _CachedQueries:
    """An encoder that returns pre-computed question vectors: times the search without the embedding model."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode_query(self, text: str) -> np.ndarray:
        return self.vectors[text]


def _stats(ms: list[float]) -> str:
    return f"p50 {percentile(ms, 50):7.2f} ms  p95 {percentile(ms, 95):7.2f} ms  mean {mean(ms):7.2f} ms"


def _timed(fn, items, warmup: int = 3) -> list[float]:
    for it in items[:warmup]:  # first calls pay one-off costs (jieba's dictionary, thread pools)
        fn(it)
    out = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _bench_size(size: int, real: list[Chunk], real_vecs: np.ndarray, questions: list[str],
                qvecs: dict[str, np.ndarray], emb: object, s: RetrievalSettings, mode: str,
                perturb_text: bool = True) -> None:
    """Build one knowledge base of `size` chunks in memory and print its latency lines."""
    from retrieval import bm25
    from retrieval.retriever import HybridSearcher, prepare

    chunks, vecs = replicate(real, real_vecs, size, perturb_text=perturb_text)
    index = faiss.IndexFlatIP(vecs.shape[1])      # what the store writes
    index.add(vecs)
    t0 = time.perf_counter()
    if perturb_text:
        prepared = prepare(chunks)
    else:
        # Identical replica texts: tokenize each distinct text once (jieba over 25M characters takes many
        # minutes on a busy 2-core machine). Query-time tokenization is untouched.
        original = bm25.tokenize
        bm25.tokenize = functools.lru_cache(maxsize=None)(original)
        try:
            prepared = prepare(chunks)
        finally:
            bm25.tokenize = original
    build_s = time.perf_counter() - t0
    full = HybridSearcher(s, emb)
    cached = HybridSearcher(s, _CachedQueries(qvecs))
    print(f"\n== {len(chunks):,} chunks (BM25 + neighbour map built in {build_s:.1f} s, "
          f"RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB)")

    def search_full(q: str) -> object:
        return full.search_chunks(q, chunks, index, prepared=prepared, mode=mode)

    def search_cached(q: str) -> object:
        return cached.search_chunks(q, chunks, index, prepared=prepared, mode=mode)

    print(f"search-full      {_stats(_timed(search_full, questions))}")
    print(f"search-cached    {_stats(_timed(search_cached, questions))}")
    print(f"faiss-only       {_stats(_timed(lambda q: index.search(qvecs[q][None, :], s.fetch_k), questions))}")
    print(f"bm25-only        {_stats(_timed(lambda q: prepared.bm25.search(q, s.fetch_k), questions))}")


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="knowledge-base sizes in chunks")
    ap.add_argument("--queries", type=int, default=200, help="questions timed per size (default 200)")
    ap.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "bm25"])
    ap.add_argument("--same-text", action="store_true",
                    help="replicas keep their original text (only vectors are perturbed): BM25 is built in seconds, "
                         "and identical texts exercise the searcher's de-duplication (a worst case for it)")
    ap.add_argument("--real-chunks", type=int, default=0,
                    help="embed only the first N real chunks and replicate those (0 = all; saves time on a busy CPU)")
    args = ap.parse_args(argv)

    settings = load_settings()
    s = settings.retrieval
    real, questions = cmrc_chunks(settings)
    if args.real_chunks:
        real = real[: args.real_chunks]
    questions = questions[: args.queries]
    emb, real_vecs = real_vectors(settings, real)
    emb.encode_query(questions[0])  # warm-up
    qvecs: dict[str, np.ndarray] = {}
    embed_ms: list[float] = []
    for q in questions:             # encoding each question once gives both its vector and the embed-query time
        t0 = time.perf_counter()
        qvecs[q] = np.asarray(emb.encode_query(q), dtype=np.float32)
        embed_ms.append((time.perf_counter() - t0) * 1000)
    print(f"machine: {describe_machine()}, faiss {faiss.__version__}")
    print(f"real chunks: {len(real)} from CMRC trial ({settings.ingest.chunk_size}/{settings.ingest.chunk_overlap}); "
          f"queries: {len(questions)}; mode {args.mode}, fusion {s.fusion}, fetch_k {s.fetch_k}, top_k {s.top_k}, "
          f"merge_neighbors {s.merge_neighbors}")
    print(f"embed-query      {_stats(embed_ms)}")

    for size in args.sizes:
        _bench_size(size, real, real_vecs, questions, qvecs, emb, s, args.mode, perturb_text=not args.same_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
