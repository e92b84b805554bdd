"""Background ingestion jobs for the page and the API: upload, re-ingest, rebuild, remove.

One worker thread runs the jobs one after another: ingestion already uses every core and the knowledge base's
writer lock would serialise writers anyway, while chat keeps answering from the last committed generation.
Each job has an id; the page polls `JobManager.get(id)` for live progress and per-file results.

Nothing is lost when the app is killed: every job is recorded in `<kb_root>/.jobs/<id>.json` (written when it is
queued, starts, ends or gets its results), so `get(id)` still answers after a restart; a job the restart found
unfinished is marked failed with the reason. `resume_pending()` (called at start) finds files in a knowledge base's
sources/ that its manifest does not hold — uploads stored before the kill but never indexed — and ingests them in
a "resume" job; the interrupted job names it (`resumed_by`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from configs import Settings

from .uploads import Rejected, UploadLimits, store_uploads

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed"]


@dataclass(frozen=True)
class FileRow:
    """One row of a job's result table (built from ingest.report.FileResult, or a file refused before ingest)."""

    name: str
    status: str          # ok | unchanged | renamed | duplicate | empty | failed | removed | rejected
    chunks: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Job:
    """A snapshot of a job; the manager keeps the live copy and hands out snapshots."""

    id: str
    kind: str            # upload | reingest | rebuild | remove | resume (files stored before a restart)
    kb_name: str
    state: JobState = "queued"
    message: str = "排队中…"
    done: int = 0
    total: int = 0
    files: tuple[FileRow, ...] = ()
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    resumed_by: str = ""  # an interrupted job: the id of the job that ingests its stored files after the restart

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


class JobError(Exception):
    """A job could not run; the message is a sentence for the page."""


JOBS_DIR = ".jobs"   # under kb_root; KB names cannot start with a dot, so it is never taken for a knowledge base
PHASES = {"scan": "扫描", "parse": "解析", "embed": "计算向量", "write": "写入索引", "done": "完成"}


def _event_text(event: Any) -> tuple[str, int | None, int | None]:
    """(message, done, total) from an ingest.report.ProgressEvent (phase, files_done, files_total, current, ...)."""
    phase = getattr(event, "phase", "")
    current = getattr(event, "current", None)
    done, total = getattr(event, "files_done", None), getattr(event, "files_total", None)
    message = getattr(event, "message", "") or " ".join(
        p for p in (PHASES.get(phase, phase), Path(current).name if current else "") if p)
    if phase == "embed" and getattr(event, "chunks_done", 0):
        message += f"（已计算 {event.chunks_done} 段）"
    return message or "处理中…", done if isinstance(done, int) else None, total if isinstance(total, int) else None


def report_rows(report: Any) -> list[FileRow]:
    """The rows of an ingest IngestReport, one per file (named by its manifest key)."""
    rows = []
    for f in getattr(report, "files", []) or []:
        path = str(getattr(f, "path", ""))
        reason = getattr(f, "reason", "") or ""
        dup = getattr(f, "duplicate_of", None)
        if dup and not reason:
            reason = f"与「{Path(str(dup)).name}」内容相同"
        rows.append(FileRow(path, str(getattr(f, "status", "")),
                               int(getattr(f, "chunks", 0) or 0), reason))
    return rows


class JobManager:
    """Runs ingestion work in one background thread and keeps the last `keep` jobs for the page to show."""

    def __init__(self, settings: Settings, keep: int = 50, embedder: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        # One embedding model for every job (and shared with the QA service when the context passes it):
        # ingest would otherwise load a fresh copy of the model for each upload.
        self._embedder = embedder
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep = keep
        self._records = settings.kb_root / JOBS_DIR
        self._interrupted: list[Job] = []
        self._load_records()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhiwen-ingest")

    # --- public: what the handlers call ----------------------------------------------------------
    def upload(self, kb_name: str, files: Iterable[tuple[Path, str]], cleanup: Iterable[Path] | Path | None = None,
               ) -> Job:
        """Store uploaded (temp path, original name) pairs in the KB's sources/ and ingest them, in the background.

        `cleanup`: temporary folders or files to delete once the files are stored (the API's temporary folder, the
        page's Gradio upload folders)."""
        files = [(Path(p), n) for p, n in files]
        if not files:
            raise JobError("没有选择文件：请先选择要上传的文件或 zip 压缩包。")
        return self._submit("upload", kb_name, lambda job_id: self._run_upload(job_id, kb_name, files, cleanup))

    def reingest(self, kb_name: str, paths: list[str]) -> Job:
        """Parse and embed these manifest paths again, changed or not (e.g. after the cause of a failure was fixed)."""
        if not paths:
            raise JobError("没有选择文件：请在文件表中先选择要重新导入的文件。")
        return self._submit("reingest", kb_name, lambda job_id: self._run_reingest(job_id, kb_name, paths))

    def rebuild(self, kb_name: str) -> Job:
        """Re-parse and re-embed every file of the knowledge base into a fresh generation."""
        return self._submit("rebuild", kb_name, lambda job_id: self._run_rebuild(job_id, kb_name))

    def remove(self, kb_name: str, paths: list[str]) -> Job:
        """Delete files from the knowledge base: their chunks are never retrieved again."""
        if not paths:
            raise JobError("没有选择文件：请在文件表中先选择要删除的文件。")
        return self._submit("remove", kb_name, lambda job_id: self._run_remove(job_id, kb_name, paths))

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise JobError(f"任务 {job_id} 不存在（只保留最近 {self._keep} 个任务）。")
            return self._jobs[job_id]

    def pending_files(self, kb_name: str) -> list[Path]:
        """Files in the KB's sources/ that its manifest does not hold: stored uploads that were never indexed.
        Reads the manifest only (every KB is looked at when the app starts; none needs its index loaded)."""
        from retrieval.store import SOURCES_DIR, kb_dir, read_manifest

        _, manifest = read_manifest(kb_name, self.settings)
        known = {fp.resolve() for e in manifest.files.values() if (fp := e.file_path) is not None}
        sources = kb_dir(kb_name, self.settings) / SOURCES_DIR
        if not sources.is_dir():
            return []
        return sorted(p for p in sources.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(sources).parts)
                      and p.resolve() not in known)

    def resume_pending(self) -> list[Job]:
        """At start: ingest, per knowledge base, the files stored in sources/ but missing from the manifest (an
        upload job killed with the app), and point the jobs the restart interrupted at the job doing it."""
        from retrieval.store import list_knowledge_bases

        started: dict[str, Job] = {}
        for kb_name in list_knowledge_bases(self.settings):
            try:
                pending = self.pending_files(kb_name)
            except Exception:  # a damaged KB is reported where it is opened; it must not stop the app starting
                log.exception("cannot look for pending files of knowledge base %s", kb_name)
                continue
            if pending:
                log.info("knowledge base %s: %d stored files were never indexed; ingesting them", kb_name,
                         len(pending))
                started[kb_name] = self._submit("resume", kb_name, lambda job_id, k=kb_name, f=pending:
                                                self._run_ingest_files(job_id, k, f))
        for job in self._interrupted:
            if job.kb_name in started:
                self._update(job.id, resumed_by=started[job.kb_name].id,
                             error=job.error + f"已保存但未导入的文件由任务 {started[job.kb_name].id} 继续导入。")
        self._interrupted = []
        return list(started.values())

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job finishes (tests, the start script); returns its final snapshot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := self.get(job_id)).active:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(0.1)
        return job

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- machinery -------------------------------------------------------------------------------
    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._jobs[job_id] = replace(self._jobs[job_id], **changes)
        if set(changes) - {"message", "done", "total"}:  # progress ticks stay in memory; the rest is recorded
            self._save(job)

    def _save(self, job: Job) -> None:
        """Write the job's record atomically (a kill mid-write leaves the previous record)."""
        try:
            self._records.mkdir(parents=True, exist_ok=True)
            tmp = self._records / f".{job.id}.{threading.get_ident()}.tmp"
            tmp.write_text(json.dumps(asdict(job), ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self._records / f"{job.id}.json")
        except OSError:
            log.exception("cannot record job %s in %s", job.id, self._records)

    def _load_records(self) -> None:
        """The recorded jobs, newest `keep`; one the app stopped during is marked failed with the reason."""
        if not self._records.is_dir():
            return
        jobs = []
        names = {f.name for f in fields(Job)}
        for path in self._records.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                data["files"] = tuple(FileRow(**row) for row in data.get("files", []))
                jobs.append(Job(**{k: v for k, v in data.items() if k in names}))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring an unreadable job record %s", path)
        jobs.sort(key=lambda j: j.created, reverse=True)
        for old in jobs[self._keep:]:
            (self._records / f"{old.id}.json").unlink(missing_ok=True)
        for job in jobs[: self._keep]:
            if job.active:
                job = replace(job, state="failed", message="任务中断", finished=time.time(),
                              error="任务中断：服务在任务进行中停止了（进程被结束或重启）。")
                self._save(job)
                self._interrupted.append(job)
            self._jobs[job.id] = job

    def _submit(self, kind: str, kb_name: str, work: Callable[[str], None]) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, kb_name=kb_name)
        with self._lock:
            self._jobs[job.id] = job
            # forget the oldest finished jobs so a long-running server does not grow without bound
            finished = sorted((j for j in self._jobs.values() if not j.active), key=lambda j: j.created)
            forgotten = finished[: max(0, len(self._jobs) - self._keep)]
            for old in forgotten:
                del self._jobs[old.id]
        for old in forgotten:
            (self._records / f"{old.id}.json").unlink(missing_ok=True)
        self._save(job)
        self._pool.submit(self._run, job.id, work)
        return job

    def _run(self, job_id: str, work: Callable[[str], None]) -> None:
        self._update(job_id, state="running", message="开始处理…")
        try:
            work(job_id)
        except Exception as e:  # any failure becomes a sentence on the page; the traceback goes to the log
            log.exception("ingestion job %s failed", job_id)
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            self._update(job_id, state="failed", error=f"任务失败：{reason}", message="任务失败", finished=time.time())
        else:
            self._update(job_id, state="done", finished=time.time())

    def _progress(self, job_id: str) -> Callable[[Any], None]:
        def on_progress(event: Any) -> None:
            message, done, total = _event_text(event)
            changes: dict[str, Any] = {"message": message}
            if done is not None:
                changes["done"] = done
            if total is not None:
                changes["total"] = total
            self._update(job_id, **changes)
        return on_progress

    def _get_embedder(self) -> Any:
        if self._embedder is not None:
            return self._embedder()
        from retrieval.embeddings import Embedder

        own = Embedder.from_settings(self.settings)
        self._embedder = lambda: own
        return own

    def _limits(self) -> UploadLimits:
        from ingest.loaders import (
            SUPPORTED_EXTENSIONS,  # the loaders decide what can be read
        )

        a = self.settings.app
        mb = 2**20
        return UploadLimits(
            allowed_extensions=frozenset(e.lower() for e in SUPPORTED_EXTENSIONS),
            max_file_bytes=int(min(a.max_upload_mb, self.settings.ingest.max_file_mb) * mb),
            max_unzipped_bytes=int(a.max_unzipped_mb * mb),
            max_zip_entries=a.max_zip_entries,
            max_zip_ratio=a.max_zip_ratio,
        )

    def _finish(self, job_id: str, report: Any, rejected: Sequence[Rejected] = ()) -> None:
        rows = report_rows(report) + [FileRow(r.name, "rejected", 0, r.reason) for r in rejected]
        bad = sum(r.status in ("failed", "rejected") for r in rows)
        summary = f"完成：{len(rows)} 个文件" + (f"，其中 {bad} 个未能导入（原因见下表）" if bad else "")
        self._update(job_id, files=tuple(rows), message=summary, done=len(rows), total=len(rows))

    def _run_upload(self, job_id: str, kb_name: str, files: list[tuple[Path, str]],
                    cleanup: Iterable[Path] | Path | None) -> None:
        from retrieval.store import SOURCES_DIR, kb_dir, read_manifest

        self._update(job_id, message=f"保存 {len(files)} 个上传文件…")
        try:
            read_manifest(kb_name, self.settings)  # the KB exists and is readable (its index is not needed here)
            sources = kb_dir(kb_name, self.settings) / SOURCES_DIR
            stored = store_uploads(files, sources, self._limits())
        finally:
            for path in [cleanup] if isinstance(cleanup, Path) else cleanup or []:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self._run_ingest_files(job_id, kb_name, stored.saved, stored.rejected)

    def _run_ingest_files(self, job_id: str, kb_name: str, paths: list[Path], rejected: Sequence[Rejected] = (), *,
                          force: bool = False) -> None:
        from ingest import ingest_files

        if not paths:
            self._finish(job_id, None, rejected)
            return
        self._update(job_id, message=f"导入 {len(paths)} 个文件…", total=len(paths))
        report = ingest_files(paths, kb_name, self.settings, force=force, on_progress=self._progress(job_id),
                              embedder=self._get_embedder())
        self._finish(job_id, report, rejected)

    def _run_reingest(self, job_id: str, kb_name: str, keys: list[str]) -> None:
        """Read these manifest entries' files again and re-parse + re-embed them even when unchanged (force): a
        file that failed for a reason since removed (OCR turned on, antiword installed) gets another chance."""
        from retrieval.store import read_manifest

        files = read_manifest(kb_name, self.settings)[1].files
        paths, missing = [], []
        for key in keys:
            fp = files[key].file_path if key in files else None
            if fp is not None and fp.is_file():
                paths.append(fp)
            else:
                missing.append(Rejected(key, "找不到这个文件的原始文件（已被移动或删除），请重新上传。"))
        self._run_ingest_files(job_id, kb_name, paths, missing, force=True)

    def _run_rebuild(self, job_id: str, kb_name: str) -> None:
        """Start the KB over from the folders its files came from: the first folder that still exists with
        rebuild=True (a fresh generation), the others added back. Files of a folder that is gone cannot be re-read:
        they leave the knowledge base, and their rows say so. When no folder is left the KB is not touched."""
        from ingest import ingest
        from retrieval.store import SOURCES_DIR, kb_dir, read_manifest

        manifest = read_manifest(kb_name, self.settings)[1]
        roots = sorted({e.root for e in manifest.files.values() if e.root}) or [
            str(kb_dir(kb_name, self.settings) / SOURCES_DIR)]
        present = [r for r in roots if Path(r).is_dir()]
        if not present:
            raise JobError(f"知识库「{kb_name}」的文件来自的文件夹都已不存在（{'、'.join(roots)}），无法重建；"
                           "知识库保持原样。请恢复这些文件夹，或重新上传文件。")
        rows: list[FileRow] = []
        for root in roots:
            if root not in present:
                gone = sorted(k for k, e in manifest.files.items() if e.root == root)
                reason = f"文件夹 {root} 已不存在，这个文件无法重新读取，已从知识库中移除。"
                rows += [FileRow(k, "removed", 0, reason) for k in gone]
        for root in present:
            report = ingest(Path(root), kb_name, self.settings, rebuild=root == present[0], lock_timeout=600,
                            on_progress=self._progress(job_id), embedder=self._get_embedder())
            rows += report_rows(report)
        self._update(job_id, files=tuple(rows), message=f"重建完成：{len(rows)} 个文件", done=len(rows),
                     total=len(rows))

    def _run_remove(self, job_id: str, kb_name: str, paths: list[str]) -> None:
        from ingest import remove_files

        report = remove_files(kb_name, paths, self.settings)
        self._finish(job_id, report)
