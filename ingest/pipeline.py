"""Keep a knowledge base in step with a folder: scan → diff → parse (worker processes) → split → embed → commit.

One module per step, each readable alone:
  ingest/scan.py        which files are looked at (hidden, junk, unsupported, too large) and their manifest keys
  ingest/diff.py        change detection against the manifest: unchanged / renamed / duplicate / removed / to parse
  ingest/parse_pool.py  parsing in worker processes: a crashing or hanging parser fails only its file
  ingest/processor.py   split, embed across files, store in the KB writer, checkpoint every ingest.commit_every_s
This module holds the entry points (ingest, ingest_files, remove_files) and the run that chains the steps under
the knowledge base's writer lock.

Crash safety
  A generation is committed at least every `ingest.commit_every_s` seconds and at the end, so kill -9 loses at
  most the work since the last checkpoint; the next run finds the committed files unchanged and does the rest.
  One bad file never stops the batch (see ingest/parse_pool.py). ingest_files(force=True), the page's
  「重新导入所选文件」, re-reads, re-parses and re-embeds the given files whatever the manifest says; their
  content's chunks are replaced in place (same sha256), so the KB stays consistent.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.diff import plan
from ingest.processor import Processor, ProgressCallback, emit
from ingest.report import FileResult, IngestReport, ProgressEvent
from ingest.scan import SourceFile, classify, manifest_key, scan_folder
from retrieval.store import IndexSpec, KBError, KnowledgeBase, validate_kb_name

if TYPE_CHECKING:
    from configs import Settings
    from retrieval.embeddings import Embedder


class IngestError(KBError):
    """A usage problem (bad folder, bad path list): nothing was ingested. The CLI exits 2."""


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
    files, report.ignored = scan_folder(root, settings)
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
    files: list[SourceFile] = []
    report = IngestReport(kb_name)
    t0 = time.perf_counter()
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise IngestError(f"文件 {p} 不存在或不是普通文件；没有导入任何文件。")
        p = p.resolve()
        key, root = known.get(str(p), (None, sources if p.is_relative_to(sources) else p.parent))
        f = classify(p, root, settings)
        if f is None:
            report.ignored.append(key or manifest_key(root, p))
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


def _run(files: list[SourceFile], kb_name: str, settings: Settings, embedder: Embedder, report: IngestReport, *,
         prune_roots: set[Path], rebuild: bool, on_progress: ProgressCallback | None, lock_timeout: float | None,
         show_progress: bool, force: bool = False, retry_failed: bool = False) -> IngestReport:
    with KnowledgeBase.open_writer(kb_name, settings, timeout=lock_timeout) as w:
        t0 = time.perf_counter()  # may load the model (counted as embedding): KBIncompatibleError before any change
        w.set_spec(_spec(embedder, settings, None if rebuild else w.spec), rebuild=rebuild)
        report.phase_seconds["embed"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        to_parse = plan(files, w, report, prune_roots, force=force, retry_failed=retry_failed)
        report.phase_seconds["scan"] += time.perf_counter() - t0
        emit(on_progress, ProgressEvent("scan", 0, len(to_parse), message=f"{len(files)} files scanned"))
        if to_parse:
            Processor(w, settings, embedder, report, on_progress, show_progress).run(to_parse)
        t0 = time.perf_counter()
        report.generation = w.commit() or w.live_generation
        report.phase_seconds["write"] += time.perf_counter() - t0
    report.files.sort(key=lambda r: r.path)
    emit(on_progress, ProgressEvent("done", len(to_parse), len(to_parse), chunks_done=report.chunks_embedded))
    return report
