"""The same behaviour from every store (`store.backend`: faiss files, Milvus Lite, a Milvus server), one suite.

Real components throughout: real CMRC 2018 trial passages from /work/shared/data, real ingest (loaders, splitter,
parser processes), the real multilingual-e5-small, real FAISS, a real Milvus Lite database file (milvus-lite runs
inside the test process) and a real Milvus-protocol server in its own process on loopback (`store.uri: http://…`,
tests/support/milvus_server.py), and a tiny random GLM as the LLM. Milvus cases skip, with the reason, only where
pymilvus / milvus-lite cannot be imported. Module-scoped worlds keep it lean: one ingest per backend.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.service import AnswerParams, QAService
from configs import PROJECT_ROOT, load_settings
from ingest import ingest, remove_files
from retrieval.retriever import HybridSearcher
from retrieval.store import IndexSpec, KBLockedError, KnowledgeBase, list_knowledge_bases
from tests.conftest import require_model
from tests.support.app_server import stop_process
from tests.support.milvus_server import MilvusLiteServer
from tests.support.tiny_glm import build_tiny_glm
from tests.test_service import UNRELATED, cmrc_paragraphs, write_docs

_MILVUS_MISSING = [m for m in ("pymilvus", "milvus_lite") if importlib.util.find_spec(m) is None]
BACKENDS = [
    "faiss",
    pytest.param("milvus", marks=pytest.mark.skipif(
        bool(_MILVUS_MISSING), reason=f"Milvus Lite cannot be used here: {', '.join(_MILVUS_MISSING)} not installed")),
    pytest.param("milvus-server", marks=pytest.mark.skipif(
        bool(_MILVUS_MISSING), reason=f"Milvus Lite cannot be used here: {', '.join(_MILVUS_MISSING)} not installed")),
]


def _age(folder: Path) -> None:
    old = time.time() - 3600  # files modified within seconds of hashing are always re-hashed (ingest/pipeline.py)
    for p in folder.rglob("*"):
        os.utime(p, (old, old))


@pytest.fixture(scope="module", params=BACKENDS)
def world(request, tmp_path_factory, cmrc_trial, models_dir):
    """A KB 'cmrc' of 5 CMRC passages in the given backend, and a QA service over it (tiny GLM)."""
    require_model(models_dir, "multilingual-e5-small")
    backend = request.param
    root = tmp_path_factory.mktemp(f"backend-{backend}")
    glm = build_tiny_glm(root / "tiny-glm", "glm")
    server = MilvusLiteServer(root / "milvus-server-data") if backend == "milvus-server" else None
    uri = server.uri if server else str(root / "kb" / "milvus.db")
    settings = load_settings(
        paths={"kb_root": str(root / "kb"), "models_dir": str(models_dir)},
        store={"backend": "faiss" if backend == "faiss" else "milvus", "uri": uri},
        ingest={"workers": 1},
        # the whole prompt.context_tokens budget for the passages: this suite compares the stores (the CPU budget,
        # llm.cpu_context_tokens, cuts the merged passages the answer test looks into; it is tested in test_llamacpp)
        llm={"model": str(glm), "device": "cpu", "dtype": "float32", "temperature": 0.0, "max_new_tokens": 8,
             "cpu_context_tokens": 0},
    )
    paragraphs = cmrc_paragraphs(cmrc_trial, 5)
    docs = write_docs(root / "docs", paragraphs)
    _age(docs)
    service = QAService(settings)
    report = ingest(docs, "cmrc", settings, embedder=service.searcher.embedder)
    assert report.exit_code == 0 and report.chunks_embedded > 0, report
    yield {"backend": backend, "settings": settings, "service": service, "paragraphs": paragraphs, "docs": docs,
           "server": server}
    if backend != "faiss":
        from retrieval import milvus_store

        milvus_store.close_clients()
    if server:
        server.stop()


def _sources(stream) -> list[str]:
    return [h.source for h in stream.sources]


def test_ingest_layout_and_answers_with_sources(world):
    s, service = world["settings"], world["service"]
    kb = KnowledgeBase.open("cmrc", s)
    assert list_knowledge_bases(s) == ["cmrc"]
    assert type(kb).__name__ == ("KnowledgeBase" if world["backend"] == "faiss" else "MilvusKnowledgeBase")
    entries = kb.manifest.files
    assert sorted(entries) == [f"docs/cmrc_{i:02d}.txt" for i in range(5)]
    assert all(e.status == "ok" and e.chunk_ids for e in entries.values())
    chunks = kb.chunks
    assert len(chunks) == len(kb) == sum(len(e.chunk_ids) for e in entries.values())
    by_file = {p: sorted(c.position for c in chunks if c.source == p) for p in entries}
    assert all(pos == list(range(len(pos))) for pos in by_file.values()), "every file's chunks, positions 0..n-1"

    p = world["paragraphs"][2]
    stream = service.answer(p["question"], "cmrc")
    "".join(stream)
    assert not stream.refused and _sources(stream)[0] == "docs/cmrc_02.txt"
    assert any(a in h.text for h in stream.sources for a in p["answers"])
    assert stream.sources[0].dense_score >= s.retrieval.score_threshold

    refused = service.answer(UNRELATED, "cmrc")
    assert "".join(refused) and refused.refused and not refused.sources, "below the threshold: no LLM call"


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_passage_with_neighbours_merged(world, mode):
    s = world["settings"]
    kb = KnowledgeBase.open("cmrc", s)
    searcher: HybridSearcher = world["service"].searcher
    p = world["paragraphs"][1]
    result = searcher.search(kb, p["question"], mode=mode, threshold=-1.0)
    assert result.evidence and result.hits
    top = result.hits[0]
    assert top.source == "docs/cmrc_01.txt" and any(a in top.text for a in p["answers"])
    positions = top.metadata["positions"]
    assert positions == list(range(positions[0], positions[0] + len(positions))), "a merged hit is adjacent chunks"
    assert len(top.text) <= s.retrieval.max_hit_chars or len(positions) == 1
    assert top.dense_score is not None and result.best_dense >= top.dense_score  # cosines for BM25 candidates too
    assert len({h.text for h in result.hits}) == len(result.hits)


def test_incremental_rename_duplicate_and_delete_gone_at_next_question(world):
    s, service, docs = world["settings"], world["service"], world["docs"]
    emb = service.searcher.embedder
    again = ingest(docs, "cmrc", s, embedder=emb)
    assert {f.status for f in again.files} == {"unchanged"} and again.chunks_embedded == 0

    (docs / "cmrc_00.txt").rename(docs / "renamed.txt")
    shutil.copy(docs / "cmrc_03.txt", docs / "copy_of_03.txt")
    _age(docs)
    report = ingest(docs, "cmrc", s, embedder=emb, prune=True)
    status = {f.path: f.status for f in report.files}
    assert status["docs/renamed.txt"] == "renamed" and status["docs/copy_of_03.txt"] == "duplicate"
    assert report.chunks_embedded == 0, "renames and duplicates are not re-embedded"
    kb = KnowledgeBase.open("cmrc", s)
    assert "docs/cmrc_00.txt" not in kb.manifest.files
    dup = kb.manifest.files["docs/copy_of_03.txt"]
    assert dup.status == "duplicate" and dup.duplicate_of == "docs/cmrc_03.txt"
    assert kb.sources_for(dup.sha256) == ["docs/cmrc_03.txt", "docs/copy_of_03.txt"]

    p0 = world["paragraphs"][0]
    before = service.answer(p0["question"], "cmrc", params=AnswerParams(threshold=-1.0))
    "".join(before)
    assert _sources(before)[0] == "docs/renamed.txt", "the renamed file answers under its new name"

    p4 = world["paragraphs"][4]
    held = service.knowledge_base("cmrc")
    removed = remove_files("cmrc", ["docs/cmrc_04.txt"], s)
    assert [f.status for f in removed.files] == ["removed"]
    assert held.is_stale()
    after = service.answer(p4["question"], "cmrc", params=AnswerParams(threshold=-1.0))
    "".join(after)
    shown = list(after.sources) + list(after.low_relevance)
    assert shown and "docs/cmrc_04.txt" not in [h.source for h in shown], "a deleted file is gone at the next question"


# ---------------------------------------------------------------------------------------------- Milvus only ------
milvus_only = pytest.mark.skipif(bool(_MILVUS_MISSING), reason=f"{', '.join(_MILVUS_MISSING)} not installed")


_SPEC = IndexSpec("m", 4, "passage: ", 512, 250, 50)   # the small KBs written by hand below


def _add_file(w, sha: str, path: str, text: str, row: int) -> None:
    """One file of one chunk, its vector the `row`-th unit vector of dimension 4 (_SPEC's)."""
    import numpy as np

    from retrieval.store import FileEntry
    from retrieval.types import Chunk

    w.add_content(sha, [Chunk(text, path, sha, 0)], np.eye(4, dtype=np.float32)[row:row + 1])
    w.put(FileEntry(path, sha, 1, 0.0, "ok"))


@milvus_only
def test_milvus_commit_killed_half_way_leaves_the_previous_generation(tmp_path, monkeypatch):
    """A commit that dies after writing its rows but before switching the head: readers keep the old generation and
    never see the new rows; the next writer deletes them. (The failure is raised inside the real commit.)"""
    import numpy as np

    from retrieval import milvus_store

    s = load_settings(paths={"kb_root": str(tmp_path / "kb")}, store={"backend": "milvus"})
    vec = np.eye(4, dtype=np.float32)
    coll = milvus_store.collection_name("k")
    logged = lambda: [p.name for p in (s.kb_root / "milvus.db" / "collections" / coll / "wal").iterdir()]  # noqa: E731
    try:
        with KnowledgeBase.open_writer("k", s) as w:
            w.set_spec(_SPEC)
            _add_file(w, "a" * 64, "d/a.txt", "年假有五天。", 0)
            assert w.commit() == "gen-1"
        assert logged() == [], "a commit flushes Lite's log into indexed segments (else every search rescans it)"
        monkeypatch.setattr(milvus_store, "_write_manifest", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"), KnowledgeBase.open_writer("k", s) as w:
            _add_file(w, "b" * 64, "d/b.txt", "报销要在十五天内提交。", 1)
            w.commit()
        monkeypatch.undo()
        assert logged(), "the dead writer's rows are only in Lite's log"
        kb = KnowledgeBase.open("k", s)
        assert logged() == [], "the first open in a process flushes what a dead writer left in the log"
        assert kb.generation == "gen-1" and list(kb.manifest.files) == ["d/a.txt"]
        found = kb.candidates(vec[1], "报销", mode="hybrid", fetch_k=10, fusion="rrf", rrf_k=60, dense_weight=0.5)
        assert [c.sha256 for c in found.chunks] == ["a" * 64], "rows of a commit that never switched stay hidden"
        c = milvus_store.client(s)
        assert c.query(coll, filter=f'sha == "{"b" * 64}"', output_fields=["pk"]), "left behind by the dead writer"
        with KnowledgeBase.open_writer("k", s):
            pass  # the next writer cleans up
        assert not c.query(coll, filter=f'sha == "{"b" * 64}"', output_fields=["pk"])
    finally:
        milvus_store.close_clients()
    assert not milvus_store._lite_locked(str(s.kb_root / "milvus.db")), "closed: the file is free for another process"


@milvus_only
def test_milvus_lite_file_held_by_another_process_is_a_clear_lock_error(tmp_path):
    """Milvus Lite allows one process per database file; a second process gets KBLockedError saying what to do."""
    from retrieval import milvus_store

    db = tmp_path / "kb" / "milvus.db"
    db.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pymilvus import MilvusClient; MilvusClient(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(120)", str(db)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        s = load_settings(paths={"kb_root": str(tmp_path / "kb")}, store={"backend": "milvus", "uri": str(db)})
        with pytest.raises(KBLockedError, match="一个文件只允许一个进程打开"):
            KnowledgeBase.open_or_create("k", s)
    finally:
        holder.kill()
        holder.wait()
        milvus_store.close_clients()


# ------------------------------------------------------------------------------------- a Milvus server only ------
@pytest.mark.parametrize("world", ["milvus-server"], indirect=True)
def test_the_app_and_ingest_py_share_one_milvus_server(world, tmp_path, cmrc_trial):
    """`store.uri: http://…`: while `ingest.py` (another process) adds a file through the same server, the running
    service keeps answering from the live generation, and the new file answers at the next question after the commit.
    (A Milvus Lite *file* refuses the second process: test_milvus_lite_file_held_by_another_process_...)"""
    from retrieval import milvus_store

    s, service, server = world["settings"], world["service"], world["server"]
    assert not milvus_store.is_lite(s) and milvus_store.engine_is_lite(s), "a server URI, recognised as Lite's server"
    new = cmrc_paragraphs(cmrc_trial, 7)[-1]
    more = write_docs(tmp_path / "more", [new], prefix="new")
    old = world["paragraphs"][1]
    env = {**os.environ, "ZHIWEN_PROFILE": "test", "ZHIWEN_STORE__BACKEND": "milvus", "ZHIWEN_STORE__URI": server.uri,
           "ZHIWEN_PATHS__KB_ROOT": str(s.kb_root), "ZHIWEN_PATHS__MODELS_DIR": str(s.paths.models_dir),
           "ZHIWEN_INGEST__WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "ingest.py"), str(more), "--kb", "cmrc", "--quiet"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answered_meanwhile = 0
    try:
        while proc.poll() is None:
            stream = service.answer(old["question"], "cmrc", params=AnswerParams(threshold=-1.0))
            "".join(stream)
            assert _sources(stream)[0] == "docs/cmrc_01.txt", "reads go on from the live generation"
            answered_meanwhile += 1
        out = proc.stdout.read()
    finally:
        stop_process(proc)
    assert proc.returncode == 0, out
    assert answered_meanwhile >= 1, "the service answered while ingest.py wrote"
    kb = KnowledgeBase.open("cmrc", s)
    added = [p for p in kb.manifest.files if p.startswith("more/")]
    assert added == ["more/new_00.txt"] and kb.manifest.files[added[0]].status == "ok", list(kb.manifest.files)
    after = service.answer(new["question"], "cmrc", params=AnswerParams(threshold=-1.0))
    "".join(after)
    assert _sources(after)[0] == "more/new_00.txt", "the running service sees the other process's commit"
    assert any(a in after.sources[0].text for a in new["answers"])


@milvus_only
def test_a_milvus_server_that_is_down_is_one_sentence_naming_store_uri(tmp_path):
    """The server stops: opening, listing and writing each raise MilvusStoreError naming store.uri within
    store.timeout_s, never a raw gRPC traceback; started again, the knowledge base is all there."""
    from retrieval import milvus_store

    data = tmp_path / "milvus-data"
    server = MilvusLiteServer(data)
    s = load_settings(paths={"kb_root": str(tmp_path / "kb")},
                      store={"backend": "milvus", "uri": server.uri, "timeout_s": 5})
    try:
        _one_file_kb(s)
        milvus_store.close_clients()
        server.stop()
        for call in (lambda: KnowledgeBase.open("k", s), lambda: list_knowledge_bases(s),
                     lambda: KnowledgeBase.open_writer("k", s).__enter__()):
            t = time.monotonic()
            with pytest.raises(milvus_store.MilvusStoreError, match="store.uri") as err:
                call()
            assert server.uri in str(err.value) and "Traceback" not in str(err.value)
            assert time.monotonic() - t < 60
            milvus_store.close_clients()
        server = MilvusLiteServer(data)  # same data folder, new port
        s2 = load_settings(paths={"kb_root": str(tmp_path / "kb")}, store={"backend": "milvus", "uri": server.uri})
        kb = KnowledgeBase.open("k", s2)
        assert list(kb.manifest.files) == ["d/a.txt"] and len(kb) == 1
    finally:
        milvus_store.close_clients()
        server.stop()


def _one_file_kb(s) -> None:
    with KnowledgeBase.open_writer("k", s) as w:
        w.set_spec(_SPEC)
        _add_file(w, "a" * 64, "d/a.txt", "年假有五天。", 0)
        w.commit()
