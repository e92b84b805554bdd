"""Plain data that crosses rooms: a stored chunk and a search hit.

Frozen dataclasses; derive changed copies with dataclasses.replace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """One piece of a document as stored in a knowledge base.

    text          the chunk's own text (no heading prefix)
    source        file path as recorded in the manifest (relative to the ingested folder's root where possible)
    sha256        sha256 of the whole source file's bytes: chunks belong to a content, not to a name
    position      0-based index of this chunk within its file (neighbours are position ± 1)
    page          1-based page number for paged formats (PDF, slides, sheets), else None
    heading_path  headings above the chunk, outermost first, e.g. ("第一章 总则", "1.1 目的")
    id            integer id in the FAISS index; -1 before the store assigns one
    metadata      anything else a loader knows (sheet name, OCR flag, encoding, ...); JSON-serialisable
    """

    text: str
    source: str
    sha256: str
    position: int
    page: int | None = None
    heading_path: tuple[str, ...] = ()
    id: int = -1
    metadata: dict[str, Any] = field(default_factory=dict)

    def heading_text(self) -> str:
        return " > ".join(self.heading_path)

    def embedding_text(self) -> str:
        """What is embedded: the heading path gives a chunk its context (without the model's prefix)."""
        h = self.heading_text()
        return f"{h}\n{self.text}" if h else self.text


@dataclass(frozen=True)
class Hit:
    """A search result: one chunk, or several neighbouring chunks of one file merged.

    score        the fused score used for ranking (higher is better)
    dense_score  cosine similarity of the question to the best chunk (None when dense search was off)
    bm25_score   BM25 score (None when BM25 was off or did not find it)
    chunk_ids    ids of the chunks merged into this hit, in file order
    """

    text: str
    score: float
    source: str
    chunk_ids: tuple[int, ...]
    page: int | None = None
    heading_path: tuple[str, ...] = ()
    dense_score: float | None = None
    bm25_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
