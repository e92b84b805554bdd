"""Knowledge bases of 10k / 100k / 1M chunks on disk, through the product's store: query latency with question
encoding, RSS, one-file add / replace / delete → searchable, bytes written per one-file commit, IVF recall@10.

    flock /tmp/zhiwen-bench.lock .venv/bin/python -m bench.scale                          # 10k, 100k; flat + ivf
    flock /tmp/zhiwen-bench.lock .venv/bin/python -m bench.scale --sizes 1000000 --kinds ivf flat

Corpus: bench.latency's replica method (real CMRC trial chunks embedded once with the product's Embedder; replica
vectors get Gaussian noise and are re-normalised; each replica of a passage is its own file). Replica texts keep
their original text here (bench.latency --same-text): the store tokenises every chunk at commit, and jieba over
1M distinct texts would take most of an hour on this machine, so tokenize() is memoised by text while the KB is
built (never while timing queries or updates). Each knowledge base is written by the product's KBWriter in one
commit (one segment, as after a merge) with store.faiss_index = flat (exact) or ivf (approximate), then opened
by KnowledgeBase.open like the app does.

Per size and index kind it prints:
  build / open          seconds to commit the whole KB / to open it in a fresh cache (segments loaded, verified)
  rss                   resident memory of this process after opening (the e5 model included, ~0.4 GiB)
  search-full           HybridSearcher.search(kb, question) incl. encoding the question: p50 / p95
  search-cached         the same with the question's vector pre-computed
  recall@10             ivf only: share of the exact top-10 (IndexFlatIP over the same vectors) the KB's dense
                        search returns, over the questions, at store.ivf_nprobe
  add / replace / delete one file (a real CMRC passage, embedded now with the Embedder): writer open (cached
                        segments, as in the app), embed, commit, reopen, first search — total = "searchable";
                        bytes = what the commit wrote (KBWriter.last_commit_bytes; hard links not counted)
  first-query           the first search after the update, to compare with search-full p50
  cold-writer           opening a writer in a fresh process (segments read and verified: what ingest.py pays)
  peak rss              the process's high-water mark so far (ru_maxrss: building, opening, searching)

Memory: the replicas are freed before the KB is opened when it is the last index kind of a size (recall@10 is
computed against faiss.knn over the vectors first, by (sha256, position)). `--commit-rows N` builds the KB in commits
of about N chunks with the replicas made batch by batch (segments are merged as the store does for any ingest), so
a full 1M-chunk hybrid KB (`--sizes 1000000 --kinds ivf --commit-rows 100000`) never holds all replicas at once.

--dense-only (for 1M on a machine without the ~5 GB a full 1M-chunk KB in memory needs): only the replica vectors,
no chunks or BM25: exact search (faiss.knn over the array, what IndexFlatIP does) against the IVF index the store
builds (segments.build_index), recall@10 per nprobe, and encode + dense search per question, p50 / p95.
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import os
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import psutil

from bench.corpus import cmrc_chunks
from bench.eval.metrics import percentile
from bench.latency import NOISE_SIGMA, _CachedQueries, real_vectors, replicate
from bench.machine import describe_machine
from configs import load_settings
from retrieval import bm25 as bm25_mod
from retrieval.segments import SEGMENTS
from retrieval.store import FileEntry, IndexSpec, KnowledgeBase
from retrieval.types import Chunk


def _ms(xs: list[float]) -> str:
    return f"p50 {percentile(xs, 50):7.1f} ms  p95 {percentile(xs, 95):7.1f} ms"


def _rss() -> float:
    return psutil.Process().memory_info().rss / 2**30


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _spec(settings, dim: int) -> IndexSpec:
    return IndexSpec(model_id="bench-replicas", dim=dim, passage_prefix=settings.embedding.passage_prefix,
                     max_seq_length=settings.embedding.max_seq_length, chunk_size=settings.ingest.chunk_size,
                     chunk_overlap=settings.ingest.chunk_overlap)


def _entry(path: str, sha: str) -> FileEntry:
    return FileEntry(path=path, sha256=sha, size=1000, mtime=1.0, status="ok", ingested_at="2026-12-01T00:00:00+00:00")


def replica_batches(real: list[Chunk], real_vecs: np.ndarray, size: int, rows: int, seed: int = 0):
    """Exactly what bench.latency.replicate(..., perturb_text=False) makes, in batches of about `rows` chunks (whole
    replica rounds, so no file is split), for building a 1M-chunk KB without holding every replica at once."""
    rng = np.random.default_rng(seed)
    made, r = 0, 0
    out_c: list[Chunk] = []
    out_v: list[np.ndarray] = []
    while made < size:
        take = min(len(real), size - made)
        block = real_vecs[:take].copy()
        for c in real[:take]:
            sha = hashlib.sha256(f"{r}:{c.sha256}".encode()).hexdigest()
            out_c.append(replace(c, source=f"rep{r}/{c.source}", sha256=sha, id=made))
            made += 1
        if r:
            block += rng.normal(0, NOISE_SIGMA, block.shape).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out_v.append(block)
        r += 1
        if len(out_c) >= rows or made >= size:
            yield out_c, np.ascontiguousarray(np.vstack(out_v), dtype=np.float32)
            out_c, out_v = [], []


def exact_top10(batches, qmat: np.ndarray) -> list[list[tuple[str, int]]]:
    """Per question, the exact top-10 chunks as (sha256, position) over all batches (faiss.knn = IndexFlatIP)."""
    best: list[list[tuple[float, tuple[str, int]]]] = [[] for _ in range(len(qmat))]
    for chunks, vecs in batches:
        scores, rows = faiss.knn(qmat, vecs, 10, metric=faiss.METRIC_INNER_PRODUCT)
        for i in range(len(qmat)):
            best[i] += [(float(sc), (chunks[r].sha256, chunks[r].position)) for sc, r in zip(scores[i], rows[i],
                                                                                            strict=True) if r >= 0]
            best[i] = sorted(best[i], key=lambda x: -x[0])[:10]
    return [[key for _, key in b] for b in best]


def build(settings, name: str, batches) -> float:
    """Write the KB, one commit per batch; tokenize() memoised by text meanwhile (see the module doc)."""
    original = bm25_mod.tokenize
    bm25_mod.tokenize = functools.lru_cache(maxsize=None)(original)
    t0 = time.perf_counter()
    try:
        with KnowledgeBase.open_writer(name, settings) as w:
            for chunks, vecs in batches:
                w.set_spec(_spec(settings, vecs.shape[1]))
                start = 0
                while start < len(chunks):
                    end = start
                    while end < len(chunks) and chunks[end].sha256 == chunks[start].sha256:
                        end += 1
                    group = chunks[start:end]
                    w.add_content(group[0].sha256, [c for c in group], vecs[start:end])
                    w.put(_entry(group[0].source, group[0].sha256))
                    start = end
                w.commit()
    finally:
        bm25_mod.tokenize = original
    return time.perf_counter() - t0


def one_file_updates(settings, name: str, emb, searcher, new_file: list[Chunk], question: str) -> None:
    """add / replace / delete one file; the writer and reader run in this process with its segment cache."""
    kb = KnowledgeBase.open(name, settings)
    texts = [c.embedding_text() for c in new_file]

    def update(kind: str) -> None:
        nonlocal kb
        io0 = psutil.Process().io_counters().write_chars
        t = {}
        t0 = time.perf_counter()
        with kb.writer() as w:
            t["writer"] = time.perf_counter() - t0
            if kind == "delete":
                w.remove("new/file.txt")
            else:
                t1 = time.perf_counter()
                vecs = emb.encode_passages(texts)
                t["embed"] = time.perf_counter() - t1
                sha = "f" * 63 + ("1" if kind == "add" else "2")
                body = new_file if kind == "add" else [Chunk(text=c.text + "（修订）", source=c.source, sha256=sha,
                                                             position=c.position) for c in new_file]
                body = [Chunk(text=c.text, source="new/file.txt", sha256=sha, position=c.position) for c in body]
                w.add_content(sha, body, vecs)
                w.put(_entry("new/file.txt", sha))
            t1 = time.perf_counter()
            w.commit()
            t["commit"] = time.perf_counter() - t1
            written = w.last_commit_bytes
        t1 = time.perf_counter()
        kb = kb.reopen()
        t["reopen"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        res = searcher.search(kb, question)
        t["first-query"] = time.perf_counter() - t1
        total = time.perf_counter() - t0
        found = any(h.source == "new/file.txt" for h in res.hits + res.low_relevance)
        ok = found if kind != "delete" else not found
        wchar = psutil.Process().io_counters().write_chars - io0
        parts = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items())
        print(f"  {kind:<8} searchable in {total:5.2f} s ({parts}); commit wrote {written / 1e6:.2f} MB "
              f"(process write() total {wchar / 1e6:.2f} MB); new file {'found' if found else 'absent'} "
              f"({'as expected' if ok else 'WRONG'})")

    for kind in ("add", "replace", "delete"):
        update(kind)


def dense_only(args, base, emb, real, real_vecs, questions, qvecs) -> int:
    from retrieval.segments import build_index

    fetch_k = base.retrieval.fetch_k
    q = np.vstack([qvecs[x] for x in questions])
    for size in args.sizes:
        _, vecs = replicate(real, real_vecs, size, perturb_text=False)
        print(f"\n== {size:,} vectors (dense only), rss {_rss():.2f} GiB")
        ms = []
        for i in range(len(q)):
            t0 = time.perf_counter()
            faiss.knn(q[i:i + 1], vecs, fetch_k, metric=faiss.METRIC_INNER_PRODUCT)
            ms.append((time.perf_counter() - t0) * 1000)
        print(f"  exact search (fetch_k {fetch_k})   {_ms(ms)}")
        _, truth = faiss.knn(q, vecs, 10, metric=faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        ivf = build_index(vecs, "ivf")
        print(f"  ivf built in {time.perf_counter() - t0:.1f} s ({ivf.nlist} lists), rss {_rss():.2f} GiB")
        for nprobe in args.nprobe or [base.store.ivf_nprobe]:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            _, got = ivf.search(q, 10, params=params)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])
            ms, full = [], []
            for x in questions:
                t0 = time.perf_counter()
                ivf.search(qvecs[x][None, :], fetch_k, params=params)
                ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                ivf.search(np.asarray(emb.encode_query(x), dtype=np.float32)[None, :], fetch_k, params=params)
                full.append((time.perf_counter() - t0) * 1000)
            print(f"  ivf nprobe {nprobe:>3}: recall@10 {recall:.4f}; search {_ms(ms)}; encode+search {_ms(full)}")
        del vecs, ivf
        gc.collect()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--real-chunks", type=int, default=400, help="real chunks embedded and replicated")
    ap.add_argument("--nprobe", type=int, nargs="+", default=None,
                    help="IVF nprobe values for recall (default: store.ivf_nprobe)")
    ap.add_argument("--dense-only", action="store_true", help="vectors only: exact vs IVF (see the module doc)")
    ap.add_argument("--dir", type=Path, default=None, help="where the KBs are written (default: a temp folder)")
    ap.add_argument("--commit-rows", type=int, default=0,
                    help="build each KB in commits of about this many chunks, replicas made batch by batch (for 1M: "
                         "segments merge as in a real ingest, and memory stays at one copy of the KB); 0 = one commit")
    args = ap.parse_args(argv)

    base = load_settings()
    real, questions = cmrc_chunks(base)
    real = real[: args.real_chunks]
    questions = questions[: args.queries]
    emb, real_vecs = real_vectors(base, real)
    from retrieval.retriever import HybridSearcher

    qvecs = {q: np.asarray(emb.encode_query(q), dtype=np.float32) for q in questions}
    every, _ = cmrc_chunks(base)
    new_file = [c for c in every[args.real_chunks:] if c.source == every[args.real_chunks].source]
    print(f"machine: {describe_machine()}, faiss {faiss.__version__}")
    print(f"real chunks {len(real)}, queries {len(questions)}, one-file update: {len(new_file)} chunks; "
          f"retrieval mode {base.retrieval.mode}, fetch_k {base.retrieval.fetch_k}, top_k {base.retrieval.top_k}")
    if args.dense_only:
        return dense_only(args, base, emb, real, real_vecs, questions, qvecs)
    root = args.dir or Path(tempfile.mkdtemp(prefix="zhiwen-scale-"))
    try:
        qmat = np.vstack([qvecs[x] for x in questions])
        for size in args.sizes:
            print(f"\n[{time.strftime('%H:%M:%S', time.gmtime())} UTC] load average {os.getloadavg()[0]:.1f}")
            box = [] if args.commit_rows else [replicate(real, real_vecs, size, perturb_text=False)]
            if args.commit_rows:  # streamed: one commit per batch, the replicas made again for each index kind
                batches = functools.partial(replica_batches, real, real_vecs, size, args.commit_rows)
            else:
                batches = box.copy  # one batch: all replicas, one commit
            truth = exact_top10(batches(), qmat) if "ivf" in args.kinds else None
            for kind in args.kinds:
                settings = load_settings(paths={"kb_root": str(root)},
                                         store={"faiss_index": kind, "ivf_nprobe": base.store.ivf_nprobe})
                name = f"s{size}-{kind}"
                build_s = build(settings, name, batches())
                if kind == args.kinds[-1]:  # the replicas are not needed any more: one copy of the KB in memory
                    box.clear()
                SEGMENTS._items.clear()
                gc.collect()
                t0 = time.perf_counter()
                kb = KnowledgeBase.open(name, settings)
                open_s = time.perf_counter() - t0
                du = sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file()) / 1e6
                print(f"\n== {size:,} chunks, {kind}: build {build_s:.1f} s, open {open_s:.1f} s, "
                      f"rss {_rss():.2f} GiB (peak so far {_peak():.2f} GiB), on disk {du:.0f} MB")
                full = HybridSearcher(settings.retrieval, emb)
                cached = HybridSearcher(settings.retrieval, _CachedQueries(qvecs))
                for label, s in (("search-full", full), ("search-cached", cached)):
                    for q in questions[:3]:
                        s.search(kb, q)
                    ms = []
                    for q in questions:
                        t0 = time.perf_counter()
                        s.search(kb, q)
                        ms.append((time.perf_counter() - t0) * 1000)
                    print(f"  {label:<14} {_ms(ms)}")
                if kind == "ivf":
                    for nprobe in args.nprobe or [settings.store.ivf_nprobe]:
                        kb.index.nprobe = nprobe
                        t0 = time.perf_counter()
                        _, got = kb.index.search(qmat, 10)
                        per_q = (time.perf_counter() - t0) * 1000 / len(qmat)
                        got_keys = [[(kb.chunks[int(r)].sha256, kb.chunks[int(r)].position) for r in row if r >= 0]
                                    for row in got]
                        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got_keys, strict=True)])
                        print(f"  recall@10 vs exact at nprobe {nprobe}: {recall:.4f} ({per_q:.2f} ms per question)")
                    kb.index.nprobe = settings.store.ivf_nprobe
                del kb
                one_file_updates(settings, name, emb, full, new_file, new_file[0].text[:40])
                del full, cached  # their caches hold the live KB; the cold writer stands for a new process
                SEGMENTS._items.clear()
                gc.collect()
                t0 = time.perf_counter()
                with KnowledgeBase.open_writer(name, settings):
                    cold = time.perf_counter() - t0
                print(f"  cold-writer    {cold:.1f} s (segments read and verified, as a fresh ingest.py does); "
                      f"peak rss {_peak():.2f} GiB")
                SEGMENTS._items.clear()
                shutil.rmtree(root / name, ignore_errors=True)
                gc.collect()
            gc.collect()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
