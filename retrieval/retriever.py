"""Hybrid search over a knowledge base: dense (FAISS) + BM25 (jieba), fused, thresholded, neighbours merged.

    searcher = HybridSearcher.from_settings(settings)           # loads nothing yet
    result = searcher.search(kb, "生命数耗完即算为什么？")          # kb: retrieval.store.KnowledgeBase
    result.evidence  -> bool       # False: answer 「根据已知信息无法回答该问题」 without calling the LLM
    result.hits      -> list[Hit]  # best first; empty when there is no evidence
    result.low_relevance -> list[Hit]  # the closest passages when there is no evidence (to show, not to answer from)

`search_chunks` does the same over plain inputs (a chunk list, a FAISS index whose row i is chunks[i], an
embedder), which is what the tests and the CMRC bench use. `KnowledgeBaseRetriever` is the LangChain face.

Evidence rule: the best dense cosine between the question and any candidate chunk must reach
`retrieval.score_threshold` (calibrated on CMRC with multilingual-e5-small, see docs/retrieval.md). BM25 alone never
makes evidence when an embedder is present, because a shared common word gives any chunk a BM25 score; only in
`mode: bm25` without an embedder does a positive BM25 score count.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

from configs.settings import RetrievalSettings, Settings
from retrieval import fusion
from retrieval.bm25 import BM25Index
from retrieval.hits import is_near_duplicate, merged_text, neighbour_rows, position_map
from retrieval.stores import EngineCandidates, EngineSearch
from retrieval.types import Chunk, Hit

if TYPE_CHECKING:  # the store is a peer module; only its type is needed here
    from retrieval.store import KnowledgeBase

Mode = Literal["hybrid", "dense", "bm25"]
MODES: tuple[str, ...] = ("hybrid", "dense", "bm25")


class QueryEncoder(Protocol):
    """What the searcher needs from retrieval.embeddings.Embedder."""

    def encode_query(self, text: str) -> np.ndarray: ...


@dataclass(frozen=True)
class SearchResult:
    """hits: evidence passages, best first (empty when evidence is False).
    low_relevance: when evidence is False, the closest passages (to show, never to answer from).
    best_dense: the best question–chunk cosine seen (None without dense scores), the number the threshold tests.
    """

    hits: list[Hit]
    evidence: bool
    low_relevance: list[Hit] = field(default_factory=list)
    best_dense: float | None = None


@dataclass(frozen=True)
class _Prepared:
    """What the searcher derives once per knowledge-base generation."""

    bm25: BM25Index | None  # None for an engine-side store (its engine holds the BM25 index)
    by_position: dict[tuple[str, int], int]


class _PerGenerationCache:
    """Derived indexes keyed by (kb path, generation): a new generation always gets freshly built ones.

    Keeps the few most recently used; thread-safe because the web page serves several users at once.
    """

    def __init__(self, maxsize: int = 4) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[Hashable, _Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], _Prepared]) -> _Prepared:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()  # outside the lock: BM25 over a large KB takes seconds
        with self._lock:
            # A new generation of a KB replaces its older ones: their derived indexes hold the old generation's
            # segments, which after a merge would be a second copy of a big KB in memory (1M chunks: +8 GiB).
            if isinstance(key, tuple) and key:
                for old in [k for k in self._items if isinstance(k, tuple) and k[:1] == key[:1] and k != key]:
                    del self._items[old]
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)


def prepare(chunks: Sequence[Chunk]) -> _Prepared:
    """Build the BM25 index and the neighbour map for one chunk list."""
    return _Prepared(bm25=BM25Index(chunks), by_position=position_map(chunks))


def _prepare_kb(kb: Any) -> _Prepared:
    """A store that keeps BM25 postings and a neighbour map (retrieval/store.py builds them from stored tokens when
    it opens a generation) gives them as they are: the first question after a commit tokenises nothing."""
    bm25, by_position = getattr(kb, "bm25", None), getattr(kb, "by_position", None)
    if bm25 is not None and by_position is not None:
        return _Prepared(bm25=bm25, by_position=by_position)
    return prepare(kb.chunks)


def _vectors(index: Any, rows: Sequence[int]) -> np.ndarray | None:
    """Stored vectors of `rows`, or None when the index cannot give them back (e.g. a compressed index)."""
    if not rows:
        return None
    try:
        return np.vstack([index.reconstruct(int(r)) for r in rows]).astype(np.float32)
    except Exception:  # faiss raises RuntimeError for indexes without reconstruction; text dedupe still works
        return None


class HybridSearcher:
    """Dense + BM25 search with fusion, an evidence threshold, neighbour merging and de-duplication."""

    def __init__(self, settings: RetrievalSettings, embedder: QueryEncoder | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self._cache = _PerGenerationCache()

    @classmethod
    def from_settings(cls, settings: Settings, embedder: QueryEncoder | None = None) -> HybridSearcher:
        """A searcher with the product's Embedder (loaded on first query) unless one is given."""
        if embedder is None and settings.retrieval.mode != "bm25":
            from retrieval.embeddings import Embedder  # peer module, imported late so BM25-only use needs no model

            embedder = Embedder.from_settings(settings)
        return cls(settings.retrieval, embedder)

    # --- the knowledge-base face ------------------------------------------------------------------------
    def search(self, kb: KnowledgeBase, question: str, **options: Any) -> SearchResult:
        """Search one opened knowledge base. Options as in `search_chunks` (k, mode, threshold, ...).

        Answers from the generation `kb` was opened on; callers reopen when `kb.is_stale()` (KnowledgeBaseRetriever
        does). Derived indexes are cached per (kb path, generation), so a new generation never sees an old BM25.
        """
        if isinstance(kb, EngineSearch):  # Milvus: the engine searches; threshold, merging and dedupe stay here
            return self._search_engine(kb, question, **options)
        prepared = self._cache.get((str(kb.path), kb.generation), lambda: _prepare_kb(kb))
        return self.search_chunks(
            question, kb.chunks, kb.index, prepared=prepared, sources_for=kb.sources_for, **options
        )

    def _search_engine(self, kb: EngineSearch, question: str, **options: Any) -> SearchResult:
        """Ask the store's engine for candidates (dense / BM25 / its own hybrid ranking), then rank them here."""
        import faiss

        s = self.settings
        mode = options.get("mode") or s.mode
        fetch_k = options.get("fetch_k") or s.fetch_k
        fusion_method = options.get("fusion_method") or s.fusion
        k = options.get("k") or s.top_k
        self._check(question, [], None, k=k, mode=mode, fetch_k=fetch_k, fusion_method=fusion_method)
        if mode != "hybrid":
            fetch_k = max(fetch_k, k)
        query = self._encode(question, None) if self.embedder is not None else None
        if query is not None and kb.manifest.dim and query.shape[0] != kb.manifest.dim:
            raise ValueError(
                f"the embedding model gives {query.shape[0]}-dimensional vectors but this knowledge base was built "
                f"with {kb.manifest.dim}-dimensional ones: set embedding.model back to the model the KB was built "
                "with, or rebuild the KB with `python ingest.py --rebuild`"
            )
        found = kb.candidates(query, question, mode=mode, fetch_k=fetch_k, fusion=fusion_method, rrf_k=s.rrf_k,
                              dense_weight=s.dense_weight)
        index = faiss.IndexFlatIP(found.vectors.shape[1])
        index.add(found.vectors)
        prepared = _Prepared(bm25=None, by_position=position_map(found.chunks))
        return self.search_chunks(question, found.chunks, index, prepared=prepared, sources_for=kb.sources_for,
                                  engine=found, query=query, **{**options, "fetch_k": fetch_k})

    # --- the plain-data core ----------------------------------------------------------------------------
    def search_chunks(
        self,
        question: str,
        chunks: Sequence[Chunk],
        index: Any,
        *,
        prepared: _Prepared | None = None,
        sources_for: Callable[[str], list[str]] | None = None,
        k: int | None = None,
        mode: str | None = None,
        threshold: float | None = None,
        fetch_k: int | None = None,
        fusion_method: str | None = None,
        merge_neighbors: bool | None = None,
        engine: EngineCandidates | None = None,
        query: np.ndarray | None = None,
    ) -> SearchResult:
        """Search `chunks` (row i of the FAISS `index` is chunks[i]). Unset options come from the settings.

        With `engine` (an engine-side store's candidates, `chunks`/`index` being its local view) and the `query`
        vector already encoded, the engine's dense / BM25 / fused lists are used instead of searching here."""
        s = self.settings
        k = s.top_k if k is None else k
        mode = s.mode if mode is None else mode
        threshold = s.score_threshold if threshold is None else threshold
        fetch_k = s.fetch_k if fetch_k is None else fetch_k
        fusion_method = s.fusion if fusion_method is None else fusion_method
        merge = s.merge_neighbors if merge_neighbors is None else merge_neighbors
        self._check(question, chunks, index, k=k, mode=mode, fetch_k=fetch_k, fusion_method=fusion_method)
        if not chunks:
            return SearchResult(hits=[], evidence=False, low_relevance=[], best_dense=None)
        prepared = prepared or prepare(chunks)
        if mode != "hybrid":  # one retriever alone must supply all k; in hybrid the union of two lists does
            fetch_k = max(fetch_k, k)

        if engine is not None:
            dense, sparse = engine.dense, engine.sparse
        else:
            query = self._encode(question, index) if self.embedder is not None else None
            dense = self._dense(query, index, fetch_k) if query is not None and mode != "bm25" else []
            sparse = prepared.bm25.search(question, fetch_k) if mode != "dense" else []

        if engine is not None and engine.fused is not None:
            fused = dict(engine.fused)
        elif mode == "dense":
            fused = {row: score for row, score in dense}
        elif mode == "bm25":
            fused = {row: score for row, score in sparse}
        elif fusion_method == "rrf":
            fused = fusion.rrf([dense, sparse], k=s.rrf_k)
        elif fusion_method == "adaptive":
            fused = fusion.adaptive(dense, sparse, dense_weight=s.dense_weight)
        else:
            fused = fusion.weighted([dense, sparse], [s.dense_weight, 1 - s.dense_weight])

        dense_of = dict(dense)
        bm25_of = dict(sparse)
        if query is not None:  # cosine for BM25-only candidates too: the threshold and Hit.dense_score need it
            missing = [r for r in fused if r not in dense_of]
            vecs = _vectors(index, missing)
            if vecs is not None:
                dense_of.update(zip(missing, (vecs @ query).tolist(), strict=False))

        order = sorted(fused, key=lambda r: (-fused[r], -dense_of.get(r, -2.0), r))
        hits = self._build_hits(order, chunks, index, prepared, fused, dense_of, bm25_of, sources_for, k, merge)

        if query is not None:
            best_dense = max((dense_of[r] for r in fused if r in dense_of), default=None)
            evidence = best_dense is not None and best_dense >= threshold
        else:
            best_dense = None
            evidence = bool(sparse)
        if evidence:
            return SearchResult(hits=hits, evidence=True, low_relevance=[], best_dense=best_dense)
        return SearchResult(hits=[], evidence=False, low_relevance=hits, best_dense=best_dense)

    # --- steps --------------------------------------------------------------------------------------------
    def _check(self, question: str, chunks: Sequence[Chunk], index: Any, *, k: int, mode: str, fetch_k: int,
               fusion_method: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question is empty, got {question!r}: type a question to search for")
        if k <= 0:
            raise ValueError(f"k (retrieval.top_k) must be > 0, got {k}")
        if fetch_k <= 0:
            raise ValueError(f"retrieval.fetch_k must be > 0, got {fetch_k}")
        if mode not in MODES:
            raise ValueError(f"retrieval.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if fusion_method not in ("rrf", "weighted", "adaptive"):
            raise ValueError(f"retrieval.fusion must be 'rrf', 'weighted' or 'adaptive', got {fusion_method!r}")
        if mode != "bm25" and self.embedder is None:
            raise ValueError(f"retrieval.mode {mode!r} needs an embedding model, but the searcher has none: "
                             "build it with HybridSearcher.from_settings(settings) or set retrieval.mode: bm25")
        if index is not None and index.ntotal != len(chunks):
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors but the chunk table {len(chunks)} chunks: "
                             "the knowledge base is inconsistent; rebuild it with `python ingest.py --rebuild`")

    def _encode(self, question: str, index: Any) -> np.ndarray:
        q = np.asarray(self.embedder.encode_query(question), dtype=np.float32).reshape(-1)
        if index is not None and q.shape[0] != index.d:
            raise ValueError(
                f"the embedding model gives {q.shape[0]}-dimensional vectors but this knowledge base was built with "
                f"{index.d}-dimensional ones: set embedding.model back to the model the KB was built with, "
                "or rebuild the KB with `python ingest.py --rebuild`"
            )
        return q

    @staticmethod
    def _dense(query: np.ndarray, index: Any, fetch_k: int) -> list[tuple[int, float]]:
        scores, rows = index.search(query[None, :], min(fetch_k, index.ntotal))
        return [(int(r), float(sc)) for r, sc in zip(rows[0], scores[0], strict=False) if r >= 0]

    def _build_hits(self, order: list[int], chunks: Sequence[Chunk], index: Any, prepared: _Prepared,
                    fused: dict[int, float], dense_of: dict[int, float], bm25_of: dict[int, float],
                    sources_for: Callable[[str], list[str]] | None, k: int, merge: bool) -> list[Hit]:
        s = self.settings
        hits: list[Hit] = []
        covered: set[int] = set()          # rows already inside a hit (as origin or merged neighbour)
        kept_rows: list[int] = []          # origin rows of kept hits, for de-duplication
        kept_vecs: list[np.ndarray] = []
        for row in order:
            if len(hits) == k:
                break
            if row in covered:
                continue
            got = _vectors(index, [row])
            vec = got[0] if got is not None else None
            other_vecs = np.vstack(kept_vecs) if vec is not None and len(kept_vecs) == len(kept_rows) > 0 else None
            if is_near_duplicate(chunks[row].text, [chunks[r].text for r in kept_rows],
                                 threshold=s.dedupe_threshold, vector=vec, other_vectors=other_vecs):
                continue
            rows = self._merge(row, chunks, prepared, covered, dense_of, fused) if merge else [row]
            covered.update(rows)
            kept_rows.append(row)
            if vec is not None:
                kept_vecs.append(vec)
            hits.append(self._hit(row, rows, chunks, fused, dense_of, bm25_of, sources_for))
        return hits

    def _merge(self, row: int, chunks: Sequence[Chunk], prepared: _Prepared, covered: set[int],
               dense_of: dict[int, float], fused: dict[int, float]) -> list[int]:
        """`row` plus its neighbours (position ± 1, same content and section), the more relevant side first, within
        max_hit_chars. Neighbours already shown in an earlier hit are left out."""
        limit = self.settings.max_hit_chars
        before, after = neighbour_rows(chunks[row], prepared.by_position)
        # Only neighbours of the same section: text from the section before or after would be shown under this
        # section's heading (a FAQ's answers glued to the wrong questions).
        sides = [r for r in (before, after) if r is not None and r not in covered
                 and chunks[r].heading_path == chunks[row].heading_path]
        # The side the question is closer to goes first; unknown cosines fall back to the fused score, then "after"
        # (text after a match usually finishes the sentence the match began).
        sides.sort(key=lambda r: (-dense_of.get(r, -2.0), -fused.get(r, 0.0), r != after))
        rows = [row]
        for side in sides:
            trial = sorted(rows + [side], key=lambda r: chunks[r].position)
            if len(merged_text([chunks[r].text for r in trial])) <= limit:
                rows = trial
        return rows

    @staticmethod
    def _hit(origin: int, rows: list[int], chunks: Sequence[Chunk], fused: dict[int, float],
             dense_of: dict[int, float], bm25_of: dict[int, float],
             sources_for: Callable[[str], list[str]] | None) -> Hit:
        c = chunks[origin]
        first = chunks[rows[0]]
        live = sources_for(c.sha256) if sources_for is not None else []
        dense = [dense_of[r] for r in rows if r in dense_of]
        bm25 = [bm25_of[r] for r in rows if r in bm25_of]
        return Hit(
            text=merged_text([chunks[r].text for r in rows]),
            score=float(fused[origin]),
            source=live[0] if live else c.source,
            chunk_ids=tuple(chunks[r].id if chunks[r].id >= 0 else r for r in rows),
            page=first.page if first.page is not None else c.page,
            heading_path=c.heading_path,
            dense_score=max(dense) if dense else None,
            bm25_score=max(bm25) if bm25 else None,
            metadata={**c.metadata, "sha256": c.sha256, "positions": [chunks[r].position for r in rows],
                      "rows": list(rows)},
        )


class KnowledgeBaseRetriever(BaseRetriever):
    """LangChain retriever over a named knowledge base; reopens it whenever a new generation is live.

        retriever = KnowledgeBaseRetriever.from_settings(settings, "manuals")
        docs = retriever.invoke("报销流程是什么？")   # Documents; metadata: source, page, heading, score, chunk_ids

    Returns no documents when the question has no evidence in the KB, unless include_low_relevance is set (then the
    closest passages come back with metadata["evidence"] == False).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kb_name: str
    settings: Settings
    searcher: HybridSearcher
    k: int | None = None
    mode: str | None = None
    include_low_relevance: bool = False
    _kb: Any = PrivateAttr(default=None)
    _kb_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings, kb_name: str, **kwargs: Any) -> KnowledgeBaseRetriever:
        return cls(kb_name=kb_name, settings=settings, searcher=HybridSearcher.from_settings(settings), **kwargs)

    def knowledge_base(self) -> KnowledgeBase:
        """The live generation of the KB: opened on first use and reopened when CURRENT moved on."""
        from retrieval.store import KnowledgeBase  # peer module

        with self._kb_lock:
            if self._kb is None or self._kb.is_stale():
                self._kb = KnowledgeBase.open(self.kb_name, self.settings)
            return self._kb

    def search(self, query: str) -> SearchResult:
        return self.searcher.search(self.knowledge_base(), query, k=self.k, mode=self.mode)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        result = self.search(query)
        hits = result.hits if result.evidence else (result.low_relevance if self.include_low_relevance else [])
        return [hit_to_document(h, evidence=result.evidence) for h in hits]


def hit_to_document(hit: Hit, *, evidence: bool = True) -> Document:
    """A Hit as a LangChain Document (metadata: source, page, heading, score, chunk_ids, dense/bm25 scores)."""
    return Document(
        page_content=hit.text,
        metadata={
            "source": hit.source,
            "page": hit.page,
            "heading": " > ".join(hit.heading_path),
            "score": hit.score,
            "chunk_ids": list(hit.chunk_ids),
            "dense_score": hit.dense_score,
            "bm25_score": hit.bm25_score,
            "evidence": evidence,
        },
    )
