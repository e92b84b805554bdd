"""The ingest pipeline on real folders: real loaders, splitter, a real (tiny, random) sentence-transformers model,
real FAISS, real worker processes, and the CLI in a subprocess for exit codes, locking and kill -9."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from configs import PROJECT_ROOT, load_settings
from ingest import IngestError, ProgressEvent, ingest, ingest_files, remove_files
from ingest.parse_pool import parse_all
from ingest.report import IngestReport
from ingest.scan import SourceFile
from retrieval.embeddings import Embedder
from retrieval.store import KBIncompatibleError, KBLockedError, KnowledgeBase
from tests.support.tiny_embedder import build_tiny_embedder
from tests.test_store import assert_consistent, assert_no_pickle

PARAGRAPHS = [
    ("第{n}章 总则\n\n本办法适用于公司全体员工。员工请假应当提前申请，经部门负责人批准后方可休假。"
     "年假天数根据工龄计算，工龄满一年不满十年的，年假五天；满十年不满二十年的，年假十天。"),
    ("第{n}节 报销\n\n差旅费用报销须在出差结束后十五个工作日内提交。住宿标准按照城市等级执行，"
     "一线城市每晚不超过六百元，其他城市每晚不超过四百元。超出部分由个人承担。"),
    ("第{n}条 安全\n\n实验室内禁止饮食。离开实验室前应关闭水、电、气阀门。发现安全隐患应立即报告，"
     "并在隐患排除之前停止相关实验。每季度组织一次消防演练，全体人员必须参加。"),
]


def _text(n: int, repeat: int = 3) -> str:
    return "\n\n".join(PARAGRAPHS[(n + i) % 3].format(n=n * 10 + i) for i in range(repeat))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-embedder")


@pytest.fixture()
def settings(tmp_settings, tiny_model, monkeypatch):
    monkeypatch.setenv("ZHIWEN_EMBEDDING__MODEL", str(tiny_model))
    monkeypatch.setenv("ZHIWEN_INGEST__WORKERS", "2")
    return load_settings()


class CountingEmbedder(Embedder):
    """The real Embedder, counting the passages it is asked to encode (to prove what was not re-embedded)."""

    encoded = 0

    def encode_passages(self, texts):
        self.encoded += len(texts)
        return super().encode_passages(texts)


@pytest.fixture()
def embedder(settings) -> CountingEmbedder:
    return CountingEmbedder.from_settings(settings)


@pytest.fixture()
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "制度").mkdir(parents=True)
    (d / "a.txt").write_text(_text(1), encoding="utf-8")
    (d / "b.md").write_text("# 报销指南\n\n" + _text(2), encoding="utf-8")
    (d / "制度" / "c.txt").write_text(_text(3), encoding="gb18030")  # not UTF-8: the loader detects it
    _age(d)
    return d


def _age(folder: Path) -> None:
    """Date files an hour back, like documents that have sat in a folder for a while (files modified within
    seconds of being hashed are always re-hashed: see ingest/diff.py)."""
    old = time.time() - 3600
    for p in folder.rglob("*"):
        os.utime(p, (old, old))


def _run(docs: Path, settings, embedder, **kw) -> IngestReport:
    return ingest(docs, "kb", settings, embedder=embedder, **kw)


def _texts(kb: KnowledgeBase) -> list[tuple[str, int, str]]:
    return sorted((c.source, c.position, c.text) for c in kb.chunks)


def test_first_run_then_unchanged_rerun_embeds_nothing(docs, settings, embedder):
    r1 = _run(docs, settings, embedder)
    assert {f.path: f.status for f in r1.files} == {"docs/a.txt": "ok", "docs/b.md": "ok", "docs/制度/c.txt": "ok"}
    assert r1.exit_code == 0 and all(f.chunks > 0 for f in r1.files)
    kb = KnowledgeBase.open("kb", settings)
    assert_consistent(kb)
    assert embedder.encoded == len(kb) == r1.chunks_embedded == r1.totals["chunks"]
    assert any("年假" in c.text for c in kb.chunks if c.source == "docs/制度/c.txt"), "GB18030 text decoded"
    assert kb.manifest.spec.model_id == embedder.model_id and kb.manifest.spec.dim == embedder.dim

    before = embedder.encoded
    r2 = _run(docs, settings, embedder)
    assert [f.status for f in r2.files] == ["unchanged"] * 3
    assert embedder.encoded == before and r2.chunks_embedded == 0
    assert r2.generation == kb.generation, "nothing changed, so no new generation"
    assert [f.chunks for f in r2.files] == [f.chunks for f in r1.files]


def test_changed_file_replaces_its_chunks(docs, settings, embedder):
    _run(docs, settings, embedder)
    old = KnowledgeBase.open("kb", settings)
    (docs / "a.txt").write_text("全新的内容：食堂每天早上七点开门，晚上八点关门。", encoding="utf-8")
    r = _run(docs, settings, embedder)
    assert r.by_path()["docs/a.txt"].status == "ok"
    assert r.by_path()["docs/b.md"].status == "unchanged"
    kb = KnowledgeBase.open("kb", settings)
    assert_consistent(kb)
    a_texts = [c.text for c in kb.chunks if c.source == "docs/a.txt"]
    assert a_texts == ["全新的内容：食堂每天早上七点开门，晚上八点关门。"]
    old_a_sha = old.manifest.files["docs/a.txt"].sha256
    assert not kb.chunks_for(old_a_sha), "the old content's chunks are gone"
    assert [c for c in _texts(kb) if c[0] != "docs/a.txt"] == [c for c in _texts(old) if c[0] != "docs/a.txt"]


def test_prune_removes_files_that_are_gone(docs, settings, embedder):
    _run(docs, settings, embedder)
    (docs / "b.md").unlink()
    r = _run(docs, settings, embedder)
    assert "docs/b.md" not in r.by_path()
    assert "docs/b.md" in KnowledgeBase.open("kb", settings).manifest.files, "without --prune nothing is dropped"
    r = _run(docs, settings, embedder, prune=True)
    assert r.by_path()["docs/b.md"].status == "removed"
    kb = KnowledgeBase.open("kb", settings)
    assert "docs/b.md" not in kb.manifest.files and all(c.source != "docs/b.md" for c in kb.chunks)
    assert_consistent(kb)


def test_rename_moves_chunks_without_re_embedding(docs, settings, embedder):
    _run(docs, settings, embedder)
    old = KnowledgeBase.open("kb", settings)
    before = embedder.encoded
    (docs / "a.txt").rename(docs / "制度" / "a-renamed.txt")
    r = _run(docs, settings, embedder)
    res = r.by_path()["docs/制度/a-renamed.txt"]
    assert res.status == "renamed" and "docs/a.txt" in res.reason
    assert embedder.encoded == before and r.chunks_embedded == 0
    kb = KnowledgeBase.open("kb", settings)
    assert "docs/a.txt" not in kb.manifest.files
    sha = old.manifest.files["docs/a.txt"].sha256
    assert kb.sources_for(sha) == ["docs/制度/a-renamed.txt"]
    moved = kb.chunks_for(sha)
    assert [c.text for c in moved] == [c.text for c in old.chunks_for(sha)]
    assert {c.source for c in moved} == {"docs/制度/a-renamed.txt"}
    assert np.allclose(kb.index.reconstruct_n(moved[0].id, len(moved)),
                       old.index.reconstruct_n(old.chunks_for(sha)[0].id, len(moved)))
    assert_consistent(kb)


def test_duplicates_are_embedded_once_and_reported(docs, settings, embedder):
    shutil.copy(docs / "a.txt", docs / "a-copy.txt")
    shutil.copy(docs / "a.txt", docs / "制度" / "a-again.txt")
    r = _run(docs, settings, embedder)
    kb = KnowledgeBase.open("kb", settings)
    sha = kb.manifest.files["docs/a.txt"].sha256
    n = len(kb.chunks_for(sha))
    assert embedder.encoded == len(kb), "three identical files, one set of vectors"
    dups = [f for f in r.files if f.status == "duplicate"]
    assert len(dups) == 2 and {f.duplicate_of for f in dups} == {"docs/a-copy.txt"}  # the first in scan order
    assert all(f.chunks == n for f in dups)
    assert len(kb.sources_for(sha)) == 3
    assert_consistent(kb)

    # Deleting one of the copies keeps the chunks; deleting the last drops them.
    (docs / "a-copy.txt").unlink()
    _run(docs, settings, embedder, prune=True)
    kb = KnowledgeBase.open("kb", settings)
    assert len(kb.chunks_for(sha)) == n and sorted(kb.sources_for(sha)) == ["docs/a.txt", "docs/制度/a-again.txt"]
    assert_consistent(kb)
    (docs / "a.txt").unlink()
    (docs / "制度" / "a-again.txt").unlink()
    _run(docs, settings, embedder, prune=True)
    kb = KnowledgeBase.open("kb", settings)
    assert kb.chunks_for(sha) == [] and kb.sources_for(sha) == []
    assert_consistent(kb)


def test_failed_and_unsupported_files_are_recorded_and_retried_only_when_changed(docs, settings, embedder):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "README").write_text("这是一个没有扩展名的说明文件。", encoding="utf-8")
    (docs / "tool.bin").write_bytes(bytes(range(256)) * 4)
    (docs / ".hidden.txt").write_text("隐藏文件不导入", encoding="utf-8")
    (docs / "~$a.docx").write_bytes(b"office lock file")
    (docs / "empty.txt").write_bytes(b"")
    r = _run(docs, settings, embedder)
    res = r.by_path()
    assert res["docs/broken.pdf"].status == "failed" and res["docs/broken.pdf"].reason
    assert res["docs/README"].status == "failed" and "不支持" in res["docs/README"].reason
    assert res["docs/empty.txt"].status == "empty" and res["docs/empty.txt"].reason
    assert sorted(r.ignored) == ["docs/tool.bin", "docs/~$a.docx"]
    assert not any("hidden" in p for p in res)
    assert r.exit_code == 1 and res["docs/a.txt"].status == "ok", "good files are committed despite failures"
    kb = KnowledgeBase.open("kb", settings)
    entry = kb.manifest.files["docs/broken.pdf"]
    assert entry.status == "failed" and entry.reason == res["docs/broken.pdf"].reason and entry.chunk_ids == ()
    assert_consistent(kb)

    r2 = _run(docs, settings, embedder)
    assert r2.by_path()["docs/broken.pdf"].status == "failed" and r2.bytes_parsed == 0, "not retried: unchanged"
    (docs / "broken.pdf").unlink()
    (docs / "broken.pdf").write_text("not a pdf either, but different bytes", encoding="utf-8")
    r3 = _run(docs, settings, embedder)
    assert r3.by_path()["docs/broken.pdf"].status == "failed" and r3.bytes_parsed > 0, "changed: retried"


def test_progress_events_and_report_table(docs, settings, embedder):
    events: list[ProgressEvent] = []
    r = _run(docs, settings, embedder, on_progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "scan" and phases[-1] == "done" and "parse" in phases and "embed" in phases
    parsed = [e for e in events if e.phase == "parse"]
    assert [e.files_done for e in parsed] == [1, 2, 3] and all(e.files_total == 3 for e in parsed)
    assert {e.current for e in parsed} == {"docs/a.txt", "docs/b.md", "docs/制度/c.txt"}
    table = r.to_table()
    assert "docs/制度/c.txt" in table and "已导入 3" in table and "embed" in table


def test_incompatible_settings_need_rebuild(docs, settings, embedder):
    first = len(_run(docs, settings, embedder).files) and len(KnowledgeBase.open("kb", settings))
    changed = load_settings(ingest={"chunk_size": 40, "chunk_overlap": 10})
    with pytest.raises(KBIncompatibleError, match="--rebuild"):
        ingest(docs, "kb", changed, embedder=Embedder.from_settings(changed))
    r = ingest(docs, "kb", changed, embedder=Embedder.from_settings(changed), rebuild=True)
    assert [f.status for f in r.files] == ["ok"] * 3
    kb = KnowledgeBase.open("kb", settings)
    assert kb.manifest.spec.chunk_size == 40 and len(kb) > first, "smaller chunks, more of them"
    assert_consistent(kb)


def test_lock_refuses_a_second_writer(docs, settings, embedder):
    kb = KnowledgeBase.create("kb", settings)
    with kb.writer(), pytest.raises(KBLockedError, match=f"pid {os.getpid()}"):
        _run(docs, settings, embedder)


def test_upload_then_remove(tmp_path, settings, embedder):
    kb = KnowledgeBase.create("kb", settings)
    up = kb.sources_dir / "上传.txt"
    up.write_text(_text(5), encoding="utf-8")
    other = tmp_path / "elsewhere" / "x.md"
    other.parent.mkdir()
    other.write_text(_text(6), encoding="utf-8")
    r = ingest_files([up, other], "kb", settings, embedder=embedder)
    assert {f.path: f.status for f in r.files} == {"sources/上传.txt": "ok", "elsewhere/x.md": "ok"}
    r = remove_files("kb", ["sources/上传.txt", str(other), "nope.txt"], settings)
    assert [(f.path, f.status) for f in r.files] == [("sources/上传.txt", "removed"), ("elsewhere/x.md", "removed"),
                                                     ("nope.txt", "failed")]
    assert not up.exists(), "an uploaded copy is deleted with its entry"
    assert other.exists(), "a file outside the KB is never deleted"
    kb = kb.reopen()
    assert len(kb) == 0 and kb.manifest.files == {}
    with pytest.raises(IngestError, match="不存在"):
        ingest_files([tmp_path / "missing.txt"], "kb", settings, embedder=embedder)


def test_no_pickle_in_an_ingested_kb(docs, settings, embedder):
    _run(docs, settings, embedder)
    (docs / "b.md").unlink()
    _run(docs, settings, embedder, prune=True)
    assert_no_pickle(settings.kb_root / "kb")


# -- worker crashes ---------------------------------------------------------------------------------------------
def crashing_parse(path: str, ingest_settings) -> tuple:
    """Runs in a worker process: segfaults on files named crash*, like a native parser hitting a bad file."""
    if Path(path).name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return ("ok", Path(path).name)


def test_a_segfaulting_worker_fails_only_its_file(tmp_path, settings):
    names = [f"f{i:02d}.txt" for i in range(6)] + ["crash.txt"] + [f"g{i:02d}.txt" for i in range(6)]
    groups = []
    for n in names:
        (tmp_path / n).write_text(n)
        groups.append([SourceFile(n, tmp_path / n, tmp_path, 1, 0)])
    out = {g[0].key: outcome for g, outcome in parse_all(groups, settings, IngestReport("kb"), crashing_parse)}
    assert sorted(out) == sorted(names), "every file gets exactly one outcome"
    assert out["crash.txt"][0] == "error" and "崩溃" in out["crash.txt"][2]
    assert all(out[n] == ("ok", n) for n in names if n != "crash.txt")


# -- the CLI ----------------------------------------------------------------------------------------------------
def _cli(args: list[str], settings, *, extra_env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "ZHIWEN_PATHS__KB_ROOT": str(settings.kb_root),
           "ZHIWEN_EMBEDDING__MODEL": settings.embedding.model, **(extra_env or {})}
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "ingest.py"), *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _cli_run(args: list[str], settings, **kw) -> tuple[int, str, str]:
    p = _cli(args, settings, **kw)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def test_cli_usage_errors_exit_2(tmp_path, settings):
    rc, _, err = _cli_run([str(tmp_path / "nope"), "--quiet"], settings)
    assert rc == 2 and "不存在" in err and "Traceback" not in err
    (tmp_path / "d").mkdir()
    rc, _, err = _cli_run([str(tmp_path / "d"), "--kb", "../escape"], settings)
    assert rc == 2 and "无效" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  chunk_size: 5\n")
    rc, _, err = _cli_run([str(tmp_path / "d"), "--config", str(bad)], settings)
    assert rc == 2 and "ingest.chunk_size" in err and "Traceback" not in err


def test_cli_ingests_reports_and_refuses_when_locked(docs, settings):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 junk")
    rc, out, err = _cli_run([str(docs), "--kb", "cli", "--quiet"], settings)
    assert rc == 1, err
    assert "docs/broken.pdf" in out and "失败 1" in out and "已导入 3" in out
    kb = KnowledgeBase.open("cli", settings)
    assert_consistent(kb)
    with kb.writer():
        rc, out, err = _cli_run([str(docs), "--kb", "cli", "--quiet"], settings)
    assert rc == 2 and f"pid {os.getpid()}" in err and "Traceback" not in err
    changed = {"ZHIWEN_INGEST__CHUNK_SIZE": "100", "ZHIWEN_INGEST__CHUNK_OVERLAP": "10"}
    rc, out, err = _cli_run([str(docs), "--kb", "cli", "--quiet"], settings, extra_env=changed)
    assert rc == 2 and "--rebuild" in err and "chunk_size: 250 -> 100" in err


def _write_corpus(folder: Path, cmrc_trial: Path, copies: int) -> int:
    data = json.loads(cmrc_trial.read_text(encoding="utf-8"))
    n = 0
    for art in data["data"]:
        for para in art["paragraphs"]:
            for k in range(copies):  # distinct bytes per copy: a different first line
                sub = folder / f"part{k}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / f"{para['id']}.txt").write_text(f"副本 {k}\n{para['context']}", encoding="utf-8")
                n += 1
    return n


def test_kill_9_mid_ingest_then_resume_matches_a_clean_run(tmp_path, settings, cmrc_trial):
    folder = tmp_path / "corpus"
    n_files = _write_corpus(folder, cmrc_trial, copies=1)
    env = {"ZHIWEN_INGEST__COMMIT_EVERY_S": "0.2"}
    p = _cli([str(folder), "--kb", "crash", "--quiet"], settings, extra_env=env)
    kb_path = settings.kb_root / "crash"
    proc = psutil.Process(p.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:  # wait for the first checkpoint with files in it
            children = proc.children(recursive=True) or children
            cur = kb_path / "CURRENT"
            if cur.exists():
                gen = cur.read_text().strip()
                try:
                    m = json.loads((kb_path / gen / "manifest.json").read_text())
                    if m.get("files") or any(p["kind"] == "files" for p in m.get("parts", [])):
                        break
                except (FileNotFoundError, ValueError):
                    pass
            time.sleep(0.02)
        assert p.poll() is None, "the ingest finished before it could be killed: make the corpus bigger"
        children = proc.children(recursive=True) or children
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        orphans = _still_running(children, wait_s=30)
    finally:
        for c in children:  # the parse workers and forkserver we started, by pid
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        p.kill()
        p.communicate()

    assert children and not orphans, f"the parse forkserver and workers die with the killed ingest: {orphans}"
    kb = KnowledgeBase.open("crash", settings)
    assert_consistent(kb)
    done = len(kb.manifest.files)
    assert 0 < done < n_files, f"killed mid-way: {done} of {n_files} files committed"

    rc, _, err = _cli_run([str(folder), "--kb", "crash", "--quiet"], settings)
    assert rc == 0, err
    resumed = KnowledgeBase.open("crash", settings)
    assert_consistent(resumed)
    assert_no_pickle(kb_path)
    clean_report = ingest(folder, "clean", settings)
    assert clean_report.exit_code == 0
    clean = KnowledgeBase.open("clean", settings)
    assert len(resumed.manifest.files) == n_files
    assert _texts(resumed) == _texts(clean)
    assert {p: e.sha256 for p, e in resumed.manifest.files.items()} == {
        p: e.sha256 for p, e in clean.manifest.files.items()}


def _still_running(procs: list[psutil.Process], wait_s: float) -> list[int]:
    """The pids of `procs` still running once they have had up to wait_s seconds to exit (the kernel kills the
    parse processes of a killed ingest; they need a moment to go)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [q.pid for q in procs if _alive(q)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_checkpoint_is_written_during_a_long_embedding_batch_and_a_rerun_embeds_only_the_rest(tmp_path, settings):
    """issue 13 item 2: every file parses in a moment, then embedding takes long (a real model on a CPU). A kill -9
    after the first checkpoint must leave the files embedded so far committed, and the re-run must embed only the
    rest. The subprocess kills itself right after its first checkpoint: see tests/support/checkpoint_kill.py."""
    folder = tmp_path / "long"
    folder.mkdir()
    for n in range(8):
        (folder / f"{n}.txt").write_text(_text(n, repeat=6), encoding="utf-8")
    _age(folder)
    env = {**os.environ, "ZHIWEN_PATHS__KB_ROOT": str(settings.kb_root),
           "ZHIWEN_EMBEDDING__MODEL": settings.embedding.model, "ZHIWEN_INGEST__COMMIT_EVERY_S": "2"}
    log = tmp_path / "ingest.log"
    with open(log, "w") as out:  # a file, not a pipe: the killed run's parse workers may still hold it open
        p = subprocess.Popen([sys.executable, "-m", "tests.support.checkpoint_kill", str(folder), "kb"],
                             cwd=PROJECT_ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            rc = p.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the run's own session: its orphaned parse workers, if any
    assert rc == -signal.SIGKILL, f"killed after its first checkpoint: {rc} {log.read_text()[-2000:]}"

    killed = KnowledgeBase.open("kb", settings)
    assert_consistent(killed)
    done = {k for k, e in killed.manifest.files.items() if e.status == "ok"}
    assert 0 < len(done) < 8, f"the checkpoint came during the embedding batch: {len(done)} of 8 files committed"

    embedder = CountingEmbedder.from_settings(settings)
    r = _run(folder, settings, embedder)
    assert r.exit_code == 0
    assert {f.path for f in r.files if f.status == "unchanged"} == done, "the committed files are not embedded again"
    resumed = KnowledgeBase.open("kb", settings)
    assert_consistent(resumed)
    assert embedder.encoded == len(resumed) - len(killed) > 0, "only the chunks missing from the checkpoint"
    clean = ingest(folder, "clean", settings, embedder=embedder)
    assert clean.exit_code == 0
    assert _texts(resumed) == _texts(KnowledgeBase.open("clean", settings))


def test_two_folders_with_the_same_name_stay_apart(tmp_path, settings, embedder):
    a, b = tmp_path / "x" / "docs", tmp_path / "y" / "docs"
    for d, n in ((a, 1), (b, 2)):
        d.mkdir(parents=True)
        (d / "same.txt").write_text(_text(n), encoding="utf-8")
        _age(d)
    _run(a, settings, embedder)
    _run(b, settings, embedder)
    kb = KnowledgeBase.open("kb", settings)
    b_key = (b / "same.txt").resolve().as_posix()
    assert sorted(kb.manifest.files) == sorted(["docs/same.txt", b_key]), "the second falls back to its full path"
    assert [f.status for f in _run(b, settings, embedder).files] == ["unchanged"]
    (b / "same.txt").unlink()
    r = _run(b, settings, embedder, prune=True)
    assert [(f.path, f.status) for f in r.files] == [(b_key, "removed")]
    assert list(KnowledgeBase.open("kb", settings).manifest.files) == ["docs/same.txt"], "the other folder's file stays"


# -- parse timeout ----------------------------------------------------------------------------------------------
def _is_multiprocessing_helper(p: psutil.Process) -> bool:
    """The forkserver and resource tracker: direct children that multiprocessing starts once and keeps for the
    life of the process. (Workers fork from the forkserver and share its command line, but are its children.)"""
    try:
        cmd = " ".join(p.cmdline())
        helper = "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd
        return helper and p.ppid() == os.getpid()
    except psutil.Error:
        return False


def test_a_hanging_parse_times_out_the_rest_is_ingested_and_no_worker_is_left(docs, settings, embedder, monkeypatch):
    from ingest import parse_pool
    from tests.support.hanging_parse import is_alive, parse_or_hang

    # Two workers. One takes 00-hang, whose parse never ends; the other takes 01-slow (4 s), then 02-wait, which is
    # still running when 00-hang is killed (and the pool with it), so it is parsed again in a fresh pool.
    (docs / "00-hang.txt").write_text(_text(7), encoding="utf-8")
    (docs / "01-slow.txt").write_text(_text(8), encoding="utf-8")
    (docs / "02-wait.txt").write_text(_text(9), encoding="utf-8")
    _age(docs)
    monkeypatch.setattr(parse_pool, "parse_in_worker", parse_or_hang)  # the real parser for every other file
    limited = load_settings(ingest={"parse_timeout_s": 10})
    assert limited.ingest.workers == 2
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    r = ingest(docs, "kb", limited, embedder=embedder)

    res = r.by_path()
    hang = res["docs/00-hang.txt"]
    assert hang.status == "failed" and hang.chunks == 0
    assert "文件解析超过 10 秒未完成" in hang.reason and "ingest.parse_timeout_s" in hang.reason
    others = [f for f in r.files if f.path != "docs/00-hang.txt"]
    assert sorted(f.path for f in others) == ["docs/01-slow.txt", "docs/02-wait.txt", "docs/a.txt", "docs/b.md",
                                              "docs/制度/c.txt"]
    assert all(f.status == "ok" and f.chunks > 0 for f in others), others
    assert r.exit_code == 1
    runs = (docs / ".02-wait.txt.runs").read_text().split()
    assert len(runs) == 2 and runs[0] != runs[1], "killed with the torn-down pool, then parsed again in a new one"
    kb = KnowledgeBase.open("kb", settings)
    assert_consistent(kb)
    assert kb.manifest.files["docs/00-hang.txt"].status == "failed"
    assert kb.manifest.files["docs/00-hang.txt"].reason == hang.reason
    assert {c.source for c in kb.chunks} == {f.path for f in others}

    assert not is_alive(int((docs / ".00-hang.txt.pid").read_text())), "the hanging worker was killed"
    left = [p for p in me.children(recursive=True) if p.pid not in before and not _is_multiprocessing_helper(p)]
    assert left == [], f"worker processes left behind: {left}"


# -- forced re-ingest -------------------------------------------------------------------------------------------
def _scans(tmp_path: Path) -> Path:
    """A folder with a text file and a picture of text (readable only with OCR)."""
    from PIL import Image, ImageDraw, ImageFont

    d = tmp_path / "scans"
    d.mkdir()
    img = Image.new("RGB", (900, 160), "white")
    ImageDraw.Draw(img).text((30, 50), "Invoice number 10517", font=ImageFont.load_default(size=48), fill="black")
    img.save(d / "票据.png")
    (d / "a.txt").write_text(_text(1), encoding="utf-8")
    _age(d)
    return d


def test_retry_failed_parses_an_unchanged_failed_file_again(tmp_path, settings, embedder):
    scans = _scans(tmp_path)
    no_ocr = load_settings(ingest={"ocr": False})
    r = ingest(scans, "kb", no_ocr, embedder=embedder)
    assert r.by_path()["scans/票据.png"].status == "failed" and "ingest.ocr" in r.by_path()["scans/票据.png"].reason
    assert r.by_path()["scans/a.txt"].status == "ok"

    r = ingest(scans, "kb", settings, embedder=embedder)  # OCR is on now, but the file did not change
    assert r.by_path()["scans/票据.png"].status == "failed" and r.bytes_parsed == 0, "not retried without the flag"

    before = KnowledgeBase.open("kb", settings).manifest.files["scans/a.txt"]
    rc, out, err = _cli_run([str(scans), "--kb", "kb", "--quiet", "--retry-failed"], settings)
    assert rc == 0, out + err
    kb = KnowledgeBase.open("kb", settings)
    assert_consistent(kb)
    assert kb.manifest.files["scans/票据.png"].status == "ok"
    assert any("10517" in c.text.replace(" ", "") for c in kb.chunks if c.source == "scans/票据.png")
    assert kb.manifest.files["scans/a.txt"] == before, "a file that was fine is left alone"


def test_page_reingest_forces_a_failed_file_whose_cause_was_fixed(tmp_path, settings, embedder):
    from app.jobs import JobManager

    scans = _scans(tmp_path)
    png = scans / "票据.png"
    no_ocr = load_settings(ingest={"ocr": False})
    r = ingest_files([png], "kb", no_ocr, embedder=embedder)
    assert [(f.path, f.status) for f in r.files] == [("scans/票据.png", "failed")]

    r = ingest_files([png], "kb", settings, embedder=embedder)  # OCR on, same bytes, no force: still failed
    assert r.files[0].status == "failed" and r.bytes_parsed == 0

    jobs = JobManager(settings, embedder=lambda: embedder)
    try:
        job = jobs.wait(jobs.reingest("kb", ["scans/票据.png"]).id, timeout=600)
    finally:
        jobs.shutdown()
    assert job.state == "done", job.error
    assert [(f.name, f.status) for f in job.files] == [("scans/票据.png", "ok")] and job.files[0].chunks > 0
    kb = KnowledgeBase.open("kb", settings)
    assert_consistent(kb)
    assert list(kb.manifest.files) == ["scans/票据.png"] and kb.manifest.files["scans/票据.png"].reason == ""
    assert any("10517" in c.text.replace(" ", "") for c in kb.chunks)


def test_forced_reingest_of_ok_files_re_embeds_them_and_keeps_the_kb_consistent(docs, settings, embedder):
    shutil.copy(docs / "a.txt", docs / "a-copy.txt")  # first in scan order: owns the content, a.txt duplicates it
    _age(docs)
    _run(docs, settings, embedder)
    old = KnowledgeBase.open("kb", settings)
    assert old.manifest.files["docs/a.txt"].status == "duplicate"
    a_chunks = len(old.chunks_for(old.manifest.files["docs/a.txt"].sha256))
    c_chunks = len(old.chunks_for(old.manifest.files["docs/制度/c.txt"].sha256))

    before = embedder.encoded
    r = ingest_files([docs / "a.txt", docs / "制度" / "c.txt"], "kb", settings, embedder=embedder, force=True)
    assert [(f.path, f.status, f.chunks, f.duplicate_of) for f in r.files] == [
        ("docs/a.txt", "duplicate", a_chunks, "docs/a-copy.txt"),  # re-embedded; the content keeps its owner
        ("docs/制度/c.txt", "ok", c_chunks, None),                   # the folder's key, not a new "制度/c.txt"
    ]
    assert embedder.encoded - before == r.chunks_embedded == a_chunks + c_chunks, "both were parsed and embedded"
    kb = KnowledgeBase.open("kb", settings)
    assert kb.generation != old.generation
    assert_consistent(kb)
    assert sorted(kb.manifest.files) == sorted(old.manifest.files), "no new entries"
    statuses = {k: e.status for k, e in kb.manifest.files.items()}
    assert statuses == {k: e.status for k, e in old.manifest.files.items()}, \
        "the manifest agrees with the report: a.txt is still the duplicate, a-copy.txt the owner"
    assert _texts(kb) == _texts(old) and len(kb) == len(old), "same chunks, none lost or doubled"
    for c in kb.chunks:  # every row holds its chunk's vector: a search for a chunk finds that chunk
        v = np.asarray(embedder.encode_passages([c.embedding_text()]), dtype=np.float32)
        _, rows = kb.index.search(v, 1)
        assert kb.chunks[int(rows[0][0])].text == c.text
