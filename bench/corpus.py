"""Real chunks for the benchmarks: CMRC 2018 trial passages cut by the product's own splitter."""
from __future__ import annotations

import hashlib
from pathlib import Path

from langchain_core.documents import Document

from bench.eval.datasets import read_eval_set
from configs import PROJECT_ROOT
from configs.settings import Settings
from retrieval.types import Chunk

CMRC_TRIAL = (PROJECT_ROOT.parent / "shared" / "data" / "cmrc2018" / "squad-style-data_cmrc2018_trial.json").resolve()


def cmrc_chunks(settings: Settings, path: Path = CMRC_TRIAL) -> tuple[list[Chunk], list[str]]:
    """(chunks of every passage at settings.ingest.chunk_size/overlap, every question) of a CMRC-style file."""
    from ingest.splitter import split_documents  # the ingest room's splitter: the same cuts as a real ingest

    if not Path(path).is_file():
        raise SystemExit(f"benchmark data not found: {path} (the CMRC 2018 trial file in shared/data)")
    ds = read_eval_set(path)
    chunks: list[Chunk] = []
    for pid, p in sorted(ds.passages.items()):
        doc = Document(page_content=p.text, metadata={"kind": "text"})
        sha = hashlib.sha256(p.text.encode("utf-8")).hexdigest()
        chunks += split_documents([doc], source=f"{pid}.txt", sha256=sha, chunk_size=settings.ingest.chunk_size,
                                  chunk_overlap=settings.ingest.chunk_overlap)
    return chunks, [q.query for q in ds.questions]
