"""The knowledge-base store: one folder per knowledge base, committed in whole generations.

    knowledge_base/<name>/
      sources/     files uploaded through the web page (CLI-ingested files stay where they are)
      CURRENT      text file naming the live generation, replaced atomically (os.replace)
      gen-<n>/     manifest.json + the segments it uses (seg-<id>.faiss / .chunks.jsonl / .bm25.<v>.npz, see
                   retrieval/segments.py); segments shared with the previous generation are hard links
      .lock        writer lock (filelock); .lock.info says who holds it (pid, host, since)

Why generations: a commit writes a complete new folder next to the live one, fsyncs it, renames it into place
and only then switches CURRENT. A reader therefore always sees one consistent generation, and a writer killed
at any moment (kill -9, power loss) leaves the previous generation loadable. A commit writes only the segment
of the contents it adds (plus the manifest); unchanged segments are hard-linked (immutable files, so sharing
is safe), and small segments are merged now and then (MAX_SEGMENTS). Nothing here is a pickle: FAISS writes
its own format, BM25 postings are .npz arrays loaded with allow_pickle=False, everything else is JSON.
Generations written before segments (format 1: index.faiss + chunks.jsonl) are read as they are and rewritten
as segments by their next commit.

Chunks are content-addressed: they belong to a file *content* (sha256), and the manifest maps each path to a
sha256. Renaming a file is a manifest change; two paths with the same bytes share one set of chunks (the second
is a "duplicate"); the chunks go away only when the last path holding that content goes away.

Read side:  KnowledgeBase.open(name, settings), kb.chunks, kb.index, kb.manifest, kb.sources_for(sha), kb.is_stale()
Write side: `with kb.writer() as w: ...; w.commit()` (ingest only).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from filelock import FileLock, Timeout

from common.files import now_iso, sha256_file
from retrieval import segments as seglib
from retrieval.segments import (
    SEGMENTS,
    ChunkTable,
    Layout,
    PositionMap,
    Postings,
    Segment,
    SegmentedBM25,
    SegmentedIndex,
    SegmentError,
    SegmentInfo,
)
from retrieval.stores import is_milvus
from retrieval.types import Chunk

if TYPE_CHECKING:
    from configs import Settings

MANIFEST_FORMAT = 3       # 3: segments, file table in parts; 2: segments, one manifest.json; 1: index.faiss (all read)
PART_BUCKETS = 256        # the file table and the content map are each cut into at most this many parts …
PART_TARGET = 256         # … of about this many entries (a KB of up to PART_TARGET files has one part of each)
MAX_SEGMENTS = 8          # more after a commit: the smaller half are merged into one
IVF_MIN_ROWS = 1_000      # store.faiss_index ivf: smaller segments stay exact
MOSTLY_DEAD = 0.5         # a segment whose live share falls below this is rewritten at the next commit
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.info"
SOURCES_DIR = "sources"
INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.jsonl"
MANIFEST_FILE = "manifest.json"
_PART_RE = re.compile(r"^manifest\.(files|contents)-[0-9a-f]{20}\.json$")
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
        ids = self.chunk_ids
        if ids and ids == tuple(range(ids[0], ids[0] + len(ids))):  # always, from this store: [first, count]
            del d["chunk_ids"]
            d["chunk_range"] = [ids[0], len(ids)]
        else:
            d["chunk_ids"] = list(ids)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileEntry:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}  # tolerate keys added by newer versions
        if "chunk_range" in d:
            first, count = (int(x) for x in d["chunk_range"])
            known["chunk_ids"] = tuple(range(first, first + count))
        else:
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
class PartInfo:
    """One part of a format-3 generation's file table (kind "files": path -> entry) or content map (kind "contents":
    sha256 -> segment, first row, count): the entries whose key falls in `bucket` (crc32 of the key modulo the
    manifest's `part_buckets`, a power of two up to PART_BUCKETS that grows with the KB). A part is immutable and
    named by the hash of its bytes, so a commit writes only the parts whose entries changed and hard-links the
    others from the previous generation, like segments."""

    kind: str        # "files" | "contents"
    bucket: int
    file: str        # manifest.<kind>-<first 20 hex of sha256>.json
    count: int       # entries in it
    sha256: str      # of the file's bytes, verified when it is read

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "bucket": self.bucket, "file": self.file, "count": self.count, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: Any) -> PartInfo:
        try:
            info = cls(kind=str(d["kind"]), bucket=int(d["bucket"]), file=str(d["file"]), count=int(d["count"]),
                       sha256=str(d["sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KBCorruptError(f"清单的分片条目 {str(d)[:80]} 不完整（{type(e).__name__}: {e}）") from None
        m = _PART_RE.fullmatch(info.file)
        if (m is None or m.group(1) != info.kind or not 0 <= info.bucket < PART_BUCKETS or info.count <= 0
                or not re.fullmatch(r"[0-9a-f]{64}", info.sha256) or info.file[-25:-5] != info.sha256[:20]):
            raise KBCorruptError(f"清单的分片条目 {str(d)[:80]} 有误")
        return info


def _bucket(key: str, buckets: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % buckets


def _buckets_for(n_files: int) -> int:
    """Buckets for a KB of n files: about PART_TARGET entries per part, a power of two, at most PART_BUCKETS."""
    b = 1
    while b < PART_BUCKETS and n_files > b * PART_TARGET:
        b *= 2
    return b


@dataclass(frozen=True)
class Manifest:
    generation: int
    spec: IndexSpec | None
    files: dict[str, FileEntry] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    format: int = MANIFEST_FORMAT
    checksums: dict[str, str] = field(default_factory=dict)  # format 1: file name -> sha256, set at commit
    segments: tuple[SegmentInfo, ...] = ()                   # format 2: the segments, in row order
    contents: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # sha256 -> (segment id, first row, n)
    parts: tuple[PartInfo, ...] = ()                         # format 3: where `files` and `contents` are stored
    part_buckets: int = 0                                    # format 3: keys are spread over this many parts

    @property
    def model_id(self) -> str:
        return self.spec.model_id if self.spec else ""

    @property
    def dim(self) -> int:
        return self.spec.dim if self.spec else 0

    def _head_json(self) -> dict[str, Any]:
        """The fields both JSON forms share."""
        return {
            "format": self.format,
            "generation": self.generation,
            "spec": self.spec.to_json() if self.spec else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "segments": [i.to_json() for i in self.segments],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self._head_json(),
            "files": {p: e.to_json() for p, e in self.files.items()},
            "checksums": dict(self.checksums),
            "contents": {sha: list(loc) for sha, loc in self.contents.items()},
        }

    def to_disk_json(self) -> dict[str, Any]:
        """Format 3's manifest.json: everything but the file table and the content map, which live in `parts`."""
        return {
            **self._head_json(),
            "part_buckets": self.part_buckets,
            "parts": [p.to_json() for p in self.parts],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise KBCorruptError(f"清单应是一个 JSON 对象，实际是 {type(d).__name__}")
        if not isinstance(d.get("files", {}), Mapping):
            raise KBCorruptError(f"清单的 files 应是 路径→条目 的对象，实际是 {type(d.get('files')).__name__}")
        if not isinstance(d.get("checksums", {}), Mapping):
            raise KBCorruptError("清单的 checksums 应是一个对象")
        bad = [p for p, e in d.get("files", {}).items() if not isinstance(e, Mapping)]
        if bad:
            raise KBCorruptError(f"清单中文件条目「{bad[0]}」不是对象")
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
            checksums={str(k): str(v) for k, v in d.get("checksums", {}).items()},
            segments=tuple(_segment_infos(d.get("segments", []))),
            contents=_contents(d.get("contents", {})),
            parts=tuple(_part_infos(d.get("parts", []), d.get("part_buckets", 0))),
            part_buckets=int(d.get("part_buckets", 0)),
        )

    def check_segments(self) -> None:
        """Format 2: every live content lies inside a listed segment, without overlaps (else KBCorruptError)."""
        if self.format < 2:
            return
        rows = {i.id: i.rows for i in self.segments}
        used: dict[str, list[tuple[int, int]]] = {}
        for sha, (seg, start, n) in self.contents.items():
            if seg not in rows or start < 0 or n <= 0 or start + n > rows[seg]:
                raise KBCorruptError(f"清单中内容 {sha[:12]} 的位置 {seg}:{start}+{n} 不在任何段内")
            used.setdefault(seg, []).append((start, start + n))
        for spans in used.values():
            spans.sort()
            if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
                raise KBCorruptError("清单中两份内容占用了同一段的同一些行")
        live = {e.sha256 for e in self.files.values() if e.status in LIVE_STATUSES}
        if live != set(self.contents):
            raise KBCorruptError(f"清单的文件（{len(live)} 份内容）与内容表（{len(self.contents)} 份）不一致")

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


def _segment_infos(raw: Any) -> list[SegmentInfo]:
    if not isinstance(raw, list):
        raise KBCorruptError(f"清单的 segments 应是列表，实际是 {type(raw).__name__}")
    try:
        return [SegmentInfo.from_json(d) for d in raw]
    except SegmentError as e:
        raise KBCorruptError(str(e)) from None


def _part_infos(raw: Any, buckets: Any) -> list[PartInfo]:
    if not isinstance(raw, list):
        raise KBCorruptError(f"清单的 parts 应是列表，实际是 {type(raw).__name__}")
    if raw and (not isinstance(buckets, int) or buckets not in {2 ** k for k in range(9)} or buckets > PART_BUCKETS):
        raise KBCorruptError(f"清单的 part_buckets {str(buckets)[:20]!r} 有误")
    parts = [PartInfo.from_json(d) for d in raw]
    if any(p.bucket >= buckets for p in parts):
        raise KBCorruptError("清单的分片编号超出了 part_buckets")
    if len({(p.kind, p.bucket) for p in parts}) != len(parts):
        raise KBCorruptError("清单的两个分片登记了同一个桶")
    return parts


def _contents(raw: Any) -> dict[str, tuple[str, int, int]]:
    if not isinstance(raw, Mapping):
        raise KBCorruptError(f"清单的 contents 应是对象，实际是 {type(raw).__name__}")
    out = {}
    for sha, loc in raw.items():
        if not (isinstance(loc, list) and len(loc) == 3 and isinstance(loc[0], str)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in loc[1:])):
            raise KBCorruptError(f"清单中内容 {str(sha)[:12]} 的位置 {str(loc)[:40]} 有误")
        out[str(sha)] = (loc[0], loc[1], loc[2])
    return out


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
    if is_milvus(settings):  # store.backend: milvus (retrieval/stores.py)
        from retrieval import milvus_store

        return milvus_store.list_knowledge_bases(settings)
    root = settings.kb_root
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and KB_NAME_RE.fullmatch(p.name) and ((p / CURRENT_FILE).is_file() or _generations(p))
    )


def delete_knowledge_base(name: str, settings: Settings, *, timeout: float | None = 0) -> None:
    """Delete a KB and its uploaded sources. Refuses (KBLockedError) while a writer holds it."""
    if is_milvus(settings):
        from retrieval import milvus_store

        return milvus_store.delete_knowledge_base(name, settings, timeout=timeout)
    path = kb_dir(name, settings)
    if not path.is_dir():
        raise KBNotFoundError(f"知识库「{name}」不存在（{path}）。")
    with _writer_lock(path, name, timeout):
        # Move aside first so a concurrent reader sees "not found" rather than a half-deleted folder.
        trash = path.with_name(f"{_TMP_PREFIX}deleted-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_manifest(name: str, settings: Settings) -> tuple[str, Manifest]:
    """(generation, manifest) of the live generation, reading CURRENT and manifest.json only — never the index or
    the chunks: what the KB list, the status line and the file table show. KBNotFoundError / KBCorruptError."""
    if is_milvus(settings):
        from retrieval import milvus_store

        return milvus_store.read_manifest(name, settings)
    path = kb_dir(name, settings)
    for _ in range(10):
        gen = _live_generation(path, name) if path.is_dir() else None
        if gen is None:
            raise KBNotFoundError(f"知识库「{name}」不存在（{path} 下没有 CURRENT）。")
        try:
            return gen, _read_manifest(path / gen)
        except KBCorruptError as e:
            if _read_current(path) != gen:
                continue  # a writer switched CURRENT and collected this generation meanwhile
            raise _damaged(name, str(e)) from None
    raise KBCorruptError(f"知识库「{name}」一直在被改写，无法读到一个稳定的版本；请稍后再试。")


@dataclass(frozen=True)
class RepairResult:
    """What repair_knowledge_base did. skipped: (generation, why it is not complete), newest first."""

    name: str
    generation: str
    before: str | None           # what CURRENT held (None: missing)
    changed: bool
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        lines = [f"  {g}：不完整，跳过（{why}）" for g, why in self.skipped]
        if self.changed:
            lines.append(f"知识库「{self.name}」已修复：CURRENT 原为 {self.before!r}，"
                         f"现指向最新的完整版本 {self.generation}。")
        else:
            lines.append(f"知识库「{self.name}」无需修复：CURRENT 指向的 {self.generation} 完整可用。")
        return "\n".join(lines)


def repair_knowledge_base(name: str, settings: Settings, *, timeout: float | None = 0) -> RepairResult:
    """Point CURRENT at the newest complete generation (fully verified, as on open), under the writer lock.

    A CURRENT whose generation verifies is left alone. Nothing is deleted here; generations newer than the one
    chosen are collected by the next writer. KBCorruptError when no generation is complete (then --rebuild).
    """
    if is_milvus(settings):  # nothing to re-point: a Milvus writer cleans what a killed one left (milvus_store)
        from retrieval.milvus_store import MilvusKnowledgeBase

        with MilvusKnowledgeBase.open_writer(name, settings, timeout=timeout) as w:
            gen = w.live_generation or "gen-0"
        return RepairResult(name, gen, gen, False)
    path = kb_dir(name, settings)
    if not path.is_dir():
        raise KBNotFoundError(f"知识库「{name}」不存在（{path}）。")
    with _writer_lock(path, name, timeout):
        try:
            before: str | None = (path / CURRENT_FILE).read_bytes().decode("utf-8", errors="replace").strip()
        except FileNotFoundError:
            before = None
        except OSError as e:
            before = f"<无法读取：{e.strerror or e}>"
        candidates = _generations(path)
        if before in candidates:  # a CURRENT that verifies is kept even if a newer (orphaned) generation exists
            candidates = [before] + [g for g in candidates if g != before]
        skipped: list[tuple[str, str]] = []
        for gen in candidates:
            try:
                _load_generation(path / gen)
            except (KBCorruptError, FileNotFoundError) as e:
                skipped.append((gen, str(e) or type(e).__name__))
                continue
            changed = before != gen
            if changed:
                _write_durable(path / (CURRENT_FILE + ".tmp"), (gen + "\n").encode("utf-8"))
                os.replace(path / (CURRENT_FILE + ".tmp"), path / CURRENT_FILE)
                _fsync_path(path)
            return RepairResult(name, gen, before, changed, tuple(skipped))
        detail = "；".join(f"{g}：{why}" for g, why in skipped) or "没有任何版本文件夹"
        raise KBCorruptError(
            f"知识库「{name}」没有可以恢复的完整版本（{detail}）。请用 python ingest.py <文件夹> --kb {name} --rebuild "
            f"重新建库（上传的原文件在 {path / SOURCES_DIR}）。"
        )


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
    """The generation CURRENT names; None when absent or not a generation name (_live_generation tells which)."""
    try:
        name = (path / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return None
    return name if _GEN_RE.fullmatch(name) else None


def _generations(path: Path) -> list[str]:
    """Generation folders of a KB, newest first."""
    try:
        found = [(int(m.group(1)), p.name) for p in path.iterdir() if (m := _GEN_RE.fullmatch(p.name)) and p.is_dir()]
    except OSError:
        return []
    return [name for _, name in sorted(found, reverse=True)]


def repair_command(name: str) -> str:
    return f"python ingest.py --repair --kb {name}"


def _damaged(name: str, problem: str) -> KBCorruptError:
    return KBCorruptError(
        f"知识库「{name}」已损坏：{problem}。已有版本都原样保留；请运行 {repair_command(name)} "
        f"把 CURRENT 指回最新的完整版本（若没有完整版本，用 --rebuild 重新建库）。"
    )


def _live_generation(path: Path, name: str) -> str | None:
    """The generation CURRENT names; None for a KB never committed. Raises KBCorruptError when CURRENT is damaged.

    Damaged means: CURRENT holds anything but `gen-<n>` (e.g. "../../../etc"), names a generation folder that does
    not exist, or is missing while committed generations (ones holding files) exist. A writer must never take such
    a KB for a new one: it would collect every existing generation as an orphan.
    """
    current = path / CURRENT_FILE
    try:
        raw = current.read_bytes()
    except FileNotFoundError:
        committed = [g for g in _generations(path) if _holds_files(path / g)]
        if committed:
            raise _damaged(name, f"CURRENT 文件不见了，但还有版本 {', '.join(committed)}") from None
        return None
    except OSError as e:
        raise _damaged(name, f"CURRENT 无法读取（{e.strerror or e}）") from None
    text = raw.decode("utf-8", errors="replace").strip()
    if not _GEN_RE.fullmatch(text):
        raise _damaged(name, f"CURRENT 的内容 {text[:60]!r} 不是一个版本名（应为 gen-<编号>）")
    if not (path / text).is_dir():
        raise _damaged(name, f"CURRENT 指向的版本 {text} 不存在")
    return text


def _holds_files(gen_dir: Path) -> bool:
    """True if a generation's manifest lists any file (an empty first generation carries nothing to lose)."""
    try:
        d = json.loads((gen_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # unreadable: keep it and let a person decide
    if not isinstance(d, dict):
        return True
    parts = d.get("parts")
    if isinstance(parts, list) and parts:  # format 3: the file table is in parts
        return any(not isinstance(p, dict) or (p.get("kind") == "files" and p.get("count")) for p in parts)
    return bool(d.get("files"))


class _ManifestCache:
    """The last format-3 manifest this process read or committed, per KB. Used again only while manifest.json and
    every part are the very files it came from (inode, size, mtime, as for segments), so the reopen after a commit
    and the next writer do not re-read, re-assemble and re-check every file entry (285k at 1M chunks)."""

    def __init__(self) -> None:
        self._by_kb: dict[str, tuple[str, tuple, Manifest]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _stamp(gen_dir: Path, parts: tuple[PartInfo, ...]) -> tuple | None:
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (
                os.stat(gen_dir / name) for name in (MANIFEST_FILE, *(p.file for p in parts))))
        except OSError:
            return None

    def get(self, gen_dir: Path) -> Manifest | None:
        with self._lock:
            hit = self._by_kb.get(str(gen_dir.parent.resolve()))
        if hit is None or hit[0] != gen_dir.name:
            return None
        return hit[2] if self._stamp(gen_dir, hit[2].parts) == hit[1] else None

    def put(self, gen_dir: Path, m: Manifest) -> None:
        stamp = self._stamp(gen_dir, m.parts)
        if stamp is not None:
            with self._lock:
                self._by_kb[str(gen_dir.parent.resolve())] = (gen_dir.name, stamp, m)


MANIFESTS = _ManifestCache()


def _read_manifest(gen_dir: Path) -> Manifest:
    """Parse a generation's manifest; KBCorruptError (message without the KB name: callers wrap it) if damaged.
    Callers treat the result as read-only (it may be shared through MANIFESTS)."""
    held = MANIFESTS.get(gen_dir)
    if held is not None:
        return held
    try:
        raw = (gen_dir / MANIFEST_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KBCorruptError(f"{gen_dir.name} 缺少 {MANIFEST_FILE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KBCorruptError(f"{gen_dir.name}/{MANIFEST_FILE} 无法读取（{e}）") from None
    try:
        m = Manifest.from_json(json.loads(raw))
        if m.format >= 3:
            m = _with_parts(gen_dir, m)
        m.check_segments()
        if m.format >= 3:
            MANIFESTS.put(gen_dir, m)
        return m
    except KBCorruptError as e:
        raise KBCorruptError(f"{gen_dir.name}/{MANIFEST_FILE} 有误：{e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise KBCorruptError(f"{gen_dir.name}/{MANIFEST_FILE} 有误（{type(e).__name__}: {e}）") from None


_STORED_FIELDS = [f.name for f in fields(FileEntry) if f.name != "chunk_ids"]
_stored_key = attrgetter(*_STORED_FIELDS)  # what a part stores of an entry (chunk ids follow from the content map)


def _entry_json(e: FileEntry) -> dict[str, Any]:
    return {k: getattr(e, k) for k in _STORED_FIELDS}


def _part_bytes(kind: str, bucket: int, buckets: int, entries: Mapping[str, Any]) -> bytes:
    if kind == "files":
        body = {p: _entry_json(e) for p, e in sorted(entries.items())}
    else:
        body = {sha: list(loc) for sha, loc in sorted(entries.items())}
    doc = {"kind": kind, "bucket": bucket, "buckets": buckets, "entries": body}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _load_part(gen_dir: Path, part: PartInfo, buckets: int) -> dict[str, Any]:
    """Read and verify one part: its checksum, its shape, and that every key belongs to its bucket."""
    where = f"{gen_dir.name}/{part.file}"
    try:
        data = (gen_dir / part.file).read_bytes()
    except FileNotFoundError:
        raise KBCorruptError(f"{gen_dir.name} 缺少 {part.file}") from None
    if hashlib.sha256(data).hexdigest() != part.sha256:
        raise KBCorruptError(f"{where} 的内容与提交时记录的校验和不符（文件被改动或损坏）")
    try:
        d = json.loads(data)
        entries = d["entries"]
        if (d.get("kind") != part.kind or d.get("bucket") != part.bucket or d.get("buckets") != buckets
                or not isinstance(entries, Mapping)):
            raise ValueError("kind / bucket / entries do not match the manifest")
        if len(entries) != part.count:
            raise ValueError(f"{len(entries)} entries, the manifest says {part.count}")
        if any(_bucket(k, buckets) != part.bucket for k in entries):
            raise ValueError("an entry is in the wrong bucket")
        if part.kind == "contents":
            return _contents(entries)
        if not all(isinstance(e, Mapping) and e.get("path") == p for p, e in entries.items()):
            raise ValueError("an entry is not an object of its own path")
        return {p: FileEntry.from_json(e) for p, e in entries.items()}
    except KBCorruptError as e:
        raise KBCorruptError(f"{where} 有误：{e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise KBCorruptError(f"{where} 有误（{type(e).__name__}: {e}）") from None


class _PartCache:
    """Parsed manifest parts of the generation of each KB this process read last. Parts are immutable and shared
    between generations by hard link, so a reopen after a one-file commit reads and parses one or two small parts.
    A cached part is used only while its file is the very file it was read from (inode, size, mtime)."""

    def __init__(self) -> None:
        self._by_kb: dict[str, dict[str, tuple[tuple, dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def read(self, gen_dir: Path, parts: tuple[PartInfo, ...], buckets: int) -> list[dict[str, Any]]:
        kb = str(gen_dir.parent.resolve())
        with self._lock:
            held = dict(self._by_kb.get(kb, {}))
        out, now = [], {}
        for part in parts:
            try:
                st = os.stat(gen_dir / part.file)
            except FileNotFoundError:
                raise KBCorruptError(f"{gen_dir.name} 缺少 {part.file}") from None
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            hit = held.get(part.file)
            entries = hit[1] if hit is not None and hit[0] == stamp else _load_part(gen_dir, part, buckets)
            now[part.file] = (stamp, entries)
            out.append(entries)
        with self._lock:
            self._by_kb[kb] = now
        return out


PARTS = _PartCache()


def _first_rows(segments: tuple[SegmentInfo, ...] | list[SegmentInfo],
                contents: Mapping[str, tuple[str, int, int]]) -> dict[str, int]:
    """sha256 -> its first global row (segments in order, live rows in order: Layout's numbering)."""
    order = {info.id: k for k, info in enumerate(segments)}
    first: dict[str, int] = {}
    row = 0
    for _, _, k, sha in sorted((order.get(loc[0], len(order)), loc[1], loc[2], sha) for sha, loc in contents.items()):
        first[sha] = row
        row += k
    return first


def _with_parts(gen_dir: Path, m: Manifest) -> Manifest:
    """A format-3 manifest with its file table and content map read from its parts; chunk ids = global rows."""
    read = list(zip(m.parts, PARTS.read(gen_dir, m.parts, m.part_buckets), strict=True))
    contents: dict[str, tuple[str, int, int]] = {}
    for part, entries in read:
        if part.kind == "contents":
            contents.update(entries)
    first = _first_rows(m.segments, contents)
    files: dict[str, FileEntry] = {}
    for part, entries in read:
        if part.kind != "files":
            continue
        for p, e in entries.items():
            if e.status in LIVE_STATUSES and e.sha256 in first:
                row, k, ids = first[e.sha256], contents[e.sha256][2], e.chunk_ids
                if not (len(ids) == k and ids[0] == row and ids[-1] == row + k - 1):
                    # the cached entry keeps the ids of the last generation read: after an append they still hold
                    e = entries[p] = replace(e, chunk_ids=tuple(range(row, row + k)))
            files[p] = e
    return replace(m, files=dict(sorted(files.items())), contents=contents)


def _verify_files(gen_dir: Path, checksums: Mapping[str, str]) -> None:
    """Files still hold the bytes their commit recorded (generations and segments are never modified)."""
    for fname, expected in checksums.items():
        if Path(fname).name != fname:
            raise KBCorruptError(f"{gen_dir.name}/{MANIFEST_FILE} 的校验和列出了可疑的文件名 {fname!r}")
        try:
            got = sha256_file(gen_dir / fname)
        except FileNotFoundError:
            raise KBCorruptError(f"{gen_dir.name} 缺少 {fname}") from None
        if got != expected:
            raise KBCorruptError(f"{gen_dir.name}/{fname} 的内容与提交时记录的校验和不符（文件被改动或损坏）")


@dataclass
class _Generation:
    manifest: Manifest
    segments: list[Segment]
    contents: dict[str, tuple[str, int, int]]


def _load_legacy(gen_dir: Path, manifest: Manifest) -> _Generation:
    """A format-1 generation (one index.faiss + chunks.jsonl) as one in-memory segment; BM25 is tokenised here."""
    _verify_files(gen_dir, manifest.checksums)
    try:
        with open(gen_dir / CHUNKS_FILE, encoding="utf-8") as f:
            chunks = [seglib.chunk_from_json(json.loads(line)) for line in f if line.strip()]
    except FileNotFoundError:
        raise KBCorruptError(f"{gen_dir.name} 缺少 {CHUNKS_FILE}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise KBCorruptError(f"{gen_dir.name}/{CHUNKS_FILE} 有误（{e}）") from None
    index_path = gen_dir / INDEX_FILE
    if not index_path.is_file():
        raise KBCorruptError(f"{gen_dir.name} 缺少 {INDEX_FILE}")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KBCorruptError(f"{gen_dir.name}/{INDEX_FILE} 无法被 FAISS 读取（{detail}）") from None
    if index.ntotal != len(chunks) or any(c.id != i for i, c in enumerate(chunks)):
        raise KBCorruptError(
            f"{gen_dir.name}: index.faiss has {index.ntotal} rows but chunks.jsonl has {len(chunks)} chunks "
            f"(or ids out of order)"
        )
    if manifest.dim and index.d != manifest.dim:
        raise KBCorruptError(f"{gen_dir.name}/{INDEX_FILE} 的向量是 {index.d} 维，清单记录的模型是 {manifest.dim} 维")
    try:
        seglib.check_index_vectors(index, f"{gen_dir.name}/{INDEX_FILE}")
    except SegmentError as e:
        raise KBCorruptError(str(e)) from None
    info = SegmentInfo("legacy", len(chunks), index.d, "flat", "", {}, {})
    seg = Segment(info, chunks, index, Postings.from_texts([c.embedding_text() for c in chunks]))
    contents = {sha: ("legacy", group[0].id, len(group)) for sha, group in _group_by_sha(chunks)}
    return _Generation(manifest, [seg], contents)


def _load_generation(gen_dir: Path) -> _Generation:
    """Read and verify one generation; FileNotFoundError if the folder went away (the caller retries if CURRENT moved).

    Verified on every open (segments once per process: they never change): the checksums written at commit,
    chunk field types, row ids, each index's row count and dimension, and that every vector is finite with norm 1.
    Problems raise KBCorruptError naming the file; callers add the KB name and the repair command.
    """
    if not gen_dir.is_dir():
        raise FileNotFoundError(gen_dir)
    manifest = _read_manifest(gen_dir)
    if manifest.format < 2:
        return _load_legacy(gen_dir, manifest)
    dim = manifest.dim
    segs = []
    for info in manifest.segments:
        if dim and info.dim != dim:
            raise KBCorruptError(f"{gen_dir.name}/{info.files['faiss']} 的向量是 {info.dim} 维，"
                                 f"清单记录的模型是 {dim} 维")
        try:
            segs.append(SEGMENTS.get(gen_dir, info))
        except SegmentError as e:
            raise KBCorruptError(str(e)) from None
    return _Generation(manifest, segs, dict(manifest.contents))


# --------------------------------------------------------------------------------------------------------------
# Read side
# --------------------------------------------------------------------------------------------------------------
class KnowledgeBase:
    """One committed generation of a knowledge base, fully in memory (immutable once opened).

    Opening reads the generation named by CURRENT. Long-lived readers call `is_stale()` (one small file read)
    before use and reopen when it is True, so a deleted file's chunks never come back from a cache.
    """

    def __init__(self, name: str, path: Path, generation: str, loaded: _Generation,
                 settings: Settings | None = None) -> None:
        self.name = name
        self.path = path
        self.generation = generation
        self.manifest = loaded.manifest
        self._settings = settings
        self._by_sha: dict[str, list[str]] | None = None
        self._contents = loaded.contents
        self._layout = Layout(loaded.segments, loaded.contents)
        owners = {e.sha256: e.path for e in self.manifest.files.values() if e.status == "ok"}  # one per content
        nprobe = settings.store.ivf_nprobe if settings is not None else 64
        self.chunks: ChunkTable = ChunkTable(self._layout, owners)          # row i of index is chunks[i]
        self.index = SegmentedIndex(self._layout, self.manifest.dim or (loaded.segments[0].info.dim
                                                                        if loaded.segments else 0), nprobe)
        self.bm25 = SegmentedBM25(self._layout)                             # from the stored tokens
        self.by_position = PositionMap(self._layout, loaded.contents)       # (sha256, position) -> row

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, settings: Settings) -> KnowledgeBase:
        """Open the live generation of KB `name`; KBNotFoundError if it does not exist."""
        if is_milvus(settings):  # store.backend: milvus — the same read side, in Milvus (retrieval/stores.py)
            from retrieval.milvus_store import MilvusKnowledgeBase

            return MilvusKnowledgeBase.open(name, settings)
        path = kb_dir(name, settings)
        for _ in range(10):  # a writer may switch CURRENT and collect our generation between two reads
            try:
                gen = _live_generation(path, name)
            except KBCorruptError:
                if _read_current(path) is not None and (path / str(_read_current(path))).is_dir():
                    continue  # CURRENT moved on between the two reads
                raise
            if gen is None:
                raise KBNotFoundError(
                    f"知识库「{name}」不存在（{path} 下没有 CURRENT）。"
                    f"先用 python ingest.py <文件夹> --kb {name} 建库。"
                )
            try:
                loaded = _load_generation(path / gen)
            except FileNotFoundError:
                if _read_current(path) != gen:
                    continue
                raise _damaged(name, f"CURRENT 指向的版本 {gen} 不存在") from None
            except KBCorruptError as e:
                if _read_current(path) != gen:
                    continue
                raise _damaged(name, str(e)) from None
            return cls(name, path, gen, loaded, settings)
        raise KBCorruptError(f"知识库「{name}」一直在被改写，无法读到一个稳定的版本；请稍后再试。")

    @classmethod
    def create(cls, name: str, settings: Settings, *, exist_ok: bool = True) -> KnowledgeBase:
        """Create an empty KB (generation 0) and return it; with exist_ok, open an existing one instead."""
        if is_milvus(settings):
            from retrieval.milvus_store import MilvusKnowledgeBase

            return MilvusKnowledgeBase.create(name, settings, exist_ok=exist_ok)
        path = kb_dir(name, settings)
        if path.is_dir() and _live_generation(path, name) is not None:
            if not exist_ok:
                raise KBError(f"知识库「{name}」已存在（{path}）。")
            return cls.open(name, settings)
        path.mkdir(parents=True, exist_ok=True)
        (path / SOURCES_DIR).mkdir(exist_ok=True)
        with _writer_lock(path, name, timeout=0):
            if _live_generation(path, name) is None:  # re-check under the lock: another process may have won the race
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
            for e in self.manifest.files.values():
                if e.status in LIVE_STATUSES:
                    by.setdefault(e.sha256, []).append(e)
            # the owner first, then by path (a list of one, the usual case, needs no sorting)
            self._by_sha = {sha: [e.path for e in (sorted(es, key=lambda e: (e.status != "ok", e.path))
                                                   if len(es) > 1 else es)] for sha, es in by.items()}
        return list(self._by_sha.get(sha256, ()))

    def chunks_for(self, sha256: str) -> list[Chunk]:
        """The chunks of one file content in file order (position 0..n-1): for neighbour merging."""
        if sha256 not in self._contents:
            return []
        seg_id, start, n = self._contents[sha256]
        k = next(i for i, s in enumerate(self._layout.segments) if s.info.id == seg_id)
        rows = self._layout.global_of_local[k][start:start + n]
        return sorted((self.chunks[int(r)] for r in rows), key=lambda c: c.position)

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return (f"KnowledgeBase({self.name!r}, {self.generation}, {len(self.chunks)} chunks, "
                f"{len(self.manifest.files)} files)")

    # -- writing -------------------------------------------------------------------------------------------
    @staticmethod
    @contextmanager
    def open_writer(name: str, settings: Settings, *, timeout: float | None = 0) -> Iterator[KBWriter]:
        """Like `kb.writer()` without reading a snapshot first; creates the KB (empty, generation 0) if needed."""
        if is_milvus(settings):
            from retrieval.milvus_store import MilvusKnowledgeBase

            with MilvusKnowledgeBase.open_writer(name, settings, timeout=timeout) as w:
                yield w
            return
        path = kb_dir(name, settings)
        (path / SOURCES_DIR).mkdir(parents=True, exist_ok=True)
        with _writer_lock(path, name, timeout):
            w = KBWriter(name, path, settings)
            if w.live_generation is None and w._damage is None:
                w.commit(force=True)
            yield w

    @contextmanager
    def writer(self, *, timeout: float | None = 0) -> Iterator[KBWriter]:
        """Hold the writer lock and yield a KBWriter loaded from the *live* generation (not this snapshot).

        timeout=0 fails fast with KBLockedError naming the holder; a number waits that many seconds; None waits.
        Nothing is written unless you call commit(); leaving the block without commit discards the changes.
        """
        with _writer_lock(self.path, self.name, timeout):
            yield KBWriter(self.name, self.path, self._settings)


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

    Stored contents stay in their segments (`_stored`: sha -> (segment, first row, n)); contents added in this
    writer (`_new`) become one new segment at commit, together with the live rows of any segments merged then.
    """

    def __init__(self, name: str, path: Path, settings: Settings | None = None) -> None:
        self.name = name
        self.path = path
        self._settings = settings
        self._new: dict[str, _Content] = {}
        self._stored: dict[str, tuple[str, int, int]] = {}
        self._segments: list[SegmentInfo] = []
        self._legacy: _Generation | None = None  # a format-1 live generation: rewritten as a segment at commit
        self._held: list[Segment] = []           # the live segments, loaded (and verified) once
        self._files: dict[str, FileEntry] = {}
        # What the live generation stores (format 3): its parts, and the entries they hold, to find the parts a
        # commit changes. Empty for an older format or a rebuild: the next commit then writes every part.
        self._base_parts: dict[tuple[str, int], PartInfo] = {}
        self._base_buckets = 0
        self._base_files: dict[str, FileEntry] = {}
        self._base_contents: dict[str, tuple[str, int, int]] = {}
        self._spec: IndexSpec | None = None
        self._created_at = now_iso()
        self.dirty = False
        self.last_commit_bytes = 0  # bytes of files the last commit wrote (hard links not counted)
        # A damaged KB (CURRENT, manifest, segments) is never written over: every use of this writer raises the
        # damage, with the repair command, until set_spec(rebuild=True) starts the KB over on purpose.
        self._damage: KBCorruptError | None = None
        self._damage_cleared = False
        try:
            self._live_gen: str | None = _live_generation(path, name)
            manifest = self._verify_live() if self._live_gen else None
        except KBCorruptError as e:
            self._live_gen = _read_current(path)
            self._damage = e if str(e).startswith("知识库") else _damaged(name, str(e))
            return
        self._collect_orphans()
        if manifest is not None:
            self._spec, self._files, self._created_at = manifest.spec, dict(manifest.files), manifest.created_at

    def _verify_live(self) -> Manifest:
        """Check the live generation before anything is built on it: its manifest and, by checksum, every file
        (a format-1 generation is loaded in full: the next commit rewrites it as a segment)."""
        gen_dir = self.path / self._live_gen
        manifest = _read_manifest(gen_dir)
        if manifest.format < 2:
            self._legacy = _load_legacy(gen_dir, manifest)
            self._stored = dict(self._legacy.contents)
            return manifest
        for info in manifest.segments:
            if manifest.dim and info.dim != manifest.dim:
                raise KBCorruptError(f"{gen_dir.name}/{info.files['faiss']} 的向量是 {info.dim} 维，"
                                     f"清单记录的模型是 {manifest.dim} 维")
            try:  # loaded and verified in full (free when this process holds it already): damage is not built on
                self._held.append(SEGMENTS.get(gen_dir, info))
            except SegmentError as e:
                raise KBCorruptError(str(e)) from None
        self._segments = list(manifest.segments)
        self._stored = dict(manifest.contents)
        if manifest.parts:
            self._base_parts = {(p.kind, p.bucket): p for p in manifest.parts}
            self._base_buckets = manifest.part_buckets
            self._base_files, self._base_contents = dict(manifest.files), dict(manifest.contents)
        return manifest

    def _check(self) -> None:
        if self._damage is not None:
            raise self._damage

    # -- reading the pending state -------------------------------------------------------------------------
    @property
    def spec(self) -> IndexSpec | None:
        self._check()
        return self._spec

    @property
    def files(self) -> Mapping[str, FileEntry]:
        self._check()
        return self._files

    def has_content(self, sha256: str) -> bool:
        self._check()
        return sha256 in self._new or sha256 in self._stored

    def chunk_count(self, sha256: str) -> int:
        self._check()
        c = self._new.get(sha256)
        if c is not None:
            return len(c.chunks)
        return self._stored[sha256][2] if sha256 in self._stored else 0

    def live_paths(self, sha256: str) -> list[str]:
        """Live paths holding this content, the current owner (status ok) first."""
        self._check()
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
            self._damage_cleared = self._damage is not None
            self._damage = None  # starting over on purpose: the damaged generations go at this writer's commit
            self._new.clear()
            self._stored.clear()
            self._segments.clear()
            self._legacy = None
            self._files.clear()
            self._base_parts, self._base_buckets, self._base_files, self._base_contents = {}, 0, {}, {}
        else:
            self._check()
            Manifest(0, self._spec, self._files).check_compatible(spec, self.name)
        if spec != self._spec or rebuild:
            self._spec = spec
            self.dirty = True

    def add_content(self, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Store the chunks + vectors of one file content (replacing any earlier ones of that sha)."""
        self._check()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(chunks) or not chunks:
            raise ValueError(f"add_content({sha256[:12]}): {len(chunks)} chunks but vectors of shape {vectors.shape}")
        if self._spec is not None and self._spec.dim and vectors.shape[1] != self._spec.dim:
            raise ValueError(f"add_content: vectors have dim {vectors.shape[1]}, the KB uses {self._spec.dim}")
        self._new[sha256] = _Content(list(chunks), vectors)
        self.dirty = True

    def put(self, entry: FileEntry) -> None:
        """Add or replace a file entry. Live entries (ok/duplicate) need their content added first."""
        self._check()
        if entry.status not in STORED_STATUSES:
            raise ValueError(f"FileEntry.status must be one of {sorted(STORED_STATUSES)}, got {entry.status!r}")
        if entry.status in LIVE_STATUSES and not self.has_content(entry.sha256):
            raise ValueError(f"{entry.path}: status {entry.status} but no chunks stored for sha256 {entry.sha256[:12]}")
        self._files[entry.path] = entry
        self.dirty = True

    def remove(self, path: str) -> FileEntry | None:
        """Forget a path. Its chunks stay while another live path has the same content (dropped at commit)."""
        self._check()
        e = self._files.pop(path, None)
        if e is not None:
            self.dirty = True
        return e

    # -- commit --------------------------------------------------------------------------------------------
    def commit(self, *, force: bool = False) -> str | None:
        """Write the pending state as gen-<n+1>, switch CURRENT to it, collect old generations.

        Only new contents (and the live rows of segments merged now) are written; every other segment is
        hard-linked from the live generation. Returns the new generation's name, or None when nothing changed.
        """
        self._check()
        if not self.dirty and not force:
            return None
        owners = self._owners()
        for sha in [s for s in self._new if s not in owners]:
            del self._new[sha]
        for sha in [s for s in self._stored if s not in owners or s in self._new]:
            del self._stored[sha]
        keep, merge = self._plan()

        n = 1 + max((int(m.group(1)) for p in self.path.iterdir() if (m := _GEN_RE.match(p.name))), default=-1)
        gen = f"gen-{n}"
        tmp = self.path / f"{_TMP_PREFIX}{gen}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        written = 0

        def write_file(path: Path, data: bytes) -> None:
            nonlocal written
            _write_durable(path, data)
            written += len(data)

        live_dir = self.path / self._live_gen if self._live_gen else None
        segments: list[SegmentInfo] = []
        for info in keep:
            if info.tokenizer != seglib.bm25_mod.TOKENIZER_VERSION:  # the tokenizer changed: re-tokenise once
                info, seg = self._segment(info).with_new_postings(tmp, write_file)
                SEGMENTS.put(self.path, tmp.name, seg)
                for role, fname in info.files.items():
                    if role != "bm25":
                        _link(live_dir / fname, tmp / fname)
            else:
                for fname in info.files.values():
                    _link(live_dir / fname, tmp / fname)
            segments.append(info)
        contents = {sha: loc for sha, loc in self._stored.items() if loc[0] in {i.id for i in segments}}
        new_info = self._write_segment(tmp, merge, owners, contents, write_file)
        if new_info is not None:
            segments.append(new_info)

        files = self._normalise(owners, segments, contents)
        buckets = max(_buckets_for(len(files)), self._base_buckets)  # grows with the KB, never flips back and forth
        parts = self._write_parts(tmp, live_dir, files, contents, buckets, write_file)
        now = now_iso()
        manifest = Manifest(n, self._spec, files, created_at=self._created_at or now, updated_at=now,
                            format=MANIFEST_FORMAT, segments=tuple(segments), contents=contents, parts=parts,
                            part_buckets=buckets)
        data = json.dumps(manifest.to_disk_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        write_file(tmp / MANIFEST_FILE, data)
        _fsync_path(tmp)
        os.rename(tmp, self.path / gen)
        _fsync_path(self.path)
        MANIFESTS.put(self.path / gen, manifest)  # the files keep their inodes and times through the rename
        _write_durable(self.path / (CURRENT_FILE + ".tmp"), (gen + "\n").encode("utf-8"))
        os.replace(self.path / (CURRENT_FILE + ".tmp"), self.path / CURRENT_FILE)
        _fsync_path(self.path)

        previous, self._live_gen = self._live_gen, gen
        if self._damage_cleared:  # a rebuild over a damaged KB: nothing of the old generations is worth keeping
            previous = None
        self._collect_garbage(keep={gen, previous})  # keep the previous one for readers still loading it
        self._files, self._segments, self._stored = dict(files), segments, dict(contents)  # manifest's stay as they are
        self._base_parts, self._base_buckets = {(p.kind, p.bucket): p for p in parts}, buckets
        self._base_files, self._base_contents = dict(files), dict(contents)
        self._new.clear()
        self._legacy = None
        self.dirty = False
        self.last_commit_bytes = written
        return gen

    def _owners(self) -> dict[str, str]:
        owners: dict[str, str] = {}
        # The current owner keeps ownership; otherwise the earliest-ingested path (then by name) takes it.
        for e in sorted(self._files.values(), key=lambda e: (e.status != "ok", e.ingested_at, e.path)):
            if e.status in LIVE_STATUSES:
                owners.setdefault(e.sha256, e.path)
        return owners

    def _plan(self) -> tuple[list[SegmentInfo], list[SegmentInfo]]:
        """Which live segments are kept as they are (hard-linked) and which are merged into the new segment."""
        live: dict[str, int] = {}
        for seg_id, _, count in self._stored.values():
            live[seg_id] = live.get(seg_id, 0) + count
        keep = [i for i in self._segments if live.get(i.id)]
        merge = [i for i in keep if live[i.id] < MOSTLY_DEAD * i.rows]
        keep = [i for i in keep if i not in merge]
        if len(keep) + 1 > MAX_SEGMENTS:  # tiered: the smaller half joins the new segment
            by_size = sorted(keep, key=lambda i: live[i.id])
            merge += by_size[: (len(keep) + 1) // 2]
            keep = [i for i in keep if i not in merge]
        return keep, merge

    def _segment(self, info: SegmentInfo) -> Segment:
        if info.id == "legacy" and self._legacy is not None:
            return self._legacy.segments[0]
        return SEGMENTS.get(self.path / self._live_gen, info)

    def _write_segment(self, folder: Path, merge: list[SegmentInfo], owners: Mapping[str, str],
                       contents: dict[str, tuple[str, int, int]], write_file) -> SegmentInfo | None:
        """One new segment: the live contents of the merged segments, then the new contents. Updates `contents`."""
        if self._legacy is not None:
            merge = [self._legacy.segments[0].info, *merge]
        parts_chunks: list[list[Chunk]] = []
        parts_vecs: list[np.ndarray] = []
        parts_post: list[tuple[list[str], Any]] = []
        order: list[str] = []
        for info in merge:
            seg = self._segment(info)
            mine = sorted(((loc[1], loc[2], sha) for sha, loc in self._stored.items() if loc[0] == info.id))
            if not mine:
                continue
            rows = np.concatenate([np.arange(a, a + k) for a, k, _ in mine])
            parts_chunks.append([seg.chunks[int(r)] for r in rows])
            parts_vecs.append(np.vstack([seg.index.reconstruct_n(a, k) for a, k, _ in mine]))
            parts_post.append(seg.postings.select(rows))
            order += [sha for _, _, sha in mine]
        new_chunks: list[Chunk] = []
        new_vecs: list[np.ndarray] = []
        for sha, content in self._new.items():
            idx = np.argsort([c.position for c in content.chunks], kind="stable")
            new_chunks += [content.chunks[i] for i in idx]
            new_vecs.append(content.vectors[idx])
            order.append(sha)
        if new_chunks:
            parts_chunks.append(new_chunks)
            parts_vecs.append(np.vstack(new_vecs))
            parts_post.append(Postings.from_texts([c.embedding_text() for c in new_chunks]).select(
                np.arange(len(new_chunks))))
        if not order:
            return None
        chunks = [c for part in parts_chunks for c in part]
        vectors = np.vstack(parts_vecs)
        chunks = [replace(c, source=owners[c.sha256]) for c in chunks]
        kb_rows = len(chunks) + sum(loc[2] for loc in contents.values())  # the KB after this commit
        info, seg = Segment.write(folder, chunks, vectors, index_kind=self._index_kind(len(chunks), kb_rows),
                                  postings=seglib.merge_postings(parts_post), write_file=write_file)
        SEGMENTS.put(self.path, folder.name, seg)
        start = 0
        for sha in order:
            k = self._new[sha].vectors.shape[0] if sha in self._new else self._stored[sha][2]
            contents[sha] = (info.id, start, k)
            start += k
        return info

    def _write_parts(self, folder: Path, live_dir: Path | None, files: Mapping[str, FileEntry],
                     contents: Mapping[str, tuple[str, int, int]], buckets: int, write_file) -> tuple[PartInfo, ...]:
        """The file table and content map as parts: those holding a changed entry are written, the others are
        hard-linked from the live generation (a one-file commit writes two small parts and manifest.json)."""
        base = self._base_parts if live_dir is not None and buckets == self._base_buckets else {}
        dirty: set[tuple[str, int]] = set()
        if base:
            old = self._base_files
            for p, e in files.items():
                o = old.get(p)
                if o is not e and (o is None or _stored_key(o) != _stored_key(e)):
                    dirty.add(("files", _bucket(p, buckets)))
            dirty.update(("files", _bucket(p, buckets)) for p in old.keys() - files.keys())
            old_c = self._base_contents
            dirty.update(("contents", _bucket(sha, buckets)) for sha, loc in contents.items() if old_c.get(sha) != loc)
            dirty.update(("contents", _bucket(sha, buckets)) for sha in old_c.keys() - contents.keys())
        groups: dict[tuple[str, int], dict[str, Any]] = {}
        for kind, table in (("files", files), ("contents", contents)):
            for key, value in table.items():
                b = (kind, _bucket(key, buckets))
                if not base or b in dirty:
                    groups.setdefault(b, {})[key] = value
        out = [info for b, info in base.items() if b not in dirty]
        for info in out:
            _link(live_dir / info.file, folder / info.file)
        for (kind, bucket), entries in groups.items():
            data = _part_bytes(kind, bucket, buckets, entries)
            digest = hashlib.sha256(data).hexdigest()
            info = PartInfo(kind, bucket, f"manifest.{kind}-{digest[:20]}.json", len(entries), digest)
            write_file(folder / info.file, data)
            out.append(info)
        return tuple(sorted(out, key=lambda i: (i.kind, i.bucket)))

    def _index_kind(self, rows: int, kb_rows: int) -> str:
        """flat or ivf for a new segment of `rows` chunks in a KB of `kb_rows`: store.faiss_index (auto: ivf once the
        KB reaches store.ivf_threshold, so a big KB built by many commits is not left with several big exact
        segments), with ivf never below IVF_MIN_ROWS (a small segment searched exactly costs less than its inverted
        lists, and needs no training)."""
        st = self._settings.store if self._settings is not None else None
        kind = st.faiss_index if st is not None else "auto"
        if kind == "auto":
            kind = "ivf" if st is not None and kb_rows >= st.ivf_threshold else "flat"
        return "ivf" if kind == "ivf" and rows >= IVF_MIN_ROWS else "flat"

    def _normalise(self, owners: Mapping[str, str], segments: list[SegmentInfo],
                   contents: Mapping[str, tuple[str, int, int]]) -> dict[str, FileEntry]:
        """File entries with owners/duplicates decided and chunk ids = global rows (Layout's numbering)."""
        first = _first_rows(segments, contents)
        files: dict[str, FileEntry] = {}
        for path in sorted(self._files):
            e = self._files[path]
            if e.status in LIVE_STATUSES:
                owner = owners[e.sha256]
                k, row = contents[e.sha256][2], first[e.sha256]
                status, dup = ("ok", None) if owner == path else ("duplicate", owner)
                reason = "" if owner == path else e.reason
                ids = e.chunk_ids  # always a range from this store: compared without building the new tuple
                if not (e.status == status and e.duplicate_of == dup and e.reason == reason and len(ids) == k
                        and ids[0] == row and ids[-1] == row + k - 1):
                    e = replace(e, status=status, duplicate_of=dup, chunk_ids=tuple(range(row, row + k)),
                                reason=reason)
            elif e.chunk_ids or e.duplicate_of is not None:
                e = replace(e, chunk_ids=(), duplicate_of=None)
            files[path] = e  # unchanged entries stay the same object (the parts holding them are not rewritten)
        return files

    def _collect_orphans(self) -> None:
        """At lock time: drop temp dirs and generations newer than CURRENT (a writer killed before switching)."""
        live = int(self._live_gen[4:]) if self._live_gen else -1
        for p in self.path.iterdir():
            m = _GEN_RE.match(p.name)
            if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or (m and int(m.group(1)) > live)):
                shutil.rmtree(p, ignore_errors=True)
        (self.path / (CURRENT_FILE + ".tmp")).unlink(missing_ok=True)

    def _collect_garbage(self, keep: set[str | None]) -> None:
        """Remove generations other than `keep` and any temp dirs left by a killed writer (we hold the lock).
        Segment files shared with kept generations survive: they are hard links."""
        for p in self.path.iterdir():
            if p.name in keep:
                continue
            if (p.name.startswith(_TMP_PREFIX) and p.is_dir()) or (_GEN_RE.match(p.name) and p.is_dir()):
                shutil.rmtree(p, ignore_errors=True)
        (self.path / (CURRENT_FILE + ".tmp")).unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """Share an immutable segment file with the new generation (a copy where hard links are not possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        _fsync_path(dst)


def _group_by_sha(chunks: list[Chunk]) -> Iterator[tuple[str, list[Chunk]]]:
    """Consecutive runs of chunks with the same sha256 (a generation stores each content contiguously)."""
    start = 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i].sha256 != chunks[start].sha256:
            yield chunks[start].sha256, chunks[start:i]
            start = i
