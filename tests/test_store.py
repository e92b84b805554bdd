"""The knowledge-base store on real folders and real FAISS indexes (no embedder needed: vectors are made here)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.store import (
    FileEntry,
    IndexSpec,
    KBCorruptError,
    KBIncompatibleError,
    KBLockedError,
    KBNameError,
    KBNotFoundError,
    KnowledgeBase,
    delete_knowledge_base,
    list_knowledge_bases,
    validate_kb_name,
)
from retrieval.types import Chunk

DIM = 8
SPEC = IndexSpec(model_id="tiny@abc", dim=DIM, passage_prefix="passage: ", max_seq_length=128, chunk_size=250,
                 chunk_overlap=50)


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _chunks(sha: str, n: int) -> list[Chunk]:
    return [Chunk(text=f"{sha} 第{i}段", source="?", sha256=sha, position=i) for i in range(n)]


def _entry(path: str, sha: str, status: str = "ok", at: str = "2026-01-01T00:00:00+00:00") -> FileEntry:
    return FileEntry(path=path, sha256=sha, size=10, mtime=1.0, status=status, ingested_at=at)


def _add(kb: KnowledgeBase, path: str, sha: str, n: int, seed: int,
         at: str = "2026-01-01T00:00:00+00:00") -> np.ndarray:
    v = _vectors(n, seed)
    with kb.writer() as w:
        w.set_spec(SPEC)
        w.add_content(sha, _chunks(sha, n), v)
        w.put(_entry(path, sha, at=at))
        w.commit()
    return v


def assert_consistent(kb: KnowledgeBase) -> None:
    """index rows == chunks == the union of the manifest's live chunk ids; every chunk's source is a live path."""
    assert kb.index.ntotal == len(kb.chunks)
    assert [c.id for c in kb.chunks] == list(range(len(kb.chunks)))
    live_ids = {i for e in kb.manifest.files.values() if e.status in ("ok", "duplicate") for i in e.chunk_ids}
    assert live_ids == set(range(len(kb.chunks)))
    for c in kb.chunks:
        assert c.source in kb.sources_for(c.sha256)
        assert kb.manifest.files[c.source].status == "ok"


@pytest.mark.parametrize("name", ["default", "知识库", "制度-2024_v1", "a" * 64])
def test_valid_names(name):
    assert validate_kb_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", ".", "..", "a b", "a" * 65, "名字.txt", "x\n"])
def test_invalid_names_are_refused_with_a_sentence(name, tmp_settings):
    with pytest.raises(KBNameError, match="无效"):
        validate_kb_name(name)
    with pytest.raises(KBNameError):
        KnowledgeBase.open(name, tmp_settings)
    assert list(tmp_settings.kb_root.iterdir()) == []


def test_create_open_list_delete(tmp_settings):
    with pytest.raises(KBNotFoundError, match="ingest.py"):
        KnowledgeBase.open("missing", tmp_settings)
    kb = KnowledgeBase.create("手册", tmp_settings)
    assert kb.sources_dir.is_dir() and len(kb) == 0 and kb.manifest.files == {}
    assert KnowledgeBase.open("手册", tmp_settings).generation == kb.generation
    KnowledgeBase.create("b", tmp_settings)
    (tmp_settings.kb_root / "not a kb").mkdir()
    assert list_knowledge_bases(tmp_settings) == ["b", "手册"]
    delete_knowledge_base("手册", tmp_settings)
    assert list_knowledge_bases(tmp_settings) == ["b"]
    assert kb.is_stale()
    with pytest.raises(KBNotFoundError):
        KnowledgeBase.open("手册", tmp_settings)


def test_commit_round_trip_and_generations(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    v1 = _add(kb, "docs/a.txt", "a" * 64, 3, seed=1)
    assert kb.is_stale()
    kb1 = kb.reopen()
    assert not kb1.is_stale()
    assert [c.text for c in kb1.chunks] == [f"{'a' * 64} 第{i}段" for i in range(3)]
    assert np.allclose(kb1.index.reconstruct_n(0, 3), v1)
    # Search works on the stored index: each vector finds its own chunk first.
    _, idx = kb1.index.search(v1, 1)
    assert idx[:, 0].tolist() == [0, 1, 2]
    assert kb1.manifest.spec == SPEC and kb1.manifest.files["docs/a.txt"].chunk_ids == (0, 1, 2)
    assert_consistent(kb1)

    v2 = _add(kb1, "docs/b.txt", "b" * 64, 2, seed=2)
    kb2 = kb1.reopen()
    assert_consistent(kb2)
    assert np.allclose(kb2.index.reconstruct_n(0, 5), np.vstack([v1, v2]))
    # The previous generation stays for readers that are still loading it; older ones are collected.
    gens = sorted(p.name for p in kb2.path.glob("gen-*"))
    assert gens == [kb1.generation, kb2.generation]
    assert (kb2.path / "CURRENT").read_text().strip() == kb2.generation


def test_duplicates_share_chunks_until_the_last_path_goes(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    sha = "c" * 64
    _add(kb, "docs/one.txt", sha, 2, seed=3, at="2026-01-01T00:00:00+00:00")
    with kb.writer() as w:
        w.put(_entry("docs/two.txt", sha, status="duplicate", at="2026-01-02T00:00:00+00:00"))
        w.commit()
    kb = kb.reopen()
    assert len(kb) == 2, "identical content is stored once"
    two = kb.manifest.files["docs/two.txt"]
    assert two.status == "duplicate" and two.duplicate_of == "docs/one.txt" and two.chunk_ids == (0, 1)
    assert kb.sources_for(sha) == ["docs/one.txt", "docs/two.txt"]
    assert_consistent(kb)

    with kb.writer() as w:  # deleting the owner keeps the chunks: the duplicate takes them over
        w.remove("docs/one.txt")
        w.commit()
    kb = kb.reopen()
    assert len(kb) == 2 and kb.manifest.files["docs/two.txt"].status == "ok"
    assert {c.source for c in kb.chunks} == {"docs/two.txt"}
    assert_consistent(kb)

    with kb.writer() as w:  # deleting the last path drops them
        w.remove("docs/two.txt")
        w.commit()
    kb = kb.reopen()
    assert len(kb) == 0 and kb.index.ntotal == 0 and kb.sources_for(sha) == []


def test_removing_a_file_renumbers_rows_consistently(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 2, seed=1)
    vb = _add(kb, "d/b.txt", "b" * 64, 3, seed=2)
    with kb.writer() as w:
        w.remove("d/a.txt")
        w.commit()
    kb = kb.reopen()
    assert_consistent(kb)
    assert [c.source for c in kb.chunks] == ["d/b.txt"] * 3
    assert np.allclose(kb.index.reconstruct_n(0, 3), vb), "vectors move with their chunks"
    assert kb.chunks_for("b" * 64) == kb.chunks


def test_failed_entries_are_recorded_without_chunks(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    with kb.writer() as w:
        w.set_spec(SPEC)
        w.put(FileEntry("d/x.pdf", "f" * 64, 5, 1.0, "failed", reason="文件已加密"))
        with pytest.raises(ValueError, match="no chunks stored"):
            w.put(_entry("d/y.txt", "9" * 64))
        w.commit()
    kb = kb.reopen()
    assert kb.manifest.files["d/x.pdf"].reason == "文件已加密" and len(kb) == 0


def test_second_writer_is_refused_naming_the_holder(tmp_settings):
    import os

    kb = KnowledgeBase.create("kb", tmp_settings)
    with kb.writer():
        with pytest.raises(KBLockedError, match=f"pid {os.getpid()}"), KnowledgeBase.open("kb", tmp_settings).writer():
            pass
        with pytest.raises(KBLockedError):
            delete_knowledge_base("kb", tmp_settings)
    with kb.writer():  # released on exit
        pass


def test_writer_can_wait_for_the_lock(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    held, release = threading.Event(), threading.Event()

    def holder():
        with kb.writer():
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)
    threading.Timer(0.3, release.set).start()
    with KnowledgeBase.open("kb", tmp_settings).writer(timeout=60) as w:  # queues instead of failing
        w.set_spec(SPEC)
        assert w.commit() is not None
    t.join()


def test_incompatible_spec_needs_rebuild(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 2, seed=1)
    other = IndexSpec(**{**SPEC.to_json(), "model_id": "bge-small-zh@123", "chunk_size": 400})
    with kb.writer() as w:
        with pytest.raises(KBIncompatibleError, match="--rebuild") as e:
            w.set_spec(other)
        assert "model_id" in str(e.value) and "chunk_size" in str(e.value)
        w.set_spec(other, rebuild=True)
        assert w.files == {}
        w.commit()
    kb = kb.reopen()
    assert kb.manifest.spec == other and len(kb) == 0


def test_a_killed_writer_leaves_the_previous_generation(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 2, seed=1)
    kb = kb.reopen()
    # What a writer killed mid-commit leaves behind: a half-written temp dir, and a renamed generation that
    # CURRENT never pointed to.
    (kb.path / ".tmp-gen-9-123-abcd").mkdir()
    (kb.path / ".tmp-gen-9-123-abcd" / "index.faiss").write_bytes(b"partial")
    (kb.path / "gen-7").mkdir()
    (kb.path / "gen-7" / "manifest.json").write_text("{")
    (kb.path / "CURRENT.tmp").write_text("gen-7")
    again = KnowledgeBase.open("kb", tmp_settings)
    assert again.generation == kb.generation and len(again) == 2
    with again.writer() as w:  # the next writer cleans up, then commits normally
        assert not (kb.path / "gen-7").exists() and not (kb.path / ".tmp-gen-9-123-abcd").exists()
        w.remove("d/a.txt")
        w.commit()
    assert len(again.reopen()) == 0


def segment_files(gen_dir: Path, suffix: str) -> list[Path]:
    """The segment files of a generation ending in `suffix` (".faiss", ".chunks.jsonl", ".npz"), oldest segment first
    (the manifest's order)."""
    order = [i["id"] for i in json.loads((gen_dir / "manifest.json").read_text(encoding="utf-8"))["segments"]]
    found = [p for p in gen_dir.iterdir() if p.name.endswith(suffix)]
    return sorted(found, key=lambda p: order.index(p.name.split(".")[0]))


def set_checksum(gen_dir: Path, file: Path) -> None:
    """Record `file`'s current bytes in the manifest, as if the damage had been committed (the other checks act)."""
    import hashlib

    m = json.loads((gen_dir / "manifest.json").read_text(encoding="utf-8"))
    for seg in m["segments"]:
        if file.name in seg["checksums"]:
            seg["checksums"][file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    (gen_dir / "manifest.json").write_text(json.dumps(m, ensure_ascii=False), encoding="utf-8")


def test_damaged_generation_is_reported_not_half_loaded(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 3, seed=1)
    kb = kb.reopen()
    gen_dir = kb.path / kb.generation
    [chunks_file] = segment_files(gen_dir, ".chunks.jsonl")
    chunks_file.write_text("".join(chunks_file.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(KBCorruptError, match="校验和"):  # the checksum written at commit finds it first
        KnowledgeBase.open("kb", tmp_settings)
    set_checksum(gen_dir, chunks_file)
    with pytest.raises(KBCorruptError, match="2 chunks for 3 rows"):
        KnowledgeBase.open("kb", tmp_settings)


def assert_no_pickle(kb_path: Path) -> None:
    """Every file of a KB is FAISS, JSON/JSONL, plain text or a numpy .npz of plain arrays (read with
    allow_pickle=False), and none starts like a pickle."""
    for p in kb_path.rglob("*"):
        if not p.is_file():
            continue
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{p} is a pickle"
        assert p.suffix not in (".pkl", ".pickle", ".npy", ".joblib"), p
        if p.suffix == ".faiss":
            faiss.read_index(str(p))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                assert all(z[k].dtype != object for k in z.files), p
        elif p.suffix == ".json":  # manifest.json and its parts
            json.loads(p.read_text(encoding="utf-8"))
        elif p.name.endswith(".jsonl"):
            for line in p.read_text(encoding="utf-8").splitlines():
                json.loads(line)
        elif p.name == "CURRENT":
            assert p.read_text().strip().startswith("gen-")


def test_no_pickle_anywhere(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 2, seed=1)
    _add(kb, "d/b.txt", "b" * 64, 2, seed=2)
    assert_no_pickle(kb.path)


def test_open_is_cheap_enough_and_never_serves_deleted_chunks(tmp_settings):
    kb = KnowledgeBase.create("kb", tmp_settings)
    _add(kb, "d/a.txt", "a" * 64, 2, seed=1)
    reader = KnowledgeBase.open("kb", tmp_settings)
    with kb.writer() as w:
        w.remove("d/a.txt")
        w.commit()
    assert reader.is_stale()
    fresh = reader.reopen()
    assert not fresh.is_stale() and all(c.sha256 != "a" * 64 for c in fresh.chunks)
