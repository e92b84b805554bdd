"""Run as `python -m tests.support.checkpoint_kill <folder> <kb name>` (settings from ZHIWEN_* variables): ingest
with a slow embedder and kill this process with SIGKILL right after the first checkpoint, as `kill -9` would.

Why a self-inflicted kill and a slow embedder: the test must kill the ingest after its first checkpoint but long
before the end, whatever the machine's speed. Killing from the parent after seeing the checkpoint on disk races
with the rest of the run; the progress callback's "write" event comes right after the commit, so the kill lands
exactly there. The embedder is the real (tiny, random) sentence-transformers model plus a fixed sleep per passage,
standing in for a real model on a CPU (e5 embeds ~5-20 passages/s on 2 cores): a long embedding batch after all
files are parsed, which is where checkpoints used to stop happening (issue 13 item 2): they were only checked
between parsed files and after one embedding call over everything pending. EMBED_STEP_CHUNKS is made smaller so
that a couple of hundred chunks are several steps without a minute-long test.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from configs import load_settings
from ingest import ingest, processor
from retrieval.embeddings import Embedder

SLEEP_PER_PASSAGE_S = 0.1
STEP_CHUNKS = 16


class SlowEmbedder(Embedder):
    def encode_passages(self, texts):
        time.sleep(SLEEP_PER_PASSAGE_S * len(texts))
        return super().encode_passages(texts)


def _kill_after_checkpoint(event) -> None:
    if event.phase == "write":
        os.kill(os.getpid(), signal.SIGKILL)


def main(folder: str, kb_name: str) -> None:
    processor.EMBED_STEP_CHUNKS = STEP_CHUNKS
    settings = load_settings()
    embedder = SlowEmbedder.from_settings(settings)
    # Warm up first (start the parsers' forkserver, load the model) on a one-file folder into another knowledge
    # base, so that the timed run parses every file well within ingest.commit_every_s and then spends its time
    # embedding, as a real run on a CPU does: the checkpoint has to come from inside the embedding batch.
    warm = Path(folder).parent / f"{Path(folder).name}-warm-up"
    warm.mkdir(exist_ok=True)
    (warm / "warm.txt").write_text("预热。", encoding="utf-8")
    ingest(warm, f"{kb_name}-warm-up", settings, embedder=embedder)
    report = ingest(Path(folder), kb_name, settings, embedder=embedder, on_progress=_kill_after_checkpoint)
    print(f"finished without a checkpoint before the end: {report.chunks_embedded} chunks", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
