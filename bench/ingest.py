"""Ingest throughput with the real embedding model; prints numbers, asserts nothing.

    .venv/bin/python -m bench.ingest                       # CMRC trial passages + messy_docs, then the 2,000-file rerun
    .venv/bin/python -m bench.ingest --cmrc-limit 80 --no-messy --small-files 2000

1. Writes the CMRC 2018 trial passages (data → paragraphs → context) as one .txt file each, plus a copy of
   messy_docs, into a temporary folder; ingests it with the model of embedding.model (multilingual-e5-small);
   prints files/s, chunks/s, MB/s and the time per phase, then the time of a second, unchanged run.
2. Prints parse + split + write as a % of embed time (target ≤ 15 %: the model should be the bottleneck) and the
   pipeline's embed time next to a bare SentenceTransformer.encode of the same texts (target within 20 %).
   "parse" is the time the main process waited for the parser processes (they run while it embeds).
3. Creates N small files, ingests them, and times an unchanged re-run (target ≤ 3 s for 2,000 files).

The shared 2-core machine's load average is printed too: numbers taken under load are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from configs import PROJECT_ROOT, load_settings
from ingest import ingest
from retrieval.embeddings import Embedder
from retrieval.store import KnowledgeBase

SHARED = PROJECT_ROOT.parent / "shared" / "data"
CMRC = SHARED / "cmrc2018" / "squad-style-data_cmrc2018_trial.json"
MESSY = SHARED / "messy_docs"


def write_cmrc(folder: Path, limit: int | None) -> int:
    data = json.loads(CMRC.read_text(encoding="utf-8"))
    contexts = [p for art in data["data"] for p in art["paragraphs"]][:limit]
    folder.mkdir(parents=True, exist_ok=True)
    for p in contexts:
        (folder / f"{p['id']}.txt").write_text(p["context"], encoding="utf-8")
    return len(contexts)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def phases(report) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in report.phase_seconds.items())


def part_one_and_two(args: argparse.Namespace, tmp: Path, settings, embedder: Embedder) -> None:
    docs = tmp / "docs"
    n_cmrc = write_cmrc(docs / "cmrc", args.cmrc_limit)
    if not args.no_messy:
        shutil.copytree(MESSY, docs / "messy_docs")
    mb = folder_mb(docs)
    t0 = time.perf_counter()
    r = ingest(docs, "bench", settings, embedder=embedder)
    wall = time.perf_counter() - t0
    t = r.totals
    print(f"\n[first run] {t['files']} files ({n_cmrc} CMRC passages{'' if args.no_messy else ' + messy_docs'}), "
          f"{mb:.2f} MB, {t['chunks']} chunks, {t['failed']} failed, {t['empty']} empty: {wall:.1f}s")
    print(f"  {t['files'] / wall:.2f} files/s, {r.chunks_embedded / wall:.2f} chunks/s, {mb / wall:.3f} MB/s")
    print(f"  phases: {phases(r)}")
    ps = r.phase_seconds
    overhead = ps["parse"] + ps["split"] + ps["write"]
    print(f"  parse+split+write = {overhead:.2f}s = {100 * overhead / ps['embed']:.1f} % of embed time (target <= "
          "15 %)")

    t0 = time.perf_counter()
    r2 = ingest(docs, "bench", settings, embedder=embedder)
    print(f"\n[unchanged rerun] {time.perf_counter() - t0:.2f}s, statuses {nonzero(r2.totals)}")

    # The same texts through a bare SentenceTransformer.encode (same prefix, batch size, normalisation).
    kb = KnowledgeBase.open("bench", settings)
    texts = [c.embedding_text() for c in kb.chunks][: args.compare_limit]
    model = embedder._get_model()
    prefixed = [settings.embedding.passage_prefix + x for x in texts]
    t0 = time.perf_counter()
    model.encode(prefixed, batch_size=settings.embedding.batch_size, normalize_embeddings=True,
                 convert_to_numpy=True, show_progress_bar=False)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder.encode_passages(texts)
    ours = time.perf_counter() - t0
    pipeline_rate = r.chunks_embedded / ps["embed"]
    print(f"\n[embed vs bare encode] {len(texts)} texts: bare SentenceTransformer.encode {bare:.1f}s "
          f"({len(texts) / bare:.2f}/s); Embedder.encode_passages {ours:.1f}s ({len(texts) / ours:.2f}/s); "
          f"pipeline embed phase {pipeline_rate:.2f} chunks/s = "
          f"{100 * (len(texts) / bare) / pipeline_rate - 100:+.1f} % "
          f"time per chunk vs bare (target within 20 %)")


def small_files(args: argparse.Namespace, tmp: Path, settings, embedder: Embedder) -> None:
    small = tmp / "small"
    small.mkdir()
    for i in range(args.small_files):
        (small / f"note-{i:05d}.txt").write_text(f"第{i}号通知：会议改在{i % 12 + 1}月{i % 28 + 1}日召开。",
                                                 encoding="utf-8")
    old = time.time() - 3600  # files that have sat there a while (freshly written ones are always re-hashed)
    for p in small.iterdir():
        os.utime(p, (old, old))
    t0 = time.perf_counter()
    rs = ingest(small, "small", settings, embedder=embedder)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rs2 = ingest(small, "small", settings, embedder=embedder)
    rerun = time.perf_counter() - t0
    print(f"\n[{args.small_files} small files, model {embedder.model_id}] first run {first:.1f}s "
          f"({rs.totals['chunks']} chunks); unchanged rerun {rerun:.2f}s (target <= 3 s), "
          f"statuses {nonzero(rs2.totals)}")


def nonzero(totals: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in totals.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cmrc-limit", type=int, default=None, help="only the first N CMRC passages (default: all 256)")
    ap.add_argument("--no-messy", action="store_true", help="leave out messy_docs (OCR makes it slow)")
    ap.add_argument("--small-files", type=int, default=2000, help="files for the unchanged-rerun test (0: skip)")
    ap.add_argument("--compare-limit", type=int, default=None, help="texts for the bare-encode comparison (default "
                                                                    "all)")
    ap.add_argument("--workers", type=int, default=None, help="parser processes (default: ingest.workers)")
    ap.add_argument("--only-small-files", action="store_true", help="skip parts 1-2 (just the unchanged-rerun test)")
    ap.add_argument("--small-files-model", default=None,
                    help="embedding model folder for the small-files part only: its rerun embeds nothing, so the "
                         "model does not change the rerun time, and a tiny one saves the first run's minutes")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="zhiwen-bench-ingest-"))
    overrides: dict = {"paths": {"kb_root": str(tmp / "kb")}}
    if args.workers is not None:
        overrides["ingest"] = {"workers": args.workers}
    settings = load_settings(**overrides)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; temp folder {tmp}")
    try:
        if not args.only_small_files:
            embedder = Embedder.from_settings(settings)
            t0 = time.perf_counter()
            embedder.warm_up()
            print(f"model {embedder.model_id} (dim {embedder.dim}, max {embedder.max_tokens} tokens) "
                  f"loaded in {time.perf_counter() - t0:.1f}s")
            part_one_and_two(args, tmp, settings, embedder)
        if args.small_files:
            if args.small_files_model:
                overrides["embedding"] = {"model": args.small_files_model}
                settings = load_settings(**overrides)
            small_files(args, tmp, settings, Embedder.from_settings(settings))
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
