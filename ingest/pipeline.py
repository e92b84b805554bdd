"""Keep a knowledge base in step with a folder: scan → diff → parse (worker processes) → split → embed → commit.

Which files are looked at
  Hidden files and folders (name starts with ".") and the knowledge-base folder itself are skipped. A file whose
  extension the loaders support is ingested. Any other file is reported as failed ("unsupported") when it looks
  like a document a person expects to be searchable — a known document extension we cannot read (.ppt, .wps,
  .pages, ...) or text-like bytes (no NUL byte in the first 8 KB, e.g. README, LICENSE) — so nobody wonders
  where it went; binary files of unknown kind (.exe, .zip, .mp4, ...), Office lock files (~$x.docx) and
  Thumbs.db / desktop.ini are listed in `report.ignored` only.

Change detection
  A file whose path, size and mtime (ns) match the manifest is taken as unchanged without reading it, like git
  and rsync do: every normal write updates mtime. The one gap — a write inside the same mtime tick as our hash —
  is closed by re-hashing any file whose mtime is less than RACY_WINDOW_S older than when we hashed it. A tool
  that restores an old mtime after changing a file's bytes to the same size defeats this; `--rebuild` re-reads
  everything. Other files are hashed (sha256, 1 MB blocks) and compared by content:
  new/changed → parsed; same bytes as a live path that is gone → renamed (no re-embedding); same bytes as a live
  path that still exists → duplicate (embedded once); with prune, manifest paths of this folder no longer on
  disk → removed. Files that failed before are retried only when their bytes change, with rebuild, or with
  retry_failed (`ingest.py --retry-failed`: files recorded as failed or empty are parsed again although
  unchanged, e.g. after installing antiword or turning OCR on). ingest_files(force=True), the page's
  「重新导入所选文件」, re-reads, re-parses and re-embeds the given files whatever the manifest says; their
  content's chunks are replaced in place (same sha256), so the KB stays consistent.

Crash safety
  A generation is committed at least every `ingest.commit_every_s` seconds and at the end, so kill -9 loses at
  most the work since the last checkpoint; the next run finds the committed files unchanged and does the rest.
  One bad file never stops the batch: a loader exception is that file's failure, and a worker process that dies
  (segfault in a native parser) is detected (BrokenProcessPool), the culprit is isolated by re-running the
  remaining files one at a time in a fresh pool, and it is reported as failed. A parse that hangs is bounded by
  `ingest.parse_timeout_s` (0 = no limit): workers record in shared memory which file they start and when; an
  overdue one is killed (with anything it spawned), its file fails with a 「文件解析超过 N 秒未完成」 reason, and
  the other unfinished files run again in a fresh pool. Every pool is shut down with its workers joined (killed
  first when the run is aborted), so no worker process outlives a run.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ingest.report import FileResult, IngestReport, ProgressEvent
from retrieval.store import (
    LIVE_STATUSES,
    FileEntry,
    IndexSpec,
    KBError,
    KBWriter,
    KnowledgeBase,
    validate_kb_name,
)
from retrieval.types import Chunk

if TYPE_CHECKING:
    from configs import Settings
    from configs.settings import IngestSettings
    from retrieval.embeddings import Embedder

ProgressCallback = Callable[[ProgressEvent], None]

HASH_BLOCK = 1 << 20
RACY_WINDOW_S = 2.0
# Chunks gathered across files before one encode_passages call: big enough that the embedder's length-sorted
# batches are full, small enough that a checkpoint is never far away.
EMBED_FLUSH_CHUNKS = 512
# Extensions of documents we cannot read: reported as unsupported rather than silently ignored.
DOCUMENT_LIKE_EXTENSIONS = frozenset({
    ".doc", ".ppt", ".pps", ".xls", ".wps", ".et", ".dps", ".pages", ".numbers", ".key", ".chm", ".djvu", ".caj",
    ".kdh", ".nh", ".mobi", ".azw", ".azw3", ".xps", ".oxps", ".tex", ".ofd", ".hwp", ".one", ".msg", ".eml",
    ".vsd", ".vsdx", ".wpd", ".fb2", ".ps", ".tif", ".tiff", ".gif", ".webp", ".heic", ".svg",
})
JUNK_PREFIXES = ("~$", ".~lock.")                      # Office / LibreOffice lock files of open documents
CRASH_REASON = ("解析该文件时解析进程崩溃（可能是文件损坏或解析库的缺陷），已跳过；其余文件不受影响。"
                "可用原程序另存后再导入。")
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})    # Windows folder metadata
RETRY_STATUSES = frozenset({"failed", "empty"})         # what retry_failed (--retry-failed) parses again


class IngestError(KBError):
    """A usage problem (bad folder, bad path list): nothing was ingested. The CLI exits 2."""


@dataclass
class _File:
    """A file seen on disk: its manifest key, location and stat; sha256 once known."""

    key: str
    path: Path
    root: Path
    size: int
    mtime_ns: int
    sha256: str = ""
    hashed_at: float = 0.0
    problem: tuple[str, str] | None = None  # (status, reason) decided before parsing: unsupported / too large


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def ingest(folder: Path | str, kb_name: str, settings: Settings, *, prune: bool = False, rebuild: bool = False,
           retry_failed: bool = False, on_progress: ProgressCallback | None = None, embedder: Embedder | None = None,
           lock_timeout: float | None = 0, show_progress: bool = False) -> IngestReport:
    """Bring KB `kb_name` in step with `folder` (recursively) and return what happened to each file.

    prune: drop KB entries of this folder whose files are gone. rebuild: start the KB over from this folder
    (needed after changing the embedding model or chunk settings). retry_failed: parse again the files recorded
    as failed or empty even when their bytes did not change (after installing antiword, turning OCR on, a fix).
    lock_timeout: 0 fails fast if another writer holds the KB (KBLockedError), a number waits that long, None
    waits forever.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise IngestError(f"文件夹 {root} 不存在或不是文件夹；请给出要导入的文档所在的文件夹。")
    root = root.resolve()
    validate_kb_name(kb_name)
    embedder = embedder or _default_embedder(settings)
    report = IngestReport(kb_name)
    t0 = time.perf_counter()
    files, report.ignored = _scan_folder(root, settings)
    report.phase_seconds["scan"] += time.perf_counter() - t0
    return _run(files, kb_name, settings, embedder, report, prune_roots={root} if prune else set(),
                rebuild=rebuild, retry_failed=retry_failed, on_progress=on_progress, lock_timeout=lock_timeout,
                show_progress=show_progress)


def ingest_files(paths: Iterable[Path | str], kb_name: str, settings: Settings, *, force: bool = False,
                 on_progress: ProgressCallback | None = None, embedder: Embedder | None = None,
                 lock_timeout: float | None = 600, show_progress: bool = False) -> IngestReport:
    """Ingest individual files (web uploads, already copied into kb.sources_dir by the web layer).

    A file inside the KB's sources folder is recorded as `sources/<path inside it>`; any other file as
    `<its folder name>/<file name>`. force: re-read, re-parse and re-embed every given file even when the KB
    already has its bytes (the page's re-ingest: a file that failed for a reason since fixed, or a parser fix).
    Waits up to lock_timeout seconds for a running ingest (the web app queues).
    """
    validate_kb_name(kb_name)
    kb = KnowledgeBase.open_or_create(kb_name, settings)
    sources = kb.sources_dir.resolve()
    # A file the KB already has (e.g. ingested from a folder, "docs/sub/a.txt") keeps its key and root.
    known = {str(fp): (key, Path(e.root)) for key, e in kb.manifest.files.items()
             if e.root and (fp := e.file_path) is not None}
    files: list[_File] = []
    report = IngestReport(kb_name)
    t0 = time.perf_counter()
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise IngestError(f"文件 {p} 不存在或不是普通文件；没有导入任何文件。")
        p = p.resolve()
        key, root = known.get(str(p), (None, sources if p.is_relative_to(sources) else p.parent))
        f = _classify(p, root, settings)
        if f is None:
            report.ignored.append(key or _key(root, p))
        else:
            f.key = key or f.key
            files.append(f)
    report.phase_seconds["scan"] += time.perf_counter() - t0
    embedder = embedder or _default_embedder(settings)
    return _run(files, kb_name, settings, embedder, report, prune_roots=set(), rebuild=False,
                force=force, on_progress=on_progress, lock_timeout=lock_timeout, show_progress=show_progress)


def remove_files(kb_name: str, paths: Iterable[Path | str], settings: Settings, *,
                 lock_timeout: float | None = 600) -> IngestReport:
    """Remove files from the KB by manifest key (e.g. "sources/a.pdf") or by their path on disk.

    Chunks stay while another path holds the same content. Files inside the KB's own sources folder (uploads)
    are deleted from disk too, since nothing else refers to them; files elsewhere are left alone.
    """
    validate_kb_name(kb_name)
    kb = KnowledgeBase.open(kb_name, settings)
    report = IngestReport(kb_name)
    sources = kb.sources_dir.resolve()
    t0 = time.perf_counter()
    with kb.writer(timeout=lock_timeout) as w:
        by_file = {str(e.file_path): k for k, e in w.files.items() if e.file_path is not None}
        for p in paths:
            key = str(p) if str(p) in w.files else by_file.get(str(Path(p).expanduser().resolve()))
            if key is None:
                report.files.append(FileResult(str(p), "failed", reason=f"知识库「{kb_name}」中没有文件 {p}，未删除。"))
                continue
            e = w.remove(key)
            assert e is not None
            report.files.append(FileResult(key, "removed", chunks=w.chunk_count(e.sha256)))
            fp = e.file_path
            if fp is not None and fp.resolve().is_relative_to(sources):
                fp.unlink(missing_ok=True)
        report.generation = w.commit() or kb.generation
    report.phase_seconds["write"] = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------------------------
@functools.cache
def _supported_extensions() -> frozenset[str]:
    from ingest.loaders import SUPPORTED_EXTENSIONS

    return frozenset(e.lower() for e in SUPPORTED_EXTENSIONS)


def _key(root: Path, path: Path) -> str:
    """Manifest key: `<root folder name>/<path inside root>` with POSIX separators."""
    rel = path.relative_to(root).as_posix()
    return f"{root.name}/{rel}" if root.name else path.as_posix()


def _scan_folder(root: Path, settings: Settings) -> tuple[list[_File], list[str]]:
    """Walk `root` (not following directory symlinks); return candidate files and ignored keys, sorted."""
    kb_root = settings.kb_root.resolve()
    files: list[_File] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != kb_root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = _classify(here / name, root, settings)
            if f is None:
                ignored.append(_key(root, here / name))
            else:
                files.append(f)
    return files, ignored


def _classify(path: Path, root: Path, settings: Settings) -> _File | None:
    """Stat a file and decide whether it is a candidate (maybe with a known problem) or ignored (None)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file() or path.name.startswith(JUNK_PREFIXES) or path.name.lower() in JUNK_NAMES:
        return None
    f = _File(_key(root, path), path, root, st.st_size, st.st_mtime_ns)
    ext = path.suffix.lower()
    if ext not in _supported_extensions():
        if ext not in DOCUMENT_LIKE_EXTENSIONS and not _looks_like_text(path):
            return None
        f.problem = ("failed", f"不支持的文件类型（{ext or '无扩展名'}），未导入；如需检索，请另存为 PDF、Word、TXT 或 Markdown 后再导入。")
    elif st.st_size > settings.ingest.max_file_mb * 1024 * 1024:
        f.problem = ("failed", (f"文件大小 {st.st_size / 1048576:.0f} MB 超过上限 {settings.ingest.max_file_mb:g} MB"
                                f"（ingest.max_file_mb），未导入；可调大该设置后重新导入。"))
    return f


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        return False
    return b"\0" not in head


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _trust_stat(f: _File, e: FileEntry | None) -> bool:
    """The manifest's sha256 still describes the file: same root, size and mtime, and not hashed 'racily'."""
    return (
        e is not None and bool(e.sha256) and e.root == str(f.root) and e.size == f.size
        and e.mtime_ns == f.mtime_ns and f.mtime_ns / 1e9 < e.hashed_at - RACY_WINDOW_S
    )


# --------------------------------------------------------------------------------------------------------------
# The run: diff against the manifest, then parse / split / embed / commit
# --------------------------------------------------------------------------------------------------------------
def _default_embedder(settings: Settings) -> Embedder:
    from retrieval.embeddings import Embedder

    return Embedder.from_settings(settings)


def _spec(embedder: Embedder, settings: Settings, stored: IndexSpec | None) -> IndexSpec:
    """The spec this run would write. The model id is a fingerprint of the model folder's files and configs, so
    when it matches the stored one so does the dimension: reuse it instead of loading the model (an unchanged
    rerun then never loads the model at all)."""
    model_id = embedder.model_id
    dim = stored.dim if stored is not None and stored.model_id == model_id and stored.dim else int(embedder.dim)
    return IndexSpec(
        model_id=model_id, dim=dim, passage_prefix=settings.embedding.passage_prefix,
        max_seq_length=settings.embedding.max_seq_length, chunk_size=settings.ingest.chunk_size,
        chunk_overlap=settings.ingest.chunk_overlap,
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry(f: _File, status: str, reason: str = "", ingested_at: str | None = None) -> FileEntry:
    return FileEntry(
        path=f.key, sha256=f.sha256, size=f.size, mtime=f.mtime_ns / 1e9, status=status, reason=reason,
        ingested_at=ingested_at or _now_iso(), mtime_ns=f.mtime_ns, root=str(f.root), hashed_at=f.hashed_at,
    )


def _run(files: list[_File], kb_name: str, settings: Settings, embedder: Embedder, report: IngestReport, *,
         prune_roots: set[Path], rebuild: bool, on_progress: ProgressCallback | None, lock_timeout: float | None,
         show_progress: bool, force: bool = False, retry_failed: bool = False) -> IngestReport:
    with KnowledgeBase.open_writer(kb_name, settings, timeout=lock_timeout) as w:
        t0 = time.perf_counter()  # may load the model (counted as embedding): KBIncompatibleError before any change
        w.set_spec(_spec(embedder, settings, None if rebuild else w.spec), rebuild=rebuild)
        report.phase_seconds["embed"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        to_parse = _diff(files, w, report, prune_roots, force=force, retry_failed=retry_failed)
        report.phase_seconds["scan"] += time.perf_counter() - t0
        _emit(on_progress, ProgressEvent("scan", 0, len(to_parse), message=f"{len(files)} files scanned"))
        if to_parse:
            _Processor(w, settings, embedder, report, on_progress, show_progress).run(to_parse)
        t0 = time.perf_counter()
        report.generation = w.commit() or w.live_generation
        report.phase_seconds["write"] += time.perf_counter() - t0
    report.files.sort(key=lambda r: r.path)
    _emit(on_progress, ProgressEvent("done", len(to_parse), len(to_parse), chunks_done=report.chunks_embedded))
    return report


def _diff(files: list[_File], w: KBWriter, report: IngestReport, prune_roots: set[Path], *, force: bool = False,
          retry_failed: bool = False) -> list[list[_File]]:
    """Settle every file that needs no parsing; return the rest grouped by content (first of a group is parsed).

    force: every file is read and parsed, even when the KB has its bytes. retry_failed: files recorded as failed
    or empty are parsed although their bytes did not change.
    """
    # A key already used by another root (two folders with the same name) falls back to the absolute path.
    for f in files:
        e = w.files.get(f.key)
        if e is not None and e.root and e.root != str(f.root):
            f.key = f.path.as_posix()
    seen = {f.key for f in files}
    groups: dict[str, list[_File]] = {}
    for f in files:
        e = w.files.get(f.key)
        if f.problem is not None:
            if e is None or e.status in LIVE_STATUSES or (e.size, e.mtime_ns) != (f.size, f.mtime_ns) or e.reason != f.problem[1]:
                w.put(_entry(f, *f.problem))
            report.files.append(FileResult(f.key, f.problem[0], reason=f.problem[1]))
            continue
        retry = force or (retry_failed and e is not None and e.status in RETRY_STATUSES)
        if _trust_stat(f, e) and not force:  # forced files are read again whatever their stat says
            f.sha256, f.hashed_at = e.sha256, e.hashed_at
        else:
            try:
                f.hashed_at = time.time()
                f.sha256 = _sha256(f.path)
            except OSError as err:
                reason = f"无法读取文件（{err.strerror or err}）；请检查文件权限后重新导入。"
                w.put(_entry(f, "failed", reason))
                report.files.append(FileResult(f.key, "failed", reason=reason))
                continue
        if e is not None and e.sha256 == f.sha256 and not retry:  # same bytes as recorded for this path
            # Record a new stat; or a fresh hash time when it makes the stat shortcut usable next time
            # (re-recording a hash that is still "racy" would only rewrite the KB for nothing).
            became_trustworthy = f.hashed_at != e.hashed_at and f.mtime_ns / 1e9 < f.hashed_at - RACY_WINDOW_S
            if (e.size, e.mtime_ns, e.root) != (f.size, f.mtime_ns, str(f.root)) or became_trustworthy:
                w.put(replace(e, size=f.size, mtime=f.mtime_ns / 1e9, mtime_ns=f.mtime_ns, root=str(f.root),
                              hashed_at=f.hashed_at))
            status = "unchanged" if e.status in LIVE_STATUSES else e.status
            report.files.append(FileResult(f.key, status, w.chunk_count(e.sha256), e.reason, e.duplicate_of))
            continue
        if w.has_content(f.sha256) and not force:
            gone = [p for p in w.live_paths(f.sha256) if p not in seen and not _exists(w.files[p])]
            if gone:
                old = w.remove(gone[0])
                assert old is not None
                w.put(_entry(f, "ok", ingested_at=old.ingested_at))
                report.files.append(FileResult(f.key, "renamed", w.chunk_count(f.sha256), f"原路径 {old.path}"))
            else:
                owner = w.live_paths(f.sha256)[0]
                w.put(_entry(f, "duplicate"))
                report.files.append(FileResult(f.key, "duplicate", w.chunk_count(f.sha256), duplicate_of=owner))
            continue
        groups.setdefault(f.sha256, []).append(f)
    for root in prune_roots:
        for key, e in list(w.files.items()):
            if e.root == str(root) and key not in seen:
                w.remove(key)
                report.files.append(FileResult(key, "removed", 0))
    return list(groups.values())


def _exists(e: FileEntry) -> bool:
    p = e.file_path
    return p is not None and p.exists()


def _emit(cb: ProgressCallback | None, event: ProgressEvent) -> None:
    if cb is not None:
        cb(event)


class _Processor:
    """Parses groups of identical files in worker processes, splits, embeds across files and checkpoints."""

    def __init__(self, w: KBWriter, settings: Settings, embedder: Embedder, report: IngestReport,
                 on_progress: ProgressCallback | None, show_progress: bool) -> None:
        self.w, self.settings, self.embedder, self.report, self.on_progress = w, settings, embedder, report, on_progress
        self.pending: list[tuple[list[_File], list[Chunk]]] = []
        self.pending_chunks = 0
        self.last_commit = time.monotonic()
        self.done = 0
        self.total = 0
        self.bar: Any = None
        self.show_progress = show_progress

    def run(self, groups: list[list[_File]]) -> None:
        self.total = len(groups)
        self.bar = tqdm(total=self.total, unit="file", desc="ingest", file=sys.stderr, disable=not self.show_progress,
                        dynamic_ncols=True)
        try:
            for group, outcome in _parse_all(groups, self.settings, self.report):
                self._on_parsed(group, outcome)
            self._flush()
        finally:
            self.bar.close()

    def _on_parsed(self, group: list[_File], outcome: tuple) -> None:
        first = group[0]
        self.report.bytes_parsed += first.size
        if outcome[0] == "error":
            _, kind, reason = outcome
            self._settle(group, "empty" if kind in ("empty", "no_text") else "failed", reason)
        else:
            t0 = time.perf_counter()
            try:
                chunks = self._split(first, outcome[1])
            except Exception as e:  # noqa: BLE001 — a splitter bug on one file must not stop the batch
                chunks = None
                self._settle(group, "failed", f"切分文本时出错（{type(e).__name__}: {e}）；请把该文件报告给维护者。")
            self.report.phase_seconds["split"] += time.perf_counter() - t0
            if chunks == []:
                self._settle(group, "empty", "文件中没有可用的文字（解析结果为空）。")
            elif chunks:
                self.pending.append((group, chunks))
                self.pending_chunks += len(chunks)
        self.done += 1
        self.bar.update(1)
        _emit(self.on_progress, ProgressEvent("parse", self.done, self.total, current=first.key,
                                              chunks_done=self.report.chunks_embedded))
        if self.pending_chunks >= EMBED_FLUSH_CHUNKS or self._commit_due():
            self._flush()

    def _split(self, f: _File, docs: list) -> list[Chunk]:
        from ingest.splitter import split_documents

        s = self.settings.ingest
        return split_documents(docs, source=f.key, sha256=f.sha256, chunk_size=s.chunk_size,
                               chunk_overlap=s.chunk_overlap, count_tokens=self.embedder.count_tokens,
                               max_tokens=self.embedder.max_tokens)

    def _settle(self, group: list[_File], status: str, reason: str) -> None:
        for f in group:
            self.w.put(_entry(f, status, reason))
            self.report.files.append(FileResult(f.key, status, reason=reason))

    def _commit_due(self) -> bool:
        return time.monotonic() - self.last_commit >= self.settings.ingest.commit_every_s

    def _flush(self) -> None:
        """Embed every pending chunk in one call (the embedder sorts by length and batches), store, maybe commit."""
        if self.pending:
            chunks = [c for _, cs in self.pending for c in cs]
            t0 = time.perf_counter()
            self.bar.set_postfix_str(f"embedding {len(chunks)} chunks")
            vectors = np.asarray(self.embedder.encode_passages([c.embedding_text() for c in chunks]), dtype=np.float32)
            self.report.phase_seconds["embed"] += time.perf_counter() - t0
            self.report.chunks_embedded += len(chunks)
            _emit(self.on_progress, ProgressEvent("embed", self.done, self.total, chunks_done=self.report.chunks_embedded))
            start = 0
            for group, cs in self.pending:
                # A forced re-ingest of known content leaves it with its current owner (manifest and report agree).
                live = self.w.live_paths(group[0].sha256)
                owner = live[0] if live else group[0].key
                self.w.add_content(group[0].sha256, cs, vectors[start:start + len(cs)])
                start += len(cs)
                for f in group:
                    status = "ok" if f.key == owner else "duplicate"
                    self.w.put(_entry(f, status))
                    self.report.files.append(FileResult(f.key, status, len(cs),
                                                        duplicate_of=None if status == "ok" else owner))
            self.pending, self.pending_chunks = [], 0
            self.bar.set_postfix_str("")
        if self._commit_due():
            t0 = time.perf_counter()
            self.w.commit()
            self.report.phase_seconds["write"] += time.perf_counter() - t0
            self.last_commit = time.monotonic()
            _emit(self.on_progress, ProgressEvent("write", self.done, self.total, chunks_done=self.report.chunks_embedded))


# --------------------------------------------------------------------------------------------------------------
# Parsing in worker processes
# --------------------------------------------------------------------------------------------------------------
# In a worker: where it records which task it starts, and when (shared memory set up by _WorkerPool).
_TASK_PIDS: Any = None
_TASK_STARTS: Any = None


def _init_worker(members: Any = None, task_pids: Any = None, task_starts: Any = None) -> None:
    """Runs once in each new worker: import the parsers, and register (pid, parent pid) so the pool can kill it."""
    global _TASK_PIDS, _TASK_STARTS
    import ingest.loaders  # noqa: F401  (import the parsers once per worker, not once per file)

    _TASK_PIDS, _TASK_STARTS = task_pids, task_starts
    if members is not None:
        with members.get_lock():
            for k in range(0, len(members), 2):
                if members[k] == 0:
                    members[k], members[k + 1] = os.getpid(), os.getppid()
                    break


def _run_task(parse: Callable[[str, IngestSettings], tuple], i: int, path: str, ingest_settings: IngestSettings) -> tuple:
    """Runs in a worker: note that task i starts here and now (for the parse timeout), then parse."""
    if _TASK_PIDS is not None:
        _TASK_PIDS[i] = os.getpid()
        _TASK_STARTS[i] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    return parse(path, ingest_settings)


def _parse_in_worker(path: str, ingest_settings: IngestSettings) -> tuple:
    """Runs in a worker: ("ok", documents) or ("error", kind, reason). Never raises for a bad file."""
    from ingest.loaders import LoadError, load_file

    try:
        return ("ok", load_file(Path(path), ingest_settings))
    except LoadError as e:
        return ("error", e.kind, e.reason)
    except MemoryError:
        return ("error", "too_large", "解析该文件时内存不足；可把文件拆小后重新导入。")
    except Exception as e:  # noqa: BLE001 — a parser bug on one file is that file's failure
        return ("error", "corrupt", f"解析该文件时出错（{type(e).__name__}: {e}）；文件可能已损坏，可用原程序另存后再导入。")


def _worker_count(settings: Settings, n_files: int) -> int:
    n = settings.ingest.workers or os.cpu_count() or 1
    return max(1, min(n, n_files))


def timeout_reason(seconds: float) -> str:
    return (f"文件解析超过 {seconds:g} 秒未完成（解析程序可能卡住了，或文件过大、过于复杂），已终止该解析进程并跳过这个文件；"
            "其余文件不受影响。请检查文件能否用原程序正常打开；如果它只是很大，可调大 ingest.parse_timeout_s 后重新导入。")


class _WorkerPool:
    """A ProcessPoolExecutor whose workers say which task they start and when, so that an overdue one can be
    killed. Killing any worker breaks the executor (every unfinished future gets BrokenProcessPool, never hangs),
    which is what the caller wants: it then knows the culprit and resubmits the rest to a fresh pool.

    Shared memory, fresh for each pool: `members` (pid, parent pid) per worker; per task index, the pid that
    started it and the monotonic time it started (0 = not started).
    """

    def __init__(self, workers: int, n_tasks: int) -> None:
        # forkserver: workers fork from a small clean server process, not from this one (which may hold a loaded
        # torch model and its threads, which fork() does not copy safely).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["ingest.loaders"])
        self.members = ctx.Array("i", 2 * workers)
        self.task_pids = ctx.RawArray("i", n_tasks)
        self.task_starts = ctx.RawArray("d", n_tasks)
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.members, self.task_pids, self.task_starts))

    def submit(self, parse: Callable[[str, IngestSettings], tuple], i: int, path: str,
               ingest_settings: IngestSettings) -> Future:
        return self.executor.submit(_run_task, parse, i, path, ingest_settings)

    def started_at(self, i: int) -> float:
        return self.task_starts[i]

    def kill_task(self, i: int) -> None:
        """Kill the worker that started task i (and whatever it spawned)."""
        self._kill(self.task_pids[i])

    def kill_all(self) -> None:
        for k in range(0, len(self.members), 2):
            self._kill(self.members[k])

    def _kill(self, pid: int) -> None:
        import psutil

        parents = {self.members[k + 1] for k in range(0, len(self.members), 2) if self.members[k] == pid}
        if pid <= 0 or not parents:  # not one of this pool's workers (or not registered yet)
            return
        try:
            proc = psutil.Process(pid)
            if proc.ppid() not in parents:  # that worker is gone and its pid was reused: leave it alone
                return
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def shutdown(self, *, clean: bool) -> None:
        """On success let the workers exit; otherwise kill them first, so that nothing (a hung parse included)
        outlives the pool. Either way returns once every worker has exited."""
        if not clean:
            self.kill_all()
        self.executor.shutdown(wait=True, cancel_futures=True)


def _parse_all(groups: Sequence[list[_File]], settings: Settings, report: IngestReport,
               parse: Callable[[str, IngestSettings], tuple] | None = None):
    """Yield (group, outcome) as parses finish; the time spent waiting on workers is the parse phase.

    A parse running longer than `ingest.parse_timeout_s` (0 = no limit) has its worker killed and its file fails
    with timeout_reason(); the pool that broke by it is replaced and the unfinished files run again.
    After a worker dies by itself the remaining files run one at a time until the culprit (the file the lone
    worker was on) is found and failed; then parallel parsing resumes.
    """
    parse = parse or _parse_in_worker  # looked up at call time, so a test can substitute the module's function
    limit = settings.ingest.parse_timeout_s
    remaining = list(range(len(groups)))  # indices into groups, in submission order
    serial = False
    while remaining:
        workers = 1 if serial else _worker_count(settings, len(remaining))
        pool = _WorkerPool(workers, len(groups))
        clean_exit = False
        queue = list(remaining)
        queue.reverse()  # pop() from the end = submit in order
        running: dict[Future, int] = {}
        timed_out: list[int] = []
        try:
            while queue or running:
                # Bounded submission keeps memory flat: parsed documents wait in at most 2×workers results.
                while queue and len(running) < 2 * workers:
                    i = queue.pop()
                    running[pool.submit(parse, i, str(groups[i][0].path), settings.ingest)] = i
                t0 = time.perf_counter()
                finished, _ = wait(running, timeout=_next_check(pool, running, limit, timed_out),
                                   return_when=FIRST_COMPLETED)
                report.phase_seconds["parse"] += time.perf_counter() - t0
                if limit:
                    now = time.monotonic()
                    for fut, i in running.items():
                        started = pool.started_at(i)
                        if not fut.done() and started and now - started > limit:
                            if i not in timed_out:
                                timed_out.append(i)
                            pool.kill_task(i)  # the executor breaks (handled below); harmless if already dead
                for fut in sorted(finished, key=running.__getitem__):
                    outcome = fut.result()  # raises BrokenProcessPool if a worker died
                    i = running.pop(fut)
                    remaining.remove(i)
                    yield groups[i], outcome
            clean_exit = True
        except BrokenProcessPool:
            if timed_out:  # we broke the pool: fail the overdue files, run the others again
                for i in timed_out:
                    if i in remaining:
                        remaining.remove(i)
                        yield groups[i], ("error", "timeout", timeout_reason(limit))
            elif serial:  # one worker, first-in first-out: the lowest index not yet finished was on it
                culprit = min(i for i in running.values() if i in remaining)
                remaining.remove(culprit)
                yield groups[culprit], ("error", "corrupt", CRASH_REASON)
                serial = False
            else:
                serial = True
        finally:
            pool.shutdown(clean=clean_exit)


def _next_check(pool: _WorkerPool, running: dict[Future, int], limit: float, timed_out: list[int]) -> float | None:
    """How long to wait for a result before looking for overdue parses again (None: no limit, just wait)."""
    if not limit:
        return None
    now = time.monotonic()
    deadlines = [s + limit - now for i in running.values() if i not in timed_out and (s := pool.started_at(i))]
    return max(0.01, min([1.0, *deadlines]))
