"""After the diff: parse each group of identical files (worker processes), split, embed across files, store the
chunks in the knowledge-base writer and checkpoint (commit a generation) at least every `ingest.commit_every_s`."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ingest.diff import entry
from ingest.parse_pool import Outcome, parse_all
from ingest.report import FileResult, IngestReport, ProgressEvent
from ingest.scan import SourceFile
from retrieval.store import KBWriter
from retrieval.types import Chunk

if TYPE_CHECKING:
    from configs import Settings
    from retrieval.embeddings import Embedder

ProgressCallback = Callable[[ProgressEvent], None]

# Chunks gathered across files before they are embedded: enough for full, length-sorted batches.
EMBED_FLUSH_CHUNKS = 512
# Chunks per encode_passages call. Between calls finished files are stored and a checkpoint is written when
# ingest.commit_every_s has passed. The demo e5-small embeds about 16 chunks/s on 2 CPU cores (docs/benchmarks.md),
# so a checkpoint is late by about 8 s at most (plus the rest of a file longer than this).
EMBED_STEP_CHUNKS = 128


@dataclass
class _Pending:
    """A parsed group (files with the same bytes) whose chunks wait for vectors; embedded in order, maybe across
    several steps."""

    group: list[SourceFile]
    chunks: list[Chunk]
    vectors: list[np.ndarray] = field(default_factory=list)
    embedded: int = 0                 # chunks[:embedded] have vectors

    @property
    def complete(self) -> bool:
        return self.embedded == len(self.chunks)


def emit(cb: ProgressCallback | None, event: ProgressEvent) -> None:
    if cb is not None:
        cb(event)


class Processor:
    """Parses groups of identical files in worker processes, splits, embeds across files and checkpoints."""

    def __init__(self, w: KBWriter, settings: Settings, embedder: Embedder, report: IngestReport,
                 on_progress: ProgressCallback | None, show_progress: bool) -> None:
        self.w, self.settings, self.embedder, self.report, self.on_progress = w, settings, embedder, report, on_progress
        self.pending: list[_Pending] = []
        self.pending_chunks = 0
        self.last_commit = time.monotonic()
        self.done = 0
        self.total = 0
        self.bar: Any = None
        self.show_progress = show_progress

    def run(self, groups: list[list[SourceFile]]) -> None:
        self.total = len(groups)
        self.bar = tqdm(total=self.total, unit="file", desc="ingest", file=sys.stderr, disable=not self.show_progress,
                        dynamic_ncols=True)
        try:
            for group, outcome in parse_all(groups, self.settings, self.report):
                self._on_parsed(group, outcome)
            self._flush()
        finally:
            self.bar.close()

    # -- one parsed group ------------------------------------------------------------------------------------
    def _on_parsed(self, group: list[SourceFile], outcome: Outcome) -> None:
        first = group[0]
        self.report.bytes_parsed += first.size
        if outcome[0] == "error":
            _, kind, reason = outcome
            self._settle(group, "empty" if kind in ("empty", "no_text") else "failed", reason)
        else:
            self._split_group(group, outcome[1])
        self.done += 1
        self.bar.update(1)
        emit(self.on_progress, ProgressEvent("parse", self.done, self.total, current=first.key,
                                             chunks_done=self.report.chunks_embedded))
        if self.pending_chunks >= EMBED_FLUSH_CHUNKS or self._commit_due():
            self._flush()

    def _split_group(self, group: list[SourceFile], docs: list) -> None:
        """Split the parsed documents; the chunks wait in `pending` for the next embedding call."""
        t0 = time.perf_counter()
        try:
            chunks = self._split(group[0], docs)
        except Exception as e:  # noqa: BLE001 — a splitter bug on one file must not stop the batch
            chunks = None
            self._settle(group, "failed", f"切分文本时出错（{type(e).__name__}: {e}）；请把该文件报告给维护者。")
        self.report.phase_seconds["split"] += time.perf_counter() - t0
        if chunks == []:
            self._settle(group, "empty", "文件中没有可用的文字（解析结果为空）。")
        elif chunks:
            self.pending.append(_Pending(group, chunks))
            self.pending_chunks += len(chunks)

    def _split(self, f: SourceFile, docs: list) -> list[Chunk]:
        from ingest.splitter import split_documents

        s = self.settings.ingest
        return split_documents(docs, source=f.key, sha256=f.sha256, chunk_size=s.chunk_size,
                               chunk_overlap=s.chunk_overlap, count_tokens=self.embedder.count_tokens,
                               max_tokens=self.embedder.max_tokens)

    def _settle(self, group: list[SourceFile], status: str, reason: str) -> None:
        for f in group:
            self.w.put(entry(f, status, reason))
            self.report.files.append(FileResult(f.key, status, reason=reason))

    # -- the flush: embed, store, checkpoint ------------------------------------------------------------------
    def _commit_due(self) -> bool:
        return time.monotonic() - self.last_commit >= self.settings.ingest.commit_every_s

    def _flush(self) -> None:
        """Embed the pending chunks in steps of EMBED_STEP_CHUNKS, in file order, store each content as soon as all
        its chunks have vectors, and checkpoint between steps when one is due: a long embedding batch is never one
        uninterruptible call, so kill -9 loses at most the files finished since the last checkpoint."""
        while self.pending:
            self._embed_step()
            while self.pending and self.pending[0].complete:
                p = self.pending.pop(0)
                self.pending_chunks -= len(p.chunks)
                self._store(p.group, p.chunks, np.concatenate(p.vectors))
            if self._commit_due():
                self._checkpoint()
        if self._commit_due():  # files settled without chunks (failed, empty) are checkpointed too
            self._checkpoint()

    def _embed_step(self) -> None:
        """One encode_passages call over the next EMBED_STEP_CHUNKS pending chunks (a file may span two steps; the
        embedder sorts each step's texts by length and batches them)."""
        todo: list[tuple[_Pending, int, int]] = []
        n = 0
        for p in self.pending:
            if n >= EMBED_STEP_CHUNKS:
                break
            take = min(len(p.chunks) - p.embedded, EMBED_STEP_CHUNKS - n)
            if take:
                todo.append((p, p.embedded, p.embedded + take))
                n += take
        vectors = self._embed([c for p, a, b in todo for c in p.chunks[a:b]])
        start = 0
        for p, a, b in todo:
            p.vectors.append(vectors[start:start + b - a])
            p.embedded = b
            start += b - a

    def _embed(self, chunks: list[Chunk]) -> np.ndarray:
        t0 = time.perf_counter()
        self.bar.set_postfix_str(f"embedding {len(chunks)} chunks")
        vectors = np.asarray(self.embedder.encode_passages([c.embedding_text() for c in chunks]), dtype=np.float32)
        self.bar.set_postfix_str("")
        self.report.phase_seconds["embed"] += time.perf_counter() - t0
        self.report.chunks_embedded += len(chunks)
        emit(self.on_progress, ProgressEvent("embed", self.done, self.total, chunks_done=self.report.chunks_embedded))
        return vectors

    def _store(self, group: list[SourceFile], chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Add one content's chunks and record its files. A forced re-ingest of known content leaves it with its
        current owner (manifest and report agree)."""
        live = self.w.live_paths(group[0].sha256)
        owner = live[0] if live else group[0].key
        self.w.add_content(group[0].sha256, chunks, vectors)
        for f in group:
            status = "ok" if f.key == owner else "duplicate"
            self.w.put(entry(f, status))
            self.report.files.append(FileResult(f.key, status, len(chunks),
                                                duplicate_of=None if status == "ok" else owner))

    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.w.commit()
        self.report.phase_seconds["write"] += time.perf_counter() - t0
        self.last_commit = time.monotonic()
        emit(self.on_progress, ProgressEvent("write", self.done, self.total, chunks_done=self.report.chunks_embedded))
