"""Immutable segments: what the generations of a knowledge base share, on disk and in memory.

A segment is the chunks of some file contents, written once and never changed:

    seg-<id>.faiss          the vectors, FAISS native format: IndexFlatIP (exact), or IndexIVFFlat (approximate,
                            with its direct map so vectors can be read back) for a big segment under store.faiss_index
    seg-<id>.chunks.jsonl   one JSON object per chunk, row order = FAISS row order
    seg-<id>.bm25.<v>.npz   BM25 postings (numpy .npz of plain arrays, loaded with allow_pickle=False): per chunk its
                            term ids and counts (CSR), the segment's vocabulary, made by retrieval.bm25.tokenize
                            version <v>

A generation (store.py) is a manifest naming its segments plus, per file content (sha256), the segment and row
range that hold it; rows of a segment whose content is gone or was re-stored elsewhere are dead and skipped. A
one-file commit writes one small segment and hard-links the others into the new generation folder, so nothing
unchanged is rewritten, and a reader that already holds the other segments (the per-process cache below) loads
only the new one: BM25 included, because the tokens are stored, not recomputed.

Search runs per segment and merges (`SegmentedIndex`, `SegmentedBM25`); global row r of a generation is its r-th
live row, segments in manifest order, so `kb.chunks[r]` and `kb.index` row r agree as they always did.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy import sparse

from retrieval import bm25 as bm25_mod
from retrieval.types import Chunk

# Approximate index: IVF-Flat (inverted lists of full vectors, so recall depends only on nprobe, and vectors can be
# read back for neighbour de-duplication and merges). Chosen over HNSW because it trains in seconds on a sample,
# supports the dead-row selector at search time and keeps memory at the size of the vectors.
IVF_TRAIN_SAMPLE = 64   # training points per list (FAISS warns below 39)
IVF_LISTS_PER_SQRT = 2  # lists = 2·√rows (2,000 at 1M): training and adding stay around a minute on 2 cores
IVF_TRAIN_ITERATIONS = 10


class SegmentError(Exception):
    """A segment file is missing, altered or unreadable; the message says which (store.py adds the KB and repair)."""


# --------------------------------------------------------------------------------------------------------------
# What a manifest records about a segment
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentInfo:
    id: str                      # "seg-<12 hex>"
    rows: int
    dim: int
    index: str                   # "flat" | "ivf"
    tokenizer: str               # retrieval.bm25.TOKENIZER_VERSION of its postings
    files: dict[str, str]        # role ("faiss" | "chunks" | "bm25") -> file name in the generation folder
    checksums: dict[str, str]    # file name -> sha256, written with the segment

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows, "dim": self.dim, "index": self.index, "tokenizer": self.tokenizer,
                "files": dict(self.files), "checksums": dict(self.checksums)}

    @classmethod
    def from_json(cls, d: Any) -> SegmentInfo:
        if not isinstance(d, Mapping):
            raise SegmentError(f"a segment entry must be an object, got {type(d).__name__}")
        try:
            info = cls(id=str(d["id"]), rows=int(d["rows"]), dim=int(d["dim"]), index=str(d["index"]),
                       tokenizer=str(d["tokenizer"]), files={str(k): str(v) for k, v in d["files"].items()},
                       checksums={str(k): str(v) for k, v in d["checksums"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SegmentError(f"segment entry {str(d)[:80]} is incomplete ({type(e).__name__}: {e})") from None
        for role in ("faiss", "chunks", "bm25"):
            name = info.files.get(role, "")
            if not name or Path(name).name != name or not name.startswith(info.id):
                raise SegmentError(f"segment {info.id}: file name for {role} {name!r} is not one of its own")
            if name not in info.checksums:
                raise SegmentError(f"segment {info.id}: no checksum recorded for {name}")
        return info


# --------------------------------------------------------------------------------------------------------------
# BM25 postings of one segment
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Postings:
    """Term counts of a segment's rows: CSR (row -> terms) as stored, CSC (term -> rows) for queries."""

    vocab: list[str]
    csr: sparse.csr_array                 # (rows, terms) float32 counts
    doc_len: np.ndarray = field(init=False)
    _csc: sparse.csc_array | None = field(init=False, default=None)
    _vocab_ids: dict[str, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # bm25s counts a chunk without any token as one placeholder token; so do we (same scores)
        self.doc_len = np.maximum(np.asarray(self.csr.sum(axis=1)).reshape(-1), 1).astype(np.float32)

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Postings:
        return cls.from_tokens([bm25_mod.tokenize(t) for t in texts])

    @classmethod
    def from_tokens(cls, docs: Sequence[Sequence[str]]) -> Postings:
        vocab: dict[str, int] = {}
        indptr = [0]
        ids: list[int] = []
        for toks in docs:
            for t in toks:
                ids.append(vocab.setdefault(t, len(vocab)))
            indptr.append(len(ids))
        n = len(docs)
        if not ids:
            return cls([], sparse.csr_array((n, 0), dtype=np.float32))
        coo = sparse.csr_array((np.ones(len(ids), dtype=np.float32), np.asarray(ids, dtype=np.int32),
                                np.asarray(indptr, dtype=np.int64)), shape=(n, len(vocab)))
        coo.sum_duplicates()
        return cls(list(vocab), coo)

    def prepare(self) -> None:
        """Build the query-side structures now (the term dict and the CSC copy), not at the first question."""
        if self._vocab_ids is None:
            self._vocab_ids = {t: i for i, t in enumerate(self.vocab)}
            self._csc = self.csr.tocsc()

    def column(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, counts) of one term, or None when the segment never saw it."""
        self.prepare()
        j = self._vocab_ids.get(term)
        if j is None:
            return None
        a, b = self._csc.indptr[j], self._csc.indptr[j + 1]
        return self._csc.indices[a:b], self._csc.data[a:b]

    def select(self, rows: np.ndarray) -> tuple[list[str], sparse.csr_array]:
        """The postings of `rows` (in that order) with this segment's vocabulary, for merging segments."""
        return self.vocab, self.csr[rows]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        csr = self.csr
        np.savez(buf, vocab=np.asarray(self.vocab, dtype=np.str_) if self.vocab else np.zeros(0, dtype="<U1"),
                 indptr=csr.indptr.astype(np.int64), indices=csr.indices.astype(np.int32),
                 data=csr.data.astype(np.float32), shape=np.asarray(csr.shape, dtype=np.int64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Postings:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:  # never a pickle: plain arrays only
            shape = tuple(int(x) for x in z["shape"])
            csr = sparse.csr_array((z["data"], z["indices"], z["indptr"]), shape=shape)
            return cls([str(t) for t in z["vocab"]], csr)


def merge_postings(parts: Sequence[tuple[list[str], sparse.csr_array]]) -> Postings:
    """Stack the rows of several segments' postings under one vocabulary (term ids remapped, no re-tokenising)."""
    vocab: dict[str, int] = {}
    blocks = []
    for words, csr in parts:
        remap = np.asarray([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int32)
        blocks.append((csr, remap))
    n_terms = len(vocab)
    out = []
    for csr, remap in blocks:
        indices = remap[csr.indices] if len(csr.indices) else csr.indices.astype(np.int32)
        out.append(sparse.csr_array((csr.data, indices, csr.indptr), shape=(csr.shape[0], n_terms)))
    if not out:
        return Postings([], sparse.csr_array((0, 0), dtype=np.float32))
    return Postings(list(vocab), sparse.vstack(out, format="csr").astype(np.float32))


# --------------------------------------------------------------------------------------------------------------
# One segment in memory
# --------------------------------------------------------------------------------------------------------------
def chunk_to_json(c: Chunk) -> dict[str, Any]:
    return {"id": c.id, "text": c.text, "source": c.source, "sha256": c.sha256, "position": c.position,
            "page": c.page, "heading_path": list(c.heading_path), "metadata": c.metadata}


_CHUNK_TYPES = {"text": str, "source": str, "sha256": str, "position": int, "id": int}


def chunk_from_json(d: Any) -> Chunk:
    """A stored chunk; TypeError when a field has the wrong type (an integer text, a list for the source...)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"a chunk must be a JSON object, got {type(d).__name__}")
    for key, typ in _CHUNK_TYPES.items():
        if not isinstance(d.get(key), typ) or isinstance(d.get(key), bool):
            raise TypeError(f"chunk field {key!r} must be {typ.__name__}, got {d.get(key)!r:.40}")
    if not isinstance(d.get("metadata") or {}, Mapping) or not isinstance(d.get("heading_path") or [], list):
        raise TypeError("chunk metadata must be an object and heading_path a list")
    return Chunk(text=d["text"], source=d["source"], sha256=d["sha256"], position=int(d["position"]),
                 page=d.get("page"), heading_path=tuple(d.get("heading_path") or ()), id=int(d["id"]),
                 metadata=dict(d.get("metadata") or {}))


# Stored vectors are L2-normalised (the searcher's scores are cosines): a norm outside this band means damage.
NORM_TOLERANCE = 1e-2


def check_vectors(vectors: np.ndarray, where: str, first_row: int = 0) -> None:
    if not len(vectors):
        return
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise SegmentError(f"{where} 中有 {bad} 个向量含 NaN 或无穷大")
    norms = np.linalg.norm(vectors, axis=1)
    off = np.abs(norms - 1) > NORM_TOLERANCE
    if off.any():
        raise SegmentError(f"{where} 中有 {int(off.sum())} 个向量长度不是 1"
                           f"（例如第 {first_row + int(np.argmax(off))} 行：{norms[off][0]:.3g}）")


def check_index_vectors(index: faiss.Index, where: str, block: int = 65536) -> None:
    """check_vectors over an index's stored vectors, a block at a time (no second copy of a large index)."""
    for start in range(0, index.ntotal, block):
        n = min(block, index.ntotal - start)
        check_vectors(index.reconstruct_n(start, n), where, start)


def all_vectors(index: faiss.Index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), dtype=np.float32)


class Segment:
    """A loaded segment: chunks (ids = local rows), its FAISS index and its BM25 postings. Immutable."""

    def __init__(self, info: SegmentInfo, chunks: list[Chunk], index: faiss.Index, postings: Postings) -> None:
        self.info, self.chunks, self.index, self.postings = info, chunks, index, postings
        postings.prepare()  # loaded = ready: the first question after a reopen costs what any other does

    @property
    def rows(self) -> int:
        return len(self.chunks)

    # -- writing -----------------------------------------------------------------------------------------------
    @staticmethod
    def write(folder: Path, chunks: list[Chunk], vectors: np.ndarray, *, index_kind: str,
              postings: Postings | None = None, write_file=None) -> tuple[SegmentInfo, Segment]:
        """Write a new segment's files into `folder`; returns its info and the loaded segment.

        index_kind "ivf" trains an IVF index on a sample of the vectors (lists ≈ 2·√rows); "flat" stores them as is.
        `postings` saves tokenising again when a merge already has them; `write_file(path, bytes)` writes durably.
        """
        seg_id = f"seg-{uuid.uuid4().hex[:12]}"
        dim = int(vectors.shape[1])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = build_index(vectors, index_kind)
        postings = postings or Postings.from_texts([c.embedding_text() for c in chunks])
        chunks = [replace(c, id=i) for i, c in enumerate(chunks)]
        blobs = {
            "faiss": (f"{seg_id}.faiss", faiss.serialize_index(index)),  # a uint8 array: written without a copy
            "chunks": (f"{seg_id}.chunks.jsonl", "".join(json.dumps(chunk_to_json(c), ensure_ascii=False) + "\n"
                                                         for c in chunks).encode("utf-8")),
            "bm25": (f"{seg_id}.bm25.{bm25_mod.TOKENIZER_VERSION}.npz", postings.to_bytes()),
        }
        for name, data in blobs.values():
            write_file(folder / name, data)
        info = SegmentInfo(seg_id, len(chunks), dim, index_kind, bm25_mod.TOKENIZER_VERSION,
                           {role: name for role, (name, _) in blobs.items()},
                           {name: hashlib.sha256(data).hexdigest() for name, data in blobs.values()})
        return info, Segment(info, chunks, index, postings)

    def with_new_postings(self, folder: Path, write_file) -> tuple[SegmentInfo, Segment]:
        """This segment re-tokenised by the current tokenizer (only its BM25 file is new)."""
        postings = Postings.from_texts([c.embedding_text() for c in self.chunks])
        name = f"{self.info.id}.bm25.{bm25_mod.TOKENIZER_VERSION}.npz"
        data = postings.to_bytes()
        write_file(folder / name, data)
        old = self.info.files["bm25"]
        checksums = {k: v for k, v in self.info.checksums.items() if k != old}
        info = replace(self.info, tokenizer=bm25_mod.TOKENIZER_VERSION, files={**self.info.files, "bm25": name},
                       checksums={**checksums, name: hashlib.sha256(data).hexdigest()})
        return info, Segment(info, self.chunks, self.index, postings)

    # -- reading -----------------------------------------------------------------------------------------------
    @staticmethod
    def load(folder: Path, info: SegmentInfo) -> Segment:
        """Read and verify a segment: checksums, chunk types and ids, vector count/dimension, finite unit vectors.
        SegmentError names the file."""
        raw: dict[str, bytes] = {}  # each file is read once: hashed, then parsed from the same bytes
        for role, name in info.files.items():
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                raise SegmentError(f"{folder.name} 缺少 {name}") from None
            if hashlib.sha256(data).hexdigest() != info.checksums.get(name):
                raise SegmentError(f"{folder.name}/{name} 的内容与提交时记录的校验和不符（文件被改动或损坏）")
            raw[role] = data
        name = info.files["chunks"]
        try:
            chunks = [chunk_from_json(json.loads(line)) for line in raw["chunks"].decode("utf-8").splitlines()
                      if line.strip()]
        except (ValueError, TypeError, KeyError) as e:
            raise SegmentError(f"{folder.name}/{name} 有误（{e}）") from None
        if len(chunks) != info.rows or any(c.id != i for i, c in enumerate(chunks)):
            raise SegmentError(f"{folder.name}/{name}: {len(chunks)} chunks for {info.rows} rows (or ids out of order)")
        try:
            index = faiss.deserialize_index(np.frombuffer(raw["faiss"], dtype=np.uint8))
        except RuntimeError as e:
            raise SegmentError(f"{folder.name}/{info.files['faiss']} 无法被 FAISS 读取（{str(e)[:120]}）") from None
        if index.ntotal != info.rows or index.d != info.dim:
            raise SegmentError(f"{folder.name}/{info.files['faiss']} 有 {index.ntotal} 个 {index.d} 维向量，"
                               f"清单记录的是 {info.rows} 个 {info.dim} 维")
        check_index_vectors(index, f"{folder.name}/{info.files['faiss']}")
        try:
            postings = Postings.from_bytes(raw["bm25"])
        except (ValueError, KeyError, OSError) as e:
            raise SegmentError(f"{folder.name}/{info.files['bm25']} 有误（{e}）") from None
        if info.tokenizer != bm25_mod.TOKENIZER_VERSION:  # the tokenizer changed: this process re-tokenises once
            postings = Postings.from_texts([c.embedding_text() for c in chunks])
        if postings.csr.shape[0] != info.rows:
            raise SegmentError(f"{folder.name}/{info.files['bm25']} 的行数与清单不符")
        return Segment(info, chunks, index, postings)


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    n, dim = vectors.shape
    if kind == "ivf" and n:
        nlist = max(1, min(int(IVF_LISTS_PER_SQRT * np.sqrt(n)), n // IVF_TRAIN_SAMPLE or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors if n <= nlist * IVF_TRAIN_SAMPLE else vectors[
            np.random.default_rng(0).choice(n, nlist * IVF_TRAIN_SAMPLE, replace=False)]
        index.cp.max_points_per_centroid = IVF_TRAIN_SAMPLE
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.train(sample)
        index.add(vectors)
        index.make_direct_map()
        return index
    index = faiss.IndexFlatIP(dim)
    if n:
        index.add(vectors)
    return index


class SegmentCache:
    """Loaded segments shared by every KnowledgeBase (and writer) of this process: a segment is immutable, so a
    reopen after a one-file commit loads only the new one. An entry lives while some KB holds it, and is used
    only while its files are the very files it was loaded from (inode, size, mtime): a file replaced or edited
    on disk is read and verified again."""

    def __init__(self) -> None:
        self._items: weakref.WeakValueDictionary[tuple, Segment] = weakref.WeakValueDictionary()
        self._stamps: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(kb_path: Path, info: SegmentInfo) -> tuple:
        return str(kb_path.resolve()), info.id, tuple(sorted(info.checksums.items()))

    @staticmethod
    def _stamp(folder: Path, info: SegmentInfo) -> tuple | None:
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                         for st in (os.stat(folder / name) for name in sorted(info.files.values())))
        except OSError:
            return None

    def _hit(self, folder: Path, info: SegmentInfo) -> Segment | None:
        key = self._key(folder.parent, info)
        with self._lock:
            seg, stamp = self._items.get(key), self._stamps.get(key)
        if seg is not None and stamp is not None and stamp == self._stamp(folder, info):
            return seg
        return None

    def holds(self, folder: Path, info: SegmentInfo) -> bool:
        return self._hit(folder, info) is not None

    def get(self, folder: Path, info: SegmentInfo) -> Segment:
        """The segment `info` of generation folder `folder`, loaded and verified unless already held."""
        seg = self._hit(folder, info)
        if seg is None:
            stamp = self._stamp(folder, info)
            seg = Segment.load(folder, info)
            self._remember(folder.parent, info, seg, stamp)
        return seg

    def put(self, kb_path: Path, folder_name: str, seg: Segment) -> None:
        """A segment this process just wrote into kb_path/folder_name (the stamp survives the folder's rename)."""
        self._remember(kb_path, seg.info, seg, self._stamp(kb_path / folder_name, seg.info))

    def _remember(self, kb_path: Path, info: SegmentInfo, seg: Segment, stamp: tuple | None) -> None:
        key = self._key(kb_path, info)
        with self._lock:
            self._items[key] = seg
            self._stamps[key] = stamp
            for k in [k for k in self._stamps if k not in self._items]:  # forget stamps of collected segments
                del self._stamps[k]


SEGMENTS = SegmentCache()


# --------------------------------------------------------------------------------------------------------------
# A generation's view over its segments
# --------------------------------------------------------------------------------------------------------------
class Layout:
    """Which rows of which segments are live, and their global row numbers.

    contents: sha256 -> (segment id, first local row, count). Global rows: segments in order, live rows in order.
    """

    def __init__(self, segments: Sequence[Segment], contents: Mapping[str, tuple[str, int, int]]) -> None:
        self.segments = list(segments)
        pos = {s.info.id: k for k, s in enumerate(self.segments)}
        ranges: list[list[tuple[int, int]]] = [[] for _ in self.segments]
        for seg_id, start, n in contents.values():
            ranges[pos[seg_id]].append((start, n))
        self.live_local: list[np.ndarray] = []
        self.global_of_local: list[np.ndarray] = []
        self.offsets = np.zeros(len(self.segments) + 1, dtype=np.int64)
        for k, seg in enumerate(self.segments):
            rs = sorted(ranges[k])
            live = (np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in rs]) if rs
                    else np.zeros(0, dtype=np.int64))
            g = np.full(seg.rows, -1, dtype=np.int64)
            g[live] = self.offsets[k] + np.arange(len(live))
            self.live_local.append(live)
            self.global_of_local.append(g)
            self.offsets[k + 1] = self.offsets[k] + len(live)
        self.total = int(self.offsets[-1])
        self._bitmaps: list[Any] = [None] * len(self.segments)

    def locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self.total:
            raise IndexError(f"row {row} out of range (0..{self.total - 1})")
        k = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return k, int(self.live_local[k][row - self.offsets[k]])

    def selector(self, k: int) -> Any:
        """A FAISS IDSelector of segment k's live rows, or None when all are live."""
        seg = self.segments[k]
        if len(self.live_local[k]) == seg.rows:
            return None
        if self._bitmaps[k] is None:
            bits = np.zeros(seg.rows, dtype=bool)
            bits[self.live_local[k]] = True
            packed = np.packbits(bits, bitorder="little")
            self._bitmaps[k] = (packed, faiss.IDSelectorBitmap(seg.rows, faiss.swig_ptr(packed)))
        return self._bitmaps[k][1]


class ChunkTable(Sequence[Chunk]):
    """kb.chunks: row r is the generation's r-th live chunk, with id r and its current owner as source."""

    def __init__(self, layout: Layout, owner_of: Mapping[str, str]) -> None:
        self._layout, self._owner_of = layout, owner_of

    def __len__(self) -> int:
        return self._layout.total

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        k, local = self._layout.locate(row)
        c = self._layout.segments[k].chunks[local]
        return replace(c, id=row, source=self._owner_of.get(c.sha256, c.source))

    def __iter__(self) -> Iterator[Chunk]:
        row = 0
        for k, seg in enumerate(self._layout.segments):
            for local in self._layout.live_local[k]:
                c = seg.chunks[int(local)]
                yield replace(c, id=row, source=self._owner_of.get(c.sha256, c.source))
                row += 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


class PositionMap(Mapping[tuple[str, int], int]):
    """(sha256, position) -> global row, from the content ranges (no pass over the chunks)."""

    def __init__(self, layout: Layout, contents: Mapping[str, tuple[str, int, int]]) -> None:
        self._layout = layout
        pos = {s.info.id: k for k, s in enumerate(layout.segments)}
        self._first: dict[str, tuple[int, int, int]] = {}
        for sha, (seg_id, start, n) in contents.items():
            k = pos[seg_id]
            self._first[sha] = (k, start, n)

    def __getitem__(self, key: tuple[str, int]) -> int:
        sha, position = key
        k, start, n = self._first[sha]
        seg = self._layout.segments[k]
        # a content's chunks are stored by position 0..n-1; check rather than assume
        if 0 <= position < n and seg.chunks[start + position].position == position:
            return int(self._layout.global_of_local[k][start + position])
        for local in range(start, start + n):
            if seg.chunks[local].position == position:
                return int(self._layout.global_of_local[k][local])
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for sha, (k, start, n) in self._first.items():
            for local in range(start, start + n):
                yield sha, self._layout.segments[k].chunks[local].position

    def __len__(self) -> int:
        return self._layout.total


class SegmentedIndex:
    """The FAISS face of a generation (search / reconstruct / ntotal / d) over its segments' indexes.

    Dead rows are excluded inside FAISS with a bitmap selector; IVF segments are searched with `nprobe` lists."""

    def __init__(self, layout: Layout, dim: int, nprobe: int = 64) -> None:
        self._layout, self.d, self.nprobe = layout, dim, nprobe
        self.ntotal = layout.total

    def search(self, x: np.ndarray, k: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        nq = x.shape[0]
        all_d, all_i = [], []
        for s, seg in enumerate(self._layout.segments):
            live = len(self._layout.live_local[s])
            if not live:
                continue
            sel = self._layout.selector(s)
            kk = min(k, live)
            if seg.info.index == "ivf":
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if sel is not None else \
                    faiss.SearchParametersIVF(nprobe=self.nprobe)
            else:
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
            d, i = seg.index.search(x, kk, params=params) if params is not None else seg.index.search(x, kk)
            g = np.where(i >= 0, self._layout.global_of_local[s][np.maximum(i, 0)], -1)
            all_d.append(d)
            all_i.append(g)
        if not all_d:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        d = np.hstack(all_d)
        i = np.hstack(all_i)
        d = np.where(i >= 0, d, -np.inf)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        if d.shape[1] < k:
            pad = k - d.shape[1]
            d = np.hstack([d, np.full((nq, pad), -np.inf, dtype=np.float32)])
            i = np.hstack([i, np.full((nq, pad), -1, dtype=np.int64)])
        return d.astype(np.float32), i

    def reconstruct(self, row: int) -> np.ndarray:
        k, local = self._layout.locate(int(row))
        return self._layout.segments[k].index.reconstruct(local)

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros((0, self.d), dtype=np.float32)
        parts = []
        for k, seg in enumerate(self._layout.segments):
            lo, hi = self._layout.offsets[k], self._layout.offsets[k + 1]
            a, b = max(start, lo), min(start + n, hi)
            if a >= b:
                continue
            locals_ = self._layout.live_local[k][a - lo:b - lo]
            if seg.info.index == "flat" and len(locals_) and locals_[-1] - locals_[0] + 1 == len(locals_):
                parts.append(seg.index.reconstruct_n(int(locals_[0]), len(locals_)))
            else:
                parts.append(np.vstack([seg.index.reconstruct(int(i)) for i in locals_]))
        return np.vstack(parts).astype(np.float32)


class SegmentedBM25:
    """BM25 (Lucene variant, as bm25s computes it) over the live rows of several segments' stored postings.

    Global statistics (document count, average length, document frequency of each query term) are taken over
    the live rows at query time, so a one-file commit needs no re-indexing; the scores equal those of a bm25s
    index built over the same chunks (tests/test_segments.py checks this)."""

    def __init__(self, layout: Layout, k1: float = 1.2, b: float = 0.75) -> None:
        self._layout, self.k1, self.b = layout, k1, b
        self.size = layout.total
        lens = [seg.postings.doc_len[layout.live_local[k]] for k, seg in enumerate(layout.segments)]
        total_len = float(sum(x.sum() for x in lens))
        self.avgdl = total_len / self.size if self.size else 1.0

    def scores(self, query: str) -> np.ndarray:
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        out = np.zeros(self.size, dtype=np.float32)
        lay = self._layout
        for term in bm25_mod.tokenize(query):  # repeated query terms count again, as in bm25s
            cols = []
            df = 0
            for k, seg in enumerate(lay.segments):
                col = seg.postings.column(term)
                if col is None:
                    continue
                rows, tf = col
                g = lay.global_of_local[k][rows]
                live = g >= 0
                if not live.any():
                    continue
                cols.append((k, rows[live], tf[live], g[live]))
                df += int(live.sum())
            if not df:
                continue
            idf = np.log1p((self.size - df + 0.5) / (df + 0.5))
            for k, rows, tf, g in cols:
                dl = lay.segments[k].postings.doc_len[rows]
                out[g] += (idf * tf / (self.k1 * ((1 - self.b) + self.b * dl / self.avgdl) + tf)).astype(np.float32)
        return out

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        return bm25_mod.top_positive(self.scores(query), k)
