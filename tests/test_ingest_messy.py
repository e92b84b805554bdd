"""Every file of /work/shared/data/messy_docs (broken, encrypted, empty, scanned, GB2312, UTF-16 ...) ends in
chunks or in a specific per-file reason, one bad file never stops the batch, and the good files are committed.

Uses the tiny random embedder: the point is the pipeline's bookkeeping, and OCR already dominates the run time.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from configs import load_settings
from ingest import ingest
from retrieval.store import KnowledgeBase
from tests.support.tiny_embedder import build_tiny_embedder
from tests.test_store import assert_consistent, assert_no_pickle


@pytest.fixture(scope="module")
def messy_run(messy_docs, tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    model = build_tiny_embedder(root / "tiny-embedder")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZHIWEN_PATHS__KB_ROOT", str(root / "kb"))
    mp.setenv("ZHIWEN_EMBEDDING__MODEL", str(model))
    try:
        settings = load_settings()
        yield settings, ingest(messy_docs, "messy", settings)
    finally:
        mp.undo()


def _all_files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [(Path(dirpath) / f).relative_to(folder.parent).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(out)


def test_every_file_ends_in_chunks_or_a_reason(messy_run, messy_docs):
    settings, report = messy_run
    results = report.by_path()
    assert report.ignored == [], "every file in messy_docs is a document or text: none may vanish silently"
    assert sorted(results) == _all_files(messy_docs)
    kb = KnowledgeBase.open("messy", settings)
    for path, r in results.items():
        entry = kb.manifest.files[path]
        assert entry.status == ("ok" if r.status == "ok" else r.status), path
        if r.status in ("ok", "duplicate"):
            assert r.chunks > 0 and len(kb.chunks_for(entry.sha256)) == r.chunks, path
        else:
            assert r.status in ("empty", "failed") and len(r.reason) > 10 and entry.reason == r.reason, path
    assert_consistent(kb)
    assert_no_pickle(kb.path)


def test_known_bad_files_get_specific_reasons(messy_run):
    _, report = messy_run
    r = report.by_path()
    u = "messy_docs/unstructured/"
    assert r[u + "pdf_password.pdf"].status == "failed" and "密码" in r[u + "pdf_password.pdf"].reason
    assert r[u + "password_protected.xlsx"].status == "failed" and "密码" in r[u + "password_protected.xlsx"].reason
    assert r[u + "empty.txt"].status == "empty"
    assert r[u + "fake-text-all-whitespace.txt"].status == "empty"
    assert "不支持" in r["messy_docs/chardet-5.2.0-tests/LICENSE"].reason


def test_failures_do_not_stop_the_batch(messy_run):
    settings, report = messy_run
    assert report.exit_code == 1, "some files failed"
    ok = [f for f in report.files if f.status == "ok"]
    assert len(ok) >= 60, report.to_table(only_problems=True)
    for f in report.files:  # the GB2312 pages and the Chinese markdown articles all made it
        if "GB2312/" in f.path or f.path.endswith(".md"):
            assert f.status == "ok", (f.path, f.reason)
    kb = KnowledgeBase.open("messy", settings)
    assert len(kb) == report.totals["chunks"] == report.chunks_embedded
    leaked = [c.text[:80] for c in kb.chunks if "tag:blogger.com" in c.text or re.search(r"(?i)<br\s*/?>", c.text)]
    assert not leaked, f"feed bookkeeping or markup in chunks: {leaked[:3]}"


def test_rerun_is_all_unchanged_and_parses_nothing(messy_run, messy_docs):
    settings, first = messy_run
    again = ingest(messy_docs, "messy", settings)
    assert again.bytes_parsed == 0 and again.chunks_embedded == 0
    assert {f.path: f.status for f in again.files} == {
        f.path: ("unchanged" if f.status in ("ok", "duplicate") else f.status) for f in first.files}
    assert again.exit_code == 1, "the failed files are still failed (and say so)"
