"""What the retriever and ingest need from a knowledge-base store, and the one place a store is chosen.

Two implementations, chosen by `store.backend`:
  faiss   retrieval/store.py: one folder per KB, whole generations of FAISS + JSON files (the default; one machine)
  milvus  retrieval/milvus_store.py: one Milvus collection per KB through pymilvus's MilvusClient (Milvus Lite in a
          file, or a Milvus standalone/cluster server): vectors, text, metadata, Milvus's own BM25 (jieba analyzer)
          and hybrid search with the engine's RRF / weighted ranker (docs/deploy.md)

Callers keep using `retrieval.store` (`KnowledgeBase.open(name, settings)`, `list_knowledge_bases(settings)`, ...):
those entry points hand over to the Milvus store when `store.backend` is milvus, so ingest and the app do not change.
The retriever's fusion, evidence threshold, neighbour merging and de-duplication stay above this Protocol, so both
stores answer alike; a store that searches inside its engine offers `candidates()` (see `EngineCandidates`).
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from retrieval.types import Chunk

if TYPE_CHECKING:
    from configs import Settings
    from retrieval.store import FileEntry, IndexSpec, Manifest


class KBWriterLike(Protocol):
    """The write side ingest uses, under the KB's writer lock. Nothing is visible to readers before `commit()`;
    a commit is atomic for readers (they see the state before it or after it, never half of it), and a writer
    killed at any moment leaves the previous state readable; the next writer cleans up what it left."""

    @property
    def spec(self) -> IndexSpec | None: ...
    @property
    def files(self) -> Mapping[str, FileEntry]: ...
    @property
    def live_generation(self) -> str | None: ...
    def set_spec(self, spec: IndexSpec, *, rebuild: bool = False) -> None: ...
    def add_content(self, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def put(self, entry: FileEntry) -> None: ...
    def remove(self, path: str) -> FileEntry | None: ...
    def has_content(self, sha256: str) -> bool: ...
    def chunk_count(self, sha256: str) -> int: ...
    def live_paths(self, sha256: str) -> list[str]: ...
    def commit(self, *, force: bool = False) -> str | None: ...


@runtime_checkable
class KnowledgeBaseLike(Protocol):
    """The read side: one committed state of a KB (its manifest) and the ways to search it."""

    name: str
    path: Path            # local folder: sources/ (uploads) and the writer lock
    generation: str       # changes with every commit; `is_stale()` compares it with the live one
    manifest: Manifest

    @property
    def sources_dir(self) -> Path: ...
    def is_stale(self) -> bool: ...
    def reopen(self) -> KnowledgeBaseLike: ...
    def sources_for(self, sha256: str) -> list[str]: ...
    def chunks_for(self, sha256: str) -> list[Chunk]: ...
    def writer(self, *, timeout: float | None = 0) -> AbstractContextManager[KBWriterLike]: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class EngineCandidates:
    """What an engine-side search (Milvus) hands the retriever: a small local view of the KB.

    chunks    the candidates and their neighbours (position ± 1), row i of `vectors` is chunks[i]
    dense     (row, cosine) best first, from the engine's dense search ([] when it did not run)
    sparse    (row, BM25 score) best first, from the engine's BM25 ([] when it did not run)
    fused     row -> fused score when the engine ranked dense + BM25 itself (hybrid_search), else None
    """

    chunks: list[Chunk]
    vectors: np.ndarray
    dense: list[tuple[int, float]]
    sparse: list[tuple[int, float]]
    fused: dict[int, float] | None = None


@runtime_checkable
class EngineSearch(Protocol):
    """A store that searches inside its engine (dense, BM25 and hybrid) instead of handing out a FAISS index."""

    def candidates(self, query: np.ndarray | None, question: str, *, mode: str, fetch_k: int, fusion: str,
                   rrf_k: int, dense_weight: float) -> EngineCandidates: ...


def backend_of(settings: Settings) -> str:
    """`store.backend` ("faiss" or "milvus")."""
    store = getattr(settings, "store", None)
    return getattr(store, "backend", "faiss")


def is_milvus(settings: Settings | None) -> bool:
    return settings is not None and backend_of(settings) == "milvus"


__all__ = ["EngineCandidates", "EngineSearch", "KBWriterLike", "KnowledgeBaseLike", "backend_of", "is_milvus"]
