"""Splitter speed on real Chinese text: all of messy_docs/langchain-chatchat's Markdown and txt, and CMRC passages.

    .venv/bin/python -m bench.split_speed                 # characters only
    .venv/bin/python -m bench.split_speed --tokens        # also with the embedding model's token counter

Prints seconds and characters per second (best of --repeat), to compare with embedding time: ingest's parse +
split + write should stay within 15 % of embedding.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document

from configs import PROJECT_ROOT, load_settings
from ingest.splitter import split_documents

DATA = (PROJECT_ROOT.parent / "shared" / "data").resolve()


def _texts() -> dict[str, list[str]]:
    chatchat = DATA / "messy_docs" / "langchain-chatchat"
    files = sorted(chatchat.glob("*.md")) + [chatchat / "test.txt"]
    cmrc = json.loads((DATA / "cmrc2018" / "squad-style-data_cmrc2018_trial.json").read_text(encoding="utf-8"))
    return {
        "messy_docs md+txt": [f.read_text(encoding="utf-8") for f in files],
        "CMRC passages": [p["context"] for d in cmrc["data"] for p in d["paragraphs"]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", action="store_true", help="also bound chunks by the embedding model's tokens")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    settings = load_settings()
    count, limit = None, None
    if args.tokens:
        from retrieval.embeddings import Embedder

        emb = Embedder.from_settings(settings)
        count, limit = emb.count_tokens, emb.max_tokens
        count("warm-up")  # load the tokenizer outside the timing
    for name, texts in _texts().items():
        best, n = float("inf"), 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n = sum(len(split_documents([Document(t, metadata={"kind": "text"})], source="x", sha256="",
                                        chunk_size=settings.ingest.chunk_size,
                                        chunk_overlap=settings.ingest.chunk_overlap, count_tokens=count,
                                        max_tokens=limit)) for t in texts)
            best = min(best, time.perf_counter() - t0)
        chars = sum(len(t) for t in texts)
        print(f"{name:18s} {len(texts):4d} texts {chars:8d} chars -> {n:5d} chunks in {best:.3f} s "
              f"({chars / best / 1e6:.2f} M chars/s){' with token counting' if args.tokens else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
