"""Segments (issue 10, part 1): one-file commits write only what changed, BM25 comes from stored tokens, IVF above a
threshold, old generations still read, kill -9 at any moment leaves a loadable knowledge base.

Real folders, real FAISS, real bm25s as the reference for the BM25 scores; vectors are made here (no embedder).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from configs import PROJECT_ROOT, load_settings
from retrieval import bm25 as bm25_mod
from retrieval.bm25 import BM25Index
from retrieval.segments import SEGMENTS
from retrieval.store import MANIFEST_FORMAT, MAX_SEGMENTS, FileEntry, IndexSpec, KBCorruptError, KnowledgeBase
from retrieval.types import Chunk
from tests.test_store import assert_consistent, assert_no_pickle

DIM = 8
SPEC = IndexSpec(model_id="tiny@abc", dim=DIM, passage_prefix="passage: ", max_seq_length=128, chunk_size=250,
                 chunk_overlap=50)
WORDS = ["年假", "报销", "差旅", "住宿", "实验室", "安全", "消防", "演练", "工龄", "审批", "合同", "发票"]


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _text(seed: int, i: int) -> str:
    rng = np.random.default_rng(seed * 1000 + i)
    return "，".join("".join(rng.choice(WORDS, 3)) for _ in range(4)) + "。"


def _file(w, path: str, seed: int, n: int = 3) -> str:
    sha = f"{seed:064x}"
    chunks = [Chunk(text=_text(seed, i), source=path, sha256=sha, position=i) for i in range(n)]
    w.add_content(sha, chunks, _vectors(n, seed))
    w.put(FileEntry(path, sha, 10, 1.0, "ok", ingested_at=f"2026-01-01T00:00:{seed % 60:02d}+00:00"))
    return sha


def _written_bytes(gen: Path) -> int:
    """Bytes of the files a commit wrote into generation folder `gen` (the others are hard links: st_nlink > 1)."""
    return sum(p.stat().st_size for p in gen.iterdir() if p.stat().st_nlink == 1)


def _manifest_bytes(gen: Path) -> int:
    """manifest.json and its parts (file table, content map) as they are in `gen`."""
    return sum(p.stat().st_size for p in gen.glob("manifest*.json"))


def _kb_with(settings, n_files: int, name: str = "kb") -> KnowledgeBase:
    kb = KnowledgeBase.create(name, settings)
    with kb.writer() as w:
        w.set_spec(SPEC)
        for i in range(n_files):
            _file(w, f"d/f{i}.txt", i + 1)
        w.commit()
    return kb.reopen()


def _inode(p: Path) -> int:
    return p.stat().st_ino


def test_one_file_commit_writes_one_small_segment_and_links_the_rest(tmp_settings):
    kb = _kb_with(tmp_settings, 40)
    base = {p.name: p for p in (kb.path / kb.generation).iterdir() if p.name.startswith("seg-")}
    base_bytes = sum(p.stat().st_size for p in base.values())
    with kb.writer() as w:
        _file(w, "d/new.txt", 99)
        w.commit()
        added = w.last_commit_bytes
    kb2 = kb.reopen()
    gen = kb2.path / kb2.generation
    for name, p in base.items():  # the old segment's files are the same inodes: nothing rewritten
        assert _inode(gen / name) == _inode(p)
    assert len(json.loads((gen / "manifest.json").read_text())["segments"]) == 2
    assert added == _written_bytes(gen), "last_commit_bytes counts exactly the files that are not hard links"
    assert added < base_bytes / 5 + _manifest_bytes(gen), (added, base_bytes)
    assert_consistent(kb2)
    assert_no_pickle(kb2.path)
    # the new file is searchable, dense and BM25
    new_rows = [c.id for c in kb2.chunks if c.source == "d/new.txt"]
    _, idx = kb2.index.search(_vectors(3, 99), 1)
    assert idx[:, 0].tolist() == new_rows
    word_rows = {r for r, _ in kb2.bm25.search(kb2.chunks[new_rows[0]].text, 50)}
    assert new_rows[0] in word_rows

    with kb2.writer() as w:  # a delete writes only the manifest; the dead rows disappear from both searches
        w.remove("d/new.txt")
        w.commit()
        gen = w.path / w.live_generation
        assert not [p for p in gen.glob("seg-*") if p.stat().st_nlink == 1], "a delete writes no segment"
        assert w.last_commit_bytes == _written_bytes(gen) == _manifest_bytes(gen)
    kb3 = kb2.reopen()
    assert_consistent(kb3)
    assert all(c.source != "d/new.txt" for c in kb3.chunks)
    _, idx = kb3.index.search(_vectors(3, 99), 5)
    assert all(kb3.chunks[int(r)].source != "d/new.txt" for r in idx.ravel() if r >= 0)


def _reference_scores(chunks: list[Chunk], query: str) -> np.ndarray:
    return BM25Index(chunks).scores(query)


def test_the_file_table_is_in_parts_and_a_one_file_commit_rewrites_only_its_own(tmp_settings):
    """600 files: the file table and the content map are each cut into 4 parts; adding, replacing or deleting one
    file writes one part of each (plus manifest.json) and hard-links the rest; the manifest read back is complete."""
    kb = _kb_with(tmp_settings, 600)
    gen = kb.path / kb.generation
    m = json.loads((gen / "manifest.json").read_text())
    assert m["part_buckets"] == 4 and "files" not in m and len(m["parts"]) == 8
    assert len(kb.manifest.files) == 600 and list(kb.manifest.files) == sorted(kb.manifest.files)
    for step in ("add", "replace", "delete"):
        before = kb.manifest
        with kb.writer() as w:
            if step == "delete":
                w.remove("d/new.txt")
            else:
                _file(w, "d/new.txt", 9000 if step == "add" else 9001)
            w.commit()
        kb = kb.reopen()
        gen = kb.path / kb.generation
        written = [p.name.split("-")[0] for p in gen.glob("manifest.*.json") if p.stat().st_nlink == 1]
        # the file's own part, and the parts of the contents that came or went (a replace: the old and the new one)
        assert written.count("manifest.files") == 1 and 1 <= written.count("manifest.contents") <= 2, (step, written)
        assert _written_bytes(gen) < _manifest_bytes(gen) / 2 + sum(p.stat().st_size for p in gen.glob("seg-*")
                                                                     if p.stat().st_nlink == 1)
        expected = {p: e for p, e in before.files.items() if p != "d/new.txt"}
        got = {p: e for p, e in kb.manifest.files.items() if p != "d/new.txt"}
        assert got.keys() == expected.keys() and all(got[p].sha256 == expected[p].sha256 for p in got)
        assert ("d/new.txt" in kb.manifest.files) == (step != "delete")
        assert_consistent(kb)
    SEGMENTS._items.clear()  # a fresh process: every part read and verified again
    assert KnowledgeBase.open("kb", tmp_settings).manifest.files == kb.manifest.files


def test_damaged_or_misplaced_manifest_parts_are_refused(tmp_settings):
    import hashlib

    kb = _kb_with(tmp_settings, 600)
    gen = kb.path / kb.generation
    part = sorted(gen.glob("manifest.files-*.json"))[0]
    good = part.read_bytes()
    part.write_bytes(good.replace(b'"status":"ok"', b'"status":"xx"', 1))
    with pytest.raises(KBCorruptError, match="校验和"):
        KnowledgeBase.open("kb", tmp_settings)
    # the same bytes recorded as committed, but an entry moved to another bucket's part: refused too
    doc = json.loads(good)
    other = next(p for p in sorted(gen.glob("manifest.files-*.json")) if p != part)
    moved = next(iter(json.loads(other.read_bytes())["entries"].items()))
    doc["entries"][moved[0]] = moved[1]
    m = json.loads((gen / "manifest.json").read_text())
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    part.write_bytes(data)
    for p in m["parts"]:
        if p["file"] == part.name:
            p["sha256"], p["count"] = hashlib.sha256(data).hexdigest(), len(doc["entries"])
            p["file"] = part.name  # the name keeps the old hash prefix: refused before the bucket check
    (gen / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(KBCorruptError, match="分片条目"):
        KnowledgeBase.open("kb", tmp_settings)
    renamed = part.with_name(f"manifest.files-{hashlib.sha256(data).hexdigest()[:20]}.json")
    part.rename(renamed)
    for p in m["parts"]:
        if p["file"] == part.name:
            p["file"] = renamed.name
    (gen / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(KBCorruptError, match="wrong bucket"):
        KnowledgeBase.open("kb", tmp_settings)


def test_a_format_2_generation_is_read_and_its_next_commit_writes_parts(tmp_settings):
    kb = _kb_with(tmp_settings, 5)
    gen = kb.path / kb.generation
    inline = {**kb.manifest.to_json(), "format": 2}
    inline.pop("parts", None)
    for p in gen.glob("manifest.*.json"):
        p.unlink()
    (gen / "manifest.json").write_text(json.dumps(inline, ensure_ascii=False), encoding="utf-8")
    old = KnowledgeBase.open("kb", tmp_settings)
    assert old.manifest.format == 2 and old.manifest.files == kb.manifest.files
    with old.writer() as w:
        _file(w, "d/new.txt", 77)
        w.commit()
    new = old.reopen()
    m = json.loads((new.path / new.generation / "manifest.json").read_text())
    assert m["format"] == MANIFEST_FORMAT and "files" not in m and len(new.manifest.files) == 6
    assert_consistent(new)


def test_bm25_from_stored_tokens_equals_bm25s_over_the_live_chunks(tmp_settings):
    kb = _kb_with(tmp_settings, 12)
    with kb.writer() as w:  # a second segment, a replaced content and a removed file: dead rows in segment 1
        for i in range(3):
            _file(w, f"d/g{i}.txt", 50 + i, n=2)
        w.remove("d/f3.txt")
        w.remove("d/f4.txt")
        w.commit()
    kb = kb.reopen()
    assert len(kb._layout.segments) == 2 and kb.index.ntotal == len(kb.chunks) == (12 - 2) * 3 + 6
    chunks = list(kb.chunks)
    for query in ["年假和报销", "实验室消防演练", "发票合同审批", "没有的词"]:
        ours, ref = kb.bm25.scores(query), _reference_scores(chunks, query)
        assert np.allclose(ours, ref, rtol=1e-4, atol=1e-5), query
        assert [r for r, _ in kb.bm25.search(query, 5)] == [r for r, _ in BM25Index(chunks).search(query, 5)]


def test_many_commits_are_merged_and_answers_stay_the_same(tmp_settings):
    kb = _kb_with(tmp_settings, 2)
    for i in range(3 * MAX_SEGMENTS):
        with kb.writer() as w:
            _file(w, f"d/n{i}.txt", 100 + i, n=2)
            if i % 4 == 3:
                w.remove(f"d/n{i - 2}.txt")
            w.commit()
    kb = kb.reopen()
    gen = kb.path / kb.generation
    assert len(json.loads((gen / "manifest.json").read_text())["segments"]) <= MAX_SEGMENTS
    assert_consistent(kb)
    expected = {f"d/f{i}.txt" for i in range(2)} | {f"d/n{i}.txt" for i in range(3 * MAX_SEGMENTS)} - {
        f"d/n{i - 2}.txt" for i in range(3 * MAX_SEGMENTS) if i % 4 == 3}
    assert {c.source for c in kb.chunks} == expected
    for i in range(3 * MAX_SEGMENTS):  # every stored vector still finds its own chunk
        path = f"d/n{i}.txt"
        if path in expected:
            _, idx = kb.index.search(_vectors(2, 100 + i), 1)
            assert [kb.chunks[int(r)].source for r in idx[:, 0]] == [path, path]
    # only the two newest generations are kept; the segment files in use survive their collection
    assert sorted(p.name for p in kb.path.glob("gen-*"))[-1] == kb.generation
    assert len(list(kb.path.glob("gen-*"))) == 2


def test_a_tokenizer_change_retokenises_once(tmp_settings, monkeypatch):
    kb = _kb_with(tmp_settings, 4)
    gen = kb.path / kb.generation
    [old_bm25] = [p for p in gen.iterdir() if p.name.endswith(".npz")]
    assert bm25_mod.TOKENIZER_VERSION in old_bm25.name
    original = bm25_mod.tokenize
    calls = []

    def bigrams(text: str) -> list[str]:  # a new tokenizer, e.g. with character bigrams
        calls.append(text)
        return original(text) + [text[i:i + 2] for i in range(len(text) - 1)]

    monkeypatch.setattr(bm25_mod, "tokenize", bigrams)
    monkeypatch.setattr(bm25_mod, "TOKENIZER_VERSION", "test-bigrams-2")
    SEGMENTS._items.clear()
    fresh = KnowledgeBase.open("kb", tmp_settings)
    assert len(calls) == len(fresh.chunks), "opened with another tokenizer: re-tokenised in memory"
    assert fresh.bm25.search("假和", 5), "a bigram only the new tokenizer makes is found"
    with fresh.writer() as w:
        _file(w, "d/new.txt", 77)
        w.commit()
    kb2 = fresh.reopen()
    gen2 = kb2.path / kb2.generation
    names = [p.name for p in gen2.iterdir()]
    assert any(n.endswith(".bm25.test-bigrams-2.npz") and n.startswith(old_bm25.name.split(".")[0]) for n in names)
    assert not any(n.endswith(f".bm25.{original.__module__ and 'jieba-search-1'}.npz") for n in names)
    faiss_file = next(p for p in gen.iterdir() if p.name.endswith(".faiss"))
    assert _inode(gen2 / faiss_file.name) == _inode(faiss_file), "vectors are not rewritten for a tokenizer change"
    calls.clear()
    SEGMENTS._items.clear()
    KnowledgeBase.open("kb", tmp_settings)
    assert calls == [], "stored with the new version: nothing re-tokenised on the next open"


def test_ivf_index_above_the_threshold(tmp_settings, monkeypatch):
    monkeypatch.setenv("ZHIWEN_STORE__FAISS_INDEX", "auto")
    monkeypatch.setenv("ZHIWEN_STORE__IVF_THRESHOLD", "1000")
    monkeypatch.setenv("ZHIWEN_STORE__IVF_NPROBE", "64")
    settings = load_settings()
    kb = KnowledgeBase.create("kb", settings)
    with kb.writer() as w:  # below the threshold: exact
        w.set_spec(SPEC)
        _file(w, "d/small.txt", 1, n=10)
        w.commit()
    kb = kb.reopen()
    assert [s.info.index for s in kb._layout.segments] == ["flat"]
    with kb.writer() as w:  # 2,000 chunks in one commit: that segment is IVF
        sha = "e" * 64
        vecs = _vectors(2000, 5)
        w.add_content(sha, [Chunk(text=f"第{i}段", source="d/big.txt", sha256=sha, position=i) for i in range(2000)],
                      vecs)
        w.put(FileEntry("d/big.txt", sha, 10, 1.0, "ok", ingested_at="2026-01-02T00:00:00+00:00"))
        w.commit()
    kb = kb.reopen()
    assert sorted(s.info.index for s in kb._layout.segments) == ["flat", "ivf"]
    assert isinstance(kb._layout.segments[-1].index, faiss.IndexIVFFlat)
    assert_consistent(kb)
    big = [c.id for c in kb.chunks if c.source == "d/big.txt"]
    assert np.allclose(kb.index.reconstruct_n(big[0], 5), vecs[:5])
    _, idx = kb.index.search(vecs[:200], 1)  # each vector finds itself through the inverted lists
    assert (idx[:, 0] == np.asarray(big[:200])).mean() >= 0.98


def _write_format_1(kb_path: Path, chunks: list[Chunk], vectors: np.ndarray) -> None:
    """A generation as the store wrote it before segments: one index.faiss + chunks.jsonl, manifest format 1."""
    gen = kb_path / "gen-3"
    gen.mkdir(parents=True)
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    faiss.write_index(index, str(gen / "index.faiss"))
    (gen / "chunks.jsonl").write_text("".join(json.dumps({
        "id": c.id, "text": c.text, "source": c.source, "sha256": c.sha256, "position": c.position, "page": None,
        "heading_path": [], "metadata": {}}, ensure_ascii=False) + "\n" for c in chunks), encoding="utf-8")
    files = {"d/a.txt": {"path": "d/a.txt", "sha256": "a" * 64, "size": 1, "mtime": 1.0, "status": "ok",
                         "chunk_ids": [0, 1]},
             "d/b.txt": {"path": "d/b.txt", "sha256": "b" * 64, "size": 1, "mtime": 1.0, "status": "ok",
                         "chunk_ids": [2]}}
    (gen / "manifest.json").write_text(json.dumps({"format": 1, "generation": 3, "spec": SPEC.to_json(),
                                                   "files": files}), encoding="utf-8")
    (kb_path / "CURRENT").write_text("gen-3\n")


def test_the_searcher_keeps_only_the_live_generation_of_a_kb(tmp_settings):
    """After a commit the searcher's per-generation cache drops the old generation (whose BM25 view holds its
    segments: after a merge, a second copy of the KB); another KB's entry stays."""
    from retrieval.retriever import HybridSearcher

    searcher = HybridSearcher(tmp_settings.retrieval)  # BM25 only: no embedding model needed
    kb, other = _kb_with(tmp_settings, 3), _kb_with(tmp_settings, 2, name="other")
    for k in (kb, other):
        searcher.search(k, "年假", mode="bm25")
    with kb.writer() as w:
        _file(w, "d/new.txt", 50)
        w.commit()
    kb2 = kb.reopen()
    searcher.search(kb2, "年假", mode="bm25")
    held = searcher._cache.keys()
    assert (str(kb2.path), kb2.generation) in held and (str(kb.path), kb.generation) not in held
    assert (str(other.path), other.generation) in held


def test_auto_index_follows_the_size_of_the_kb_not_of_the_segment(tmp_settings, monkeypatch):
    """store.faiss_index auto: once the KB reaches ivf_threshold, a new segment of at least IVF_MIN_ROWS chunks is
    IVF even when it is smaller than the threshold (a KB built by many commits); a one-file segment stays exact."""
    monkeypatch.setenv("ZHIWEN_STORE__FAISS_INDEX", "auto")
    monkeypatch.setenv("ZHIWEN_STORE__IVF_THRESHOLD", "2500")
    settings = load_settings()
    kb = KnowledgeBase.create("kb", settings)

    def add(path: str, sha: str, n: int, seed: int) -> None:
        with kb.writer() as w:
            w.set_spec(SPEC)
            w.add_content(sha, [Chunk(text=f"第{i}段", source=path, sha256=sha, position=i) for i in range(n)],
                          _vectors(n, seed))
            w.put(FileEntry(path, sha, 10, 1.0, "ok", ingested_at=f"2026-01-0{seed}T00:00:00+00:00"))
            w.commit()

    add("d/a.txt", "a" * 64, 2000, 1)  # KB 2,000 < 2,500: exact
    add("d/b.txt", "b" * 64, 1200, 2)  # KB 3,200: this 1,200-chunk segment is IVF
    add("d/c.txt", "c" * 64, 3, 3)     # below IVF_MIN_ROWS: exact
    kb = kb.reopen()
    assert [s.info.index for s in kb._layout.segments] == ["flat", "ivf", "flat"]
    assert_consistent(kb)


def test_a_format_1_generation_is_read_and_rewritten_as_segments(tmp_settings):
    chunks = [Chunk(text="年假五天。", source="d/a.txt", sha256="a" * 64, position=0, id=0),
              Chunk(text="报销十五天内。", source="d/a.txt", sha256="a" * 64, position=1, id=1),
              Chunk(text="实验室消防演练。", source="d/b.txt", sha256="b" * 64, position=0, id=2)]
    vectors = _vectors(3, 7)
    _write_format_1(tmp_settings.kb_root / "old", chunks, vectors)
    kb = KnowledgeBase.open("old", tmp_settings)
    assert [c.text for c in kb.chunks] == [c.text for c in chunks]
    assert kb.bm25.search("消防演练", 1)[0][0] == 2
    with kb.writer() as w:
        _file(w, "d/c.txt", 9)
        w.commit()
    kb2 = kb.reopen()
    m = json.loads((kb2.path / kb2.generation / "manifest.json").read_text())
    assert m["format"] == MANIFEST_FORMAT and len(m["segments"]) == 1 and m["parts"]
    assert_consistent(kb2)
    assert np.allclose(kb2.index.reconstruct_n(0, 3), vectors)
    assert {c.source for c in kb2.chunks} == {"d/a.txt", "d/b.txt", "d/c.txt"}


_KILL_LOOP = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from configs import load_settings
from tests.test_segments import _file, SPEC
from retrieval.store import KnowledgeBase
settings = load_settings()
i = 0
while True:
    with KnowledgeBase.open_writer("kb", settings, timeout=None) as w:
        w.set_spec(SPEC)
        _file(w, f"d/k{{i}}.txt", 1000 + i, n=4)
        if i > 3:
            w.remove(f"d/k{{i - 3}}.txt")
        w.commit()
    i += 1
    print(i, flush=True)
"""


def test_kill_9_at_any_moment_leaves_a_loadable_kb(tmp_settings):
    """A writer committing in a loop (new segments, deletes, merges) is killed with SIGKILL at random moments."""
    env = {**os.environ, "ZHIWEN_PATHS__KB_ROOT": str(tmp_settings.kb_root)}
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", _KILL_LOOP.format(root=str(PROJECT_ROOT))], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
        try:
            assert p.stdout.readline(), p.stderr.read()  # at least one commit of this run
            time.sleep(float(rng.uniform(0, 0.5)))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            p.stdout.close()
            p.stderr.close()
        SEGMENTS._items.clear()
        kb = KnowledgeBase.open("kb", tmp_settings)
        assert_consistent(kb)
        assert kb.manifest.files and kb.manifest.generation > seen, "each run committed before it was killed"
        seen = kb.manifest.generation
        for path, e in kb.manifest.files.items():  # every live file still finds its own chunks by vector
            _, idx = kb.index.search(_vectors(4, int(e.sha256, 16)), 1)
            assert {kb.chunks[int(r)].source for r in idx[:, 0]} == {path}
    # The last kill may have left a half-written temp generation (an empty JSON file in it): readers never look at
    # it, and the next writer collects it, as it does here, before every remaining file is checked.
    with KnowledgeBase.open_writer("kb", tmp_settings):
        pass
    assert not [p.name for p in (tmp_settings.kb_root / "kb").iterdir() if p.name.startswith(".tmp-")]
    assert_no_pickle(tmp_settings.kb_root / "kb")


@pytest.mark.parametrize("n_files", [0, 1])
def test_empty_and_tiny_kbs(tmp_settings, n_files):
    kb = _kb_with(tmp_settings, n_files)
    assert len(kb.chunks) == kb.index.ntotal == 3 * n_files
    d, i = kb.index.search(_vectors(1, 1), 5)
    assert (i[0] >= 0).sum() == 3 * n_files
    assert kb.bm25.search("年假", 5) == [] or n_files
