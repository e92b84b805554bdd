"""Change detection: compare the scanned files with the manifest, settle every file that needs no parsing and
return the rest grouped by content.

A file whose path, size and mtime (ns) match the manifest is taken as unchanged without reading it, like git
and rsync do: every normal write updates mtime. The one gap — a write inside the same mtime tick as our hash —
is closed by re-hashing any file whose mtime is less than RACY_WINDOW_S older than when we hashed it. A tool
that restores an old mtime after changing a file's bytes to the same size defeats this; `--rebuild` re-reads
everything. Other files are hashed (sha256, 1 MB blocks) and compared by content. One small method per outcome:

  known problem (unsupported / too large)  → recorded as failed, never parsed
  unreadable (hashing fails)               → failed
  same bytes as recorded for this path     → unchanged (a new stat is recorded when it changed)
  same bytes as a live path that is gone   → renamed (no re-embedding)
  same bytes as a live path still on disk  → duplicate (embedded once)
  anything else                            → to parse, grouped by sha256 (the first of a group is parsed)
  with prune, manifest paths of this folder no longer on disk → removed

Files that failed before are retried only when their bytes change, with rebuild, or with retry_failed
(`ingest.py --retry-failed`: files recorded as failed or empty are parsed again although unchanged, e.g. after
installing antiword or turning OCR on). force (ingest_files(force=True), the page's 「重新导入所选文件」) re-reads
and re-parses the given files whatever the manifest says.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.files import now_iso, sha256_file
from ingest.report import FileResult, IngestReport
from ingest.scan import SourceFile
from retrieval.store import LIVE_STATUSES, FileEntry, KBWriter

RACY_WINDOW_S = 2.0
RETRY_STATUSES = frozenset({"failed", "empty"})         # what retry_failed (--retry-failed) parses again


def plan(files: list[SourceFile], w: KBWriter, report: IngestReport, prune_roots: set[Path], *, force: bool = False,
         retry_failed: bool = False) -> list[list[SourceFile]]:
    """Settle every file that needs no parsing (in `w` and `report`); return the rest grouped by content."""
    _disambiguate_keys(files, w)
    d = _Diff(w, report, {f.key for f in files}, force=force, retry_failed=retry_failed)
    for f in files:
        d.settle(f)
    for root in prune_roots:
        d.prune(root)
    return list(d.groups.values())


def entry(f: SourceFile, status: str, reason: str = "", ingested_at: str | None = None) -> FileEntry:
    """The manifest entry recording `f` with `status`."""
    return FileEntry(
        path=f.key, sha256=f.sha256, size=f.size, mtime=f.mtime_ns / 1e9, status=status, reason=reason,
        ingested_at=ingested_at or now_iso(), mtime_ns=f.mtime_ns, root=str(f.root), hashed_at=f.hashed_at,
    )


def _disambiguate_keys(files: list[SourceFile], w: KBWriter) -> None:
    """A key already used by another root (two folders with the same name) falls back to the absolute path."""
    for f in files:
        e = w.files.get(f.key)
        if e is not None and e.root and e.root != str(f.root):
            f.key = f.path.as_posix()


def trust_stat(f: SourceFile, e: FileEntry | None) -> bool:
    """The manifest's sha256 still describes the file: same root, size and mtime, and not hashed 'racily'."""
    return (
        e is not None and bool(e.sha256) and e.root == str(f.root) and e.size == f.size
        and e.mtime_ns == f.mtime_ns and f.mtime_ns / 1e9 < e.hashed_at - RACY_WINDOW_S
    )


@dataclass
class _Diff:
    w: KBWriter
    report: IngestReport
    seen: set[str]                   # the keys of this run's files (a path among them is not "gone")
    force: bool = False
    retry_failed: bool = False
    groups: dict[str, list[SourceFile]] = field(default_factory=dict)

    def settle(self, f: SourceFile) -> None:
        e = self.w.files.get(f.key)
        if f.problem is not None:
            self._known_problem(f, e)
        elif not self._hash(f, e):
            pass  # unreadable: settled as failed by _hash
        elif e is not None and e.sha256 == f.sha256 and not self._retry(e):
            self._unchanged(f, e)
        elif self.w.has_content(f.sha256) and not self.force:
            self._renamed_or_duplicate(f)
        else:
            self.groups.setdefault(f.sha256, []).append(f)

    def _record(self, f: SourceFile, status: str, reason: str) -> None:
        self.w.put(entry(f, status, reason))
        self.report.files.append(FileResult(f.key, status, reason=reason))

    def _known_problem(self, f: SourceFile, e: FileEntry | None) -> None:
        """Unsupported or too large: (re)recorded only when something about it changed."""
        status, reason = f.problem or ("failed", "")
        if e is None or e.status in LIVE_STATUSES or (e.size, e.mtime_ns) != (f.size, f.mtime_ns) or e.reason != reason:
            self.w.put(entry(f, status, reason))
        self.report.files.append(FileResult(f.key, status, reason=reason))

    def _hash(self, f: SourceFile, e: FileEntry | None) -> bool:
        """Give `f` its sha256 (from the manifest when its stat is trusted); False when the file cannot be read."""
        if trust_stat(f, e) and not self.force:  # forced files are read again whatever their stat says
            assert e is not None
            f.sha256, f.hashed_at = e.sha256, e.hashed_at
            return True
        try:
            f.hashed_at = time.time()
            f.sha256 = sha256_file(f.path)
        except OSError as err:
            self._record(f, "failed", f"无法读取文件（{err.strerror or err}）；请检查文件权限后重新导入。")
            return False
        return True

    def _retry(self, e: FileEntry) -> bool:
        return self.force or (self.retry_failed and e.status in RETRY_STATUSES)

    def _unchanged(self, f: SourceFile, e: FileEntry) -> None:
        """Same bytes as recorded for this path. Record a new stat; or a fresh hash time when it makes the stat
        shortcut usable next time (re-recording a hash that is still "racy" would only rewrite the KB for nothing)."""
        became_trustworthy = f.hashed_at != e.hashed_at and f.mtime_ns / 1e9 < f.hashed_at - RACY_WINDOW_S
        if (e.size, e.mtime_ns, e.root) != (f.size, f.mtime_ns, str(f.root)) or became_trustworthy:
            self.w.put(replace(e, size=f.size, mtime=f.mtime_ns / 1e9, mtime_ns=f.mtime_ns, root=str(f.root),
                               hashed_at=f.hashed_at))
        status = "unchanged" if e.status in LIVE_STATUSES else e.status
        self.report.files.append(FileResult(f.key, status, self.w.chunk_count(e.sha256), e.reason, e.duplicate_of))

    def _renamed_or_duplicate(self, f: SourceFile) -> None:
        """The KB has these bytes under another path: take that path over if it is gone, else share its chunks."""
        gone = [p for p in self.w.live_paths(f.sha256) if p not in self.seen and not _exists(self.w.files[p])]
        if gone:
            old = self.w.remove(gone[0])
            assert old is not None
            self.w.put(entry(f, "ok", ingested_at=old.ingested_at))
            self.report.files.append(FileResult(f.key, "renamed", self.w.chunk_count(f.sha256), f"原路径 {old.path}"))
        else:
            owner = self.w.live_paths(f.sha256)[0]
            self.w.put(entry(f, "duplicate"))
            self.report.files.append(FileResult(f.key, "duplicate", self.w.chunk_count(f.sha256), duplicate_of=owner))

    def prune(self, root: Path) -> None:
        """Drop the manifest paths of `root` that this run did not see on disk."""
        for key, e in list(self.w.files.items()):
            if e.root == str(root) and key not in self.seen:
                self.w.remove(key)
                self.report.files.append(FileResult(key, "removed", 0))


def _exists(e: FileEntry) -> bool:
    p = e.file_path
    return p is not None and p.exists()
