"""The knowledge-base store: one folder per knowledge base, committed in whole generations.

    knowledge_base/<name>/
      sources/     files uploaded through the web page (CLI-ingested files stay where they are)
      CURRENT      text file naming the live generation, replaced atomically (os.replace)
      gen-<n>/     index.faiss (faiss native format), chunks.jsonl, manifest.json
      .lock        writer lock (filelock); .lock.info says who holds it (pid, host, since)

Why generations: a commit writes a complete new folder next to the live one, fsyncs it, renames it into place
and only then switches CURRENT. A reader therefore always sees one consistent generation, and a writer killed
at any moment (kill -9, power loss) leaves the previous generation loadable. Nothing here is a pickle: FAISS
writes its own format, everything else is JSON.

Chunks are content-addressed: they belong to a file *content* (sha256), and the manifest maps each path to a
sha256. Renaming a file is a manifest change; two paths with the same bytes share one set of chunks (the second
is a "duplicate"); the chunks go away only when the last path holding that content goes away.

Read side:  KnowledgeBase.open(name, settings), kb.chunks, kb.index, kb.manifest, kb.sources_for(sha), kb.is_stale()
Write side: `with kb.writer() as w: ...; w.commit()` (ingest only).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from filelock import FileLock, Timeout

from common.files import now_iso
from retrieval.types import Chunk

if TYPE_CHECKING:
    from configs import Settings

MANIFEST_FORMAT = 1
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.info"
SOURCES_DIR = "sources"
INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.jsonl"
MANIFEST_FILE = "manifest.json"
_GEN_RE = re.compile(r"^gen-(\d+)$")
_TMP_PREFIX = ".tmp-"
KB_NAME_RE = re.compile(r"[A-Za-z0-9_\-\u4e00-\u9fff]{1,64}")

# Manifest statuses. A file is "ok" (owns its chunks), "duplicate" (same bytes as another live path: shares
# that path's chunks), "empty" (parsed, but no text) or "failed" (reason says why). Report-only statuses such as
# unchanged / renamed / removed describe what a run did and are never stored.
LIVE_STATUSES = frozenset({"ok", "duplicate"})
STORED_STATUSES = frozenset({"ok", "duplicate", "empty", "failed"})


class KBError(Exception):
    """Base class of knowledge-base errors; the message is a sentence a person can act on."""


class KBNameError(KBError, ValueError):
    """The name is not a valid knowledge-base name."""


class KBNotFoundError(KBError):
    """No knowledge base of that name (or it has never been committed)."""


class KBLockedError(KBError):
    """Another process holds the writer lock."""


class KBCorruptError(KBError):
    """A generation's files disagree with each other or cannot be read."""


class KBIncompatibleError(KBError):
    """The KB was built with another embedding model or chunking: it must be rebuilt."""


# --------------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One file known to the KB.

    path         the manifest key: `<ingested folder name>/<path inside it>` (POSIX separators)
    sha256       sha256 of the file's bytes ("" if it could not be read)
    size, mtime  from stat at ingest time (mtime in seconds; mtime_ns is the exact value used for change checks)
    status       ok | duplicate | empty | failed
    reason       why a file is empty/failed (a sentence); "" otherwise
    chunk_ids    ids (rows) of this content's chunks in the generation this entry was read from
    duplicate_of the path that owns the chunks, for status "duplicate"
    ingested_at  ISO time (UTC) the content was last processed
    root         absolute folder the file was ingested from (used by --prune and rename detection)
    hashed_at    epoch seconds when sha256 was computed from the file with this size/mtime (see ingest's
                 stat shortcut: a file modified within a second or two of hashing is always re-hashed)
    """

    path: str
    sha256: str
    size: int
    mtime: float
    status: str
    reason: str = ""
    chunk_ids: tuple[int, ...] = ()
    duplicate_of: str | None = None
    ingested_at: str = ""
    mtime_ns: int = 0
    root: str = ""
    hashed_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["chunk_ids"] = list(self.chunk_ids)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileEntry:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}  # tolerate keys added by newer versions
        known["chunk_ids"] = tuple(int(i) for i in known.get("chunk_ids", ()))
        return cls(**known)

    @property
    def file_path(self) -> Path | None:
        """Where the file lives on disk, if its root is known."""
        if Path(self.path).is_absolute():  # the key fell back to the absolute path (see ingest._diff)
            return Path(self.path)
        if not self.root:
            return None
        rel = self.path.split("/", 1)[1] if "/" in self.path else self.path
        return Path(self.root) / rel


@dataclass(frozen=True)
class IndexSpec:
    """What makes stored vectors comparable: a KB built under another spec must be rebuilt."""

    model_id: str
    dim: int
    passage_prefix: str
    max_seq_length: int       # embedding.max_seq_length: with the model it fixes the chunk token limit
    chunk_size: int
    chunk_overlap: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> IndexSpec | None:
        if not d:
            return None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def differences(self, other: IndexSpec) -> list[str]:
        """Human-readable `key: old -> new` lines for every field that differs."""
        return [
            f"{k}: {getattr(self, k)!r} -> {getattr(other, k)!r}"
            for k in self.__dataclass_fields__
            if getattr(self, k) != getattr(other, k)
        ]


@dataclass(frozen=True)
class Manifest:
    generation: int
    spec: IndexSpec | None
    files: dict[str, FileEntry] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    format: int = MANIFEST_FORMAT

    @property
    def model_id(self) -> str:
        return self.spec.model_id if self.spec else ""

    @property
    def dim(self) -> int:
        return self.spec.dim if self.spec else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "generation": self.generation,
            "spec": self.spec.to_json() if self.spec else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "files": {p: e.to_json() for p, e in self.files.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        fmt = int(d.get("format", 0))
        if fmt > MANIFEST_FORMAT:
            raise KBCorruptError(
                f"manifest format {fmt} is newer than this program understands ({MANIFEST_FORMAT}); update Zhiwen"
            )
        return cls(
            generation=int(d["generation"]),
            spec=IndexSpec.from_json(d.get("spec")),
            files={p: FileEntry.from_json(e) for p, e in d.get("files", {}).items()},
            created_at=d.get("created_at", ""),
            updated_at=d.get("updated_at", ""),
            format=fmt,
        )

    def check_compatible(self, spec: IndexSpec, kb_name: str) -> None:
        """Raise KBIncompatibleError if this KB's vectors were made under another spec (and it holds any)."""
        if self.spec is None or not self.files or self.spec == spec:
            return
        diffs = "; ".join(self.spec.differences(spec))
        raise KBIncompatibleError(
            f"知识库「{kb_name}」是用另一套嵌入模型或切分设置建立的（{diffs}），旧向量与新设置不能混用。"
            f"请加 --rebuild 重新建库（python ingest.py <文件夹> --kb {kb_name} --rebuild），"
            f"或把设置改回原来的值。"
        )


# --------------------------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------------------------
def validate_kb_name(name: str) -> str:
    """Return `name` if it is a valid KB name ([A-Za-z0-9_-] and CJK, 1-64 characters), else raise KBNameError."""
    if not isinstance(name, str) or not KB_NAME_RE.fullmatch(name):
        raise KBNameError(
            f"知识库名称 {name!r} 无效：只能使用字母、数字、下划线、连字符和汉字，长度 1–64，不能含路径分隔符或点。"
        )
    return name


def kb_dir(name: str, settings: Settings) -> Path:
    """The folder of knowledge base `name` (validated; never outside settings.kb_root)."""
    root = settings.kb_root.resolve()
    path = (root / validate_kb_name(name)).resolve()
    if path.parent != root:  # defence in depth: the regex already excludes separators and dots
        raise KBNameError(f"知识库名称 {name!r} 指向 {root} 之外，已拒绝。")
    return path


def list_knowledge_bases(settings: Settings) -> list[str]:
    """Names of committed knowledge bases under settings.kb_root, sorted."""
    root = settings.kb_root
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and KB_NAME_RE.fullmatch(p.name) and (p / CURRENT_FILE).is_file()
    )


def delete_knowledge_base(name: str, settings: Settings, *, timeout: float | None = 0) -> None:
    """Delete a KB and its uploaded sources. Refuses (KBLockedError) while a writer holds it."""
    path = kb_dir(name, settings)
    if not path.is_dir():
        raise KBNotFoundError(f"知识库「{name}」不存在（{path}）。")
    with _writer_lock(path, name, timeout):
        # Move aside first so a concurrent reader sees "not found" rather than a half-deleted folder.
        trash = path.with_name(f"{_TMP_PREFIX}deleted-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Durable file helpers
# --------------------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_current(path: Path) -> str | None:
    try:
        name = (path / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name if _GEN_RE.fullmatch(name) else None


def _chunk_to_json(c: Chunk) -> dict[str, Any]:
    return {
        "id": c.id,
        "text": c.text,
        "source": c.source,
        "sha256": c.sha256,
        "position": c.position,
        "page": c.page,
        "heading_path": list(c.heading_path),
        "metadata": c.metadata,
    }


def _chunk_from_json(d: Mapping[str, Any]) -> Chunk:
    return Chunk(
        text=d["text"],
        source=d["source"],
        sha256=d["sha256"],
        position=int(d["position"]),
        page=d.get("page"),
        heading_path=tuple(d.get("heading_path") or ()),
        id=int(d["id"]),
        metadata=dict(d.get("metadata") or {}),
    )


def _read_manifest(gen_dir: Path) -> Manifest:
    try:
        return Manifest.from_json(json.loads((gen_dir / MANIFEST_FILE).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise KBCorruptError(f"{gen_dir / MANIFEST_FILE} is damaged ({e}); rebuild with --rebuild") from e


def _load_generation(gen_dir: Path) -> tuple[list[Chunk], faiss.Index, Manifest]:
    """Read one generation; FileNotFoundError propagates (the caller retries if CURRENT moved)."""
    manifest = _read_manifest(gen_dir)
    try:
        with open(gen_dir / CHUNKS_FILE, encoding="utf-8") as f:
            chunks = [_chunk_from_json(json.loads(line)) for line in f if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise KBCorruptError(f"{gen_dir / CHUNKS_FILE} is damaged ({e}); rebuild with --rebuild") from e
    index_path = gen_dir / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(index_path)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise KBCorruptError(f"{index_path} cannot be read by FAISS ({e}); rebuild with --rebuild") from e
    if index.ntotal != len(chunks) or any(c.id != i for i, c in enumerate(chunks)):
        raise KBCorruptError(
            f"{gen_dir}: index.faiss has {index.ntotal} rows but chunks.jsonl has {len(chunks)} chunks "
            f"(or ids out of order); rebuild with --rebuild"
        )
    return chunks, index, manifest


# --------------------------------------------------------------------------------------------------------------
# Read side
# --------------------------------------------------------------------------------------------------------------
class KnowledgeBase:
    """One committed generation of a knowledge base, fully in memory (immutable once opened).

    Opening reads the generation named by CURRENT. Long-lived readers call `is_stale()` (one small file read)
    before use and reopen when it is True, so a deleted file's chunks never come back from a cache.
    """

    def __init__(self, name: str, path: Path, generation: str, chunks: list[Chunk], index: faiss.Index,
                 manifest: Manifest, settings: Settings | None = None) -> None:
        self.name = name
        self.path = path
        self.generation = generation
        self.chunks = chunks
        self.index = index
        self.manifest = manifest
        self._settings = settings
        self._by_sha: dict[str, list[str]] | None = None
        self._chunks_by_sha: dict[str, list[Chunk]] | None = None

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, settings: Settings) -> KnowledgeBase:
        """Open the live generation of KB `name`; KBNotFoundError if it does not exist."""
        path = kb_dir(name, settings)
        for _ in range(10):  # a writer may switch CURRENT and collect our generation between two reads
            gen = _read_current(path)
            if gen is None:
                raise KBNotFoundError(
                    f"知识库「{name}」不存在（{path} 下没有 CURRENT）。先用 python ingest.py <文件夹> --kb {name} 建库。"
                )
            try:
                chunks, index, manifest = _load_generation(path / gen)
            except FileNotFoundError:
                if _read_current(path) != gen:
                    continue
                raise KBCorruptError(f"知识库「{name}」的 CURRENT 指向 {gen}，但该文件夹不完整；请用 --rebuild 重建。")
            return cls(name, path, gen, chunks, index, manifest, settings)
        raise KBCorruptError(f"知识库「{name}」一直在被改写，无法读到一个稳定的版本；请稍后再试。")

    @classmethod
    def create(cls, name: str, settings: Settings, *, exist_ok: bool = True) -> KnowledgeBase:
        """Create an empty KB (generation 0) and return it; with exist_ok, open an existing one instead."""
        path = kb_dir(name, settings)
        if _read_current(path) is not None:
            if not exist_ok:
                raise KBError(f"知识库「{name}」已存在（{path}）。")
            return cls.open(name, settings)
        path.mkdir(parents=True, exist_ok=True)
        (path / SOURCES_DIR).mkdir(exist_ok=True)
        with _writer_lock(path, name, timeout=0):
            if _read_current(path) is None:  # re-check under the lock: another process may have won the race
                w = KBWriter(name, path)
                w.commit(force=True)
        return cls.open(name, settings)

    @classmethod
    def open_or_create(cls, name: str, settings: Settings) -> KnowledgeBase:
        try:
            return cls.open(name, settings)
        except KBNotFoundError:
            return cls.create(name, settings)

    # -- queries -------------------------------------------------------------------------------------------
    @property
    def sources_dir(self) -> Path:
        return self.path / SOURCES_DIR

    def is_stale(self) -> bool:
        """True once CURRENT names another generation (or the KB was deleted): reopen before answering."""
        return _read_current(self.path) != self.generation

    def reopen(self) -> KnowledgeBase:
        if self._settings is None:
            raise KBError("reopen() needs a KnowledgeBase opened with KnowledgeBase.open(name, settings)")
        return KnowledgeBase.open(self.name, self._settings)

    def sources_for(self, sha256: str) -> list[str]:
        """Every live path whose content is `sha256`, the owner (status ok) first."""
        if self._by_sha is None:
            by: dict[str, list[str]] = {}
            for e in sorted(self.manifest.files.values(), key=lambda e: (e.status != "ok", e.path)):
                if e.status in LIVE_STATUSES:
                    by.setdefault(e.sha256, []).append(e.path)
            self._by_sha = by
        return list(self._by_sha.get(sha256, ()))

    def chunks_for(self, sha256: str) -> list[Chunk]:
        """The chunks of one file content in file order (position 0..n-1): for neighbour merging."""
        if self._chunks_by_sha is None:
            by: dict[str, list[Chunk]] = {}
            for c in self.chunks:
                by.setdefault(c.sha256, []).append(c)
            for lst in by.values():
                lst.sort(key=lambda c: c.position)
            self._chunks_by_sha = by
        return list(self._chunks_by_sha.get(sha256, ()))

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"KnowledgeBase({self.name!r}, {self.generation}, {len(self.chunks)} chunks, {len(self.manifest.files)} files)"

    # -- writing -------------------------------------------------------------------------------------------
    @staticmethod
    @contextmanager
    def open_writer(name: str, settings: Settings, *, timeout: float | None = 0) -> Iterator[KBWriter]:
        """Like `kb.writer()` without reading a snapshot first; creates the KB (empty, generation 0) if needed."""
        path = kb_dir(name, settings)
        (path / SOURCES_DIR).mkdir(parents=True, exist_ok=True)
        with _writer_lock(path, name, timeout):
            w = KBWriter(name, path)
            if w.live_generation is None:
                w.commit(force=True)
            yield w

    @contextmanager
    def writer(self, *, timeout: float | None = 0) -> Iterator[KBWriter]:
        """Hold the writer lock and yield a KBWriter loaded from the *live* generation (not this snapshot).

        timeout=0 fails fast with KBLockedError naming the holder; a number waits that many seconds; None waits.
        Nothing is written unless you call commit(); leaving the block without commit discards the changes.
        """
        with _writer_lock(self.path, self.name, timeout):
            yield KBWriter(self.name, self.path)


# --------------------------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------------------------
@contextmanager
def _writer_lock(path: Path, name: str, timeout: float | None) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path / LOCK_FILE), timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout:
        raise KBLockedError(_locked_message(path, name, timeout)) from None
    info = path / LOCK_INFO_FILE
    try:
        info.write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}), encoding="utf-8"
        )
        yield
    finally:
        info.unlink(missing_ok=True)
        lock.release()


def _locked_message(path: Path, name: str, timeout: float | None) -> str:
    try:
        holder = json.loads((path / LOCK_INFO_FILE).read_text(encoding="utf-8"))
        who = f"pid {holder.get('pid')}，主机 {holder.get('host')}，自 {holder.get('since')} 起"
    except (OSError, ValueError):
        who = "持有者信息不可读"
    waited = f"等待 {timeout:g} 秒后仍" if timeout else ""
    return (
        f"知识库「{name}」{waited}正被另一个写入进程占用（{who}）。请等它完成后再试；"
        f"锁随进程退出自动释放（{path / LOCK_FILE}）。"
    )


# --------------------------------------------------------------------------------------------------------------
# Write side
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Content:
    chunks: list[Chunk]
    vectors: np.ndarray  # (len(chunks), dim) float32, L2-normalised


class KBWriter:
    """Mutable state of a KB under the writer lock; `commit()` writes it as a new generation.

    The KB is a set of contents (sha256 -> chunks + vectors) and a set of file entries (path -> FileEntry).
    At commit the store decides ownership: per sha256 the first live entry is "ok" and owns the chunks, the
    other live entries become "duplicate" of it; contents no live entry refers to are dropped.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._contents: dict[str, _Content] = {}
        self._files: dict[str, FileEntry] = {}
        self._spec: IndexSpec | None = None
        self._created_at = now_iso()
        self._live_gen: str | None = _read_current(path)
        self.dirty = False
        # Chunks and vectors of the live generation are read only when a commit needs them: an unchanged rerun
        # reads the manifest alone. Until then, what is stored is known from the manifest (sha -> chunk count).
        self._stored: dict[str, int] = {}
        self._loaded = self._live_gen is None
        self._collect_orphans()
        if self._live_gen is not None:
            manifest = _read_manifest(path / self._live_gen)
            self._spec, self._files, self._created_at = manifest.spec, dict(manifest.files), manifest.created_at
            for e in manifest.files.values():
                if e.status in LIVE_STATUSES:
                    self._stored[e.sha256] = len(e.chunk_ids)

    def _load_stored(self) -> None:
        """Read the live generation's chunks and vectors (stored contents first, in their order, then new ones)."""
        if self._loaded:
            return
        chunks, index, _ = _load_generation(self.path / self._live_gen)
        contents: dict[str, _Content] = {}
        if chunks:
            vectors = index.reconstruct_n(0, index.ntotal)
            start = 0
            for sha, group in _group_by_sha(chunks):
                contents[sha] = _Content(group, vectors[start:start + len(group)])
                start += len(group)
        contents.update(self._contents)
        self._contents, self._loaded = contents, True

    # -- reading the pending state -------------------------------------------------------------------------
    @property
    def spec(self) -> IndexSpec | None:
        return self._spec

    @property
    def files(self) -> Mapping[str, FileEntry]:
        return self._files

    def has_content(self, sha256: str) -> bool:
        return sha256 in self._contents or (not self._loaded and sha256 in self._stored)

    def chunk_count(self, sha256: str) -> int:
        c = self._contents.get(sha256)
        if c is not None:
            return len(c.chunks)
        return 0 if self._loaded else self._stored.get(sha256, 0)

    def live_paths(self, sha256: str) -> list[str]:
        """Live paths holding this content, the current owner (status ok) first."""
        live = [e for e in self._files.values() if e.sha256 == sha256 and e.status in LIVE_STATUSES]
        return [e.path for e in sorted(live, key=lambda e: (e.status != "ok", e.ingested_at, e.path))]

    @property
    def live_generation(self) -> str | None:
        """The generation CURRENT names now (the last one this writer committed, or the one it started from)."""
        return self._live_gen

    # -- changes -------------------------------------------------------------------------------------------
    def set_spec(self, spec: IndexSpec, *, rebuild: bool = False) -> None:
        """Record the spec; with rebuild, drop every content and entry first (a full re-ingest follows)."""
        if rebuild:
            self._contents.clear()
            self._files.clear()
            self._stored.clear()
            self._loaded = True
        else:
            Manifest(0, self._spec, self._files).check_compatible(spec, self.name)
        if spec != self._spec or rebuild:
            self._spec = spec
            self.dirty = True

    def add_content(self, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Store the chunks + vectors of one file content (replacing any earlier ones of that sha)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(chunks) or not chunks:
            raise ValueError(f"add_content({sha256[:12]}): {len(chunks)} chunks but vectors of shape {vectors.shape}")
        if self._spec is not None and self._spec.dim and vectors.shape[1] != self._spec.dim:
            raise ValueError(f"add_content: vectors have dim {vectors.shape[1]}, the KB uses {self._spec.dim}")
        self._contents[sha256] = _Content(list(chunks), vectors)
        self.dirty = True

    def put(self, entry: FileEntry) -> None:
        """Add or replace a file entry. Live entries (ok/duplicate) need their content added first."""
        if entry.status not in STORED_STATUSES:
            raise ValueError(f"FileEntry.status must be one of {sorted(STORED_STATUSES)}, got {entry.status!r}")
        if entry.status in LIVE_STATUSES and not self.has_content(entry.sha256):
            raise ValueError(f"{entry.path}: status {entry.status} but no chunks stored for sha256 {entry.sha256[:12]}")
        self._files[entry.path] = entry
        self.dirty = True

    def remove(self, path: str) -> FileEntry | None:
        """Forget a path. Its chunks stay while another live path has the same content (dropped at commit)."""
        e = self._files.pop(path, None)
        if e is not None:
            self.dirty = True
        return e

    # -- commit --------------------------------------------------------------------------------------------
    def commit(self, *, force: bool = False) -> str | None:
        """Write the pending state as gen-<n+1>, switch CURRENT to it, collect old generations.

        Returns the new generation's name, or None when nothing changed (and not force).
        """
        if not self.dirty and not force:
            return None
        self._load_stored()
        chunks, vectors, files = self._normalise()
        n = 1 + max((int(m.group(1)) for p in self.path.iterdir() if (m := _GEN_RE.match(p.name))), default=-1)
        gen = f"gen-{n}"
        now = now_iso()
        manifest = Manifest(n, self._spec, files, created_at=self._created_at or now, updated_at=now)
        dim = self._spec.dim if self._spec else (vectors.shape[1] if len(vectors) else 0)
        index = faiss.IndexFlatIP(dim)
        if len(chunks):
            index.add(vectors)

        tmp = self.path / f"{_TMP_PREFIX}{gen}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _fsync_path(tmp / INDEX_FILE)
        _write_durable(
            tmp / CHUNKS_FILE,
            "".join(json.dumps(_chunk_to_json(c), ensure_ascii=False) + "\n" for c in chunks).encode("utf-8"),
        )
        _write_durable(tmp / MANIFEST_FILE, json.dumps(manifest.to_json(), ensure_ascii=False, indent=1).encode("utf-8"))
        _fsync_path(tmp)
        os.rename(tmp, self.path / gen)
        _fsync_path(self.path)
        _write_durable(self.path / (CURRENT_FILE + ".tmp"), (gen + "\n").encode("utf-8"))
        os.replace(self.path / (CURRENT_FILE + ".tmp"), self.path / CURRENT_FILE)
        _fsync_path(self.path)

        previous, self._live_gen = self._live_gen, gen
        self._collect_garbage(keep={gen, previous})  # keep the previous one for readers still loading it
        self._files = files
        self.dirty = False
        return gen

    def _normalise(self) -> tuple[list[Chunk], np.ndarray, dict[str, FileEntry]]:
        """Decide owners and duplicates, drop unreferenced contents, assign row ids and chunk sources."""
        owners: dict[str, str] = {}
        # The current owner keeps ownership; otherwise the earliest-ingested path (then by name) takes it.
        for e in sorted(self._files.values(), key=lambda e: (e.status != "ok", e.ingested_at, e.path)):
            if e.status in LIVE_STATUSES:
                owners.setdefault(e.sha256, e.path)
        for sha in [s for s in self._contents if s not in owners]:
            del self._contents[sha]

        chunks: list[Chunk] = []
        blocks: list[np.ndarray] = []
        ids: dict[str, tuple[int, ...]] = {}
        for sha, content in self._contents.items():
            start = len(chunks)
            owner = owners[sha]
            for c in sorted(content.chunks, key=lambda c: c.position):
                chunks.append(replace(c, id=len(chunks), source=owner, sha256=sha))
            order = np.argsort([c.position for c in content.chunks], kind="stable")
            blocks.append(content.vectors[order])
            ids[sha] = tuple(range(start, len(chunks)))
            content.chunks = chunks[start:]
            content.vectors = blocks[-1]

        files: dict[str, FileEntry] = {}
        for path in sorted(self._files):
            e = self._files[path]
            if e.status in LIVE_STATUSES:
                owner = owners[e.sha256]
                e = replace(
                    e,
                    status="ok" if owner == path else "duplicate",
                    duplicate_of=None if owner == path else owner,
                    chunk_ids=ids[e.sha256],
                    reason="" if owner == path else e.reason,
                )
            else:
                e = replace(e, chunk_ids=(), duplicate_of=None)
            files[path] = e
        dim = self._spec.dim if self._spec else (blocks[0].shape[1] if blocks else 0)
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), dtype=np.float32)
        return chunks, vectors, files

    def _collect_orphans(self) -> None:
        """At lock time: drop temp dirs and generations newer than CURRENT (a writer killed before switching)."""
        live = int(self._live_gen[4:]) if self._live_gen else -1
        for p in self.path.iterdir():
            m = _GEN_RE.match(p.name)
            if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or (m and int(m.group(1)) > live)):
                shutil.rmtree(p, ignore_errors=True)
        (self.path / (CURRENT_FILE + ".tmp")).unlink(missing_ok=True)

    def _collect_garbage(self, keep: set[str | None]) -> None:
        """Remove generations other than `keep` and any temp dirs left by a killed writer (we hold the lock)."""
        for p in self.path.iterdir():
            if p.name in keep:
                continue
            if (p.name.startswith(_TMP_PREFIX) and p.is_dir()) or (_GEN_RE.match(p.name) and p.is_dir()):
                shutil.rmtree(p, ignore_errors=True)
        (self.path / (CURRENT_FILE + ".tmp")).unlink(missing_ok=True)


def _group_by_sha(chunks: list[Chunk]) -> Iterator[tuple[str, list[Chunk]]]:
    """Consecutive runs of chunks with the same sha256 (a generation stores each content contiguously)."""
    start = 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i].sha256 != chunks[start].sha256:
            yield chunks[start].sha256, chunks[start:i]
            start = i
