"""Turning ranked chunk rows into hits: neighbour merging and near-duplicate detection.

Pure helpers over plain data (chunks, optional vectors) so each rule tests alone; the searcher in retriever.py
decides which rows to feed them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from common.text import char_bigrams
from retrieval.types import Chunk

# Two neighbouring chunks share their overlap (ingest.chunk_overlap characters). Only a shared run at least this long
# counts as that overlap: a single shared "的" or "。" at the seam is chance, and removing it would lose text.
MIN_OVERLAP_CHARS = 4


_BLOCK_START = re.compile(r"(?:[-*+•] |\d+[.、)）] |[（(]?[一二三四五六七八九十]+[、）)]|\|)")


def join_overlapping(a: str, b: str, *, min_overlap: int = MIN_OVERLAP_CHARS) -> str:
    """`a` + `b` without the text repeated at the seam (the splitter's overlap).

    Without an overlap the seam is where the splitter cut between sentences, paragraphs or table rows: a line break
    keeps a list item or table row from being glued to the line before it, and a table chunk's repeated header
    line (the splitter repeats it in every piece of a table) is dropped. Prose is joined as it was written.

    >>> join_overlapping("第一句。第二句。", "第二句。第三句。")
    '第一句。第二句。第三句。'
    >>> join_overlapping("甲乙丙", "丁戊")
    '甲乙丙丁戊'
    >>> join_overlapping("说明原因。", "- 单个文件")
    '说明原因。\\n- 单个文件'
    """
    longest = min(len(a), len(b))
    for n in range(longest, min_overlap - 1, -1):
        if a.endswith(b[:n]):
            return a + b[n:]
    a_head, _, _ = a.partition("\n")
    b_head, nl, b_rest = b.partition("\n")
    same_table = bool(nl and b_head.strip() and b_head == a_head)
    if same_table:  # the next rows of the same table: its header once
        b = b_rest
    if a.endswith("\n") or b.startswith("\n"):
        return a + b
    if same_table or _BLOCK_START.match(b):
        return a + "\n" + b
    return a + b


def merged_text(texts: Sequence[str]) -> str:
    """Texts of consecutive chunks (file order) joined without overlap duplication."""
    out = ""
    for t in texts:
        out = join_overlapping(out, t) if out else t
    return out


def char_overlap(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' character bigrams (whitespace ignored), in [0, 1].

    Bigrams, not words: Chinese needs no tokenizer for this, and reordered or lightly edited copies still score high.
    """
    x, y = (char_bigrams("".join(t.split())) for t in (a, b))
    union = x | y
    return len(x & y) / len(union) if union else 1.0  # two empty texts are the same


def is_near_duplicate(
    text: str,
    others: Sequence[str],
    *,
    threshold: float,
    vector: np.ndarray | None = None,
    other_vectors: np.ndarray | None = None,
) -> bool:
    """True when `text` repeats one of `others`: same text, bigram overlap >= threshold, or cosine >= threshold.

    Vectors are optional (an index that cannot give vectors back still dedupes by text); when given,
    `other_vectors` row i belongs to others[i] and all vectors are L2-normalised.
    """
    norm = " ".join(text.split())
    for i, other in enumerate(others):
        if norm == " ".join(other.split()) or char_overlap(text, other) >= threshold:
            return True
        if vector is not None and other_vectors is not None and float(other_vectors[i] @ vector) >= threshold:
            return True
    return False


def neighbour_rows(chunk: Chunk, by_position: dict[tuple[str, int], int]) -> tuple[int | None, int | None]:
    """Rows of the chunks just before and just after `chunk` in the same file content (same sha256), if stored."""
    return (
        by_position.get((chunk.sha256, chunk.position - 1)),
        by_position.get((chunk.sha256, chunk.position + 1)),
    )


def position_map(chunks: Sequence[Chunk]) -> dict[tuple[str, int], int]:
    """(sha256, position) -> row, to find a chunk's neighbours in O(1)."""
    return {(c.sha256, c.position): row for row, c in enumerate(chunks)}
