"""Damaged knowledge bases (issue 13, items 1, 4, 5, 6): refused with one sentence and the repair command, never
written over, repaired by `ingest.py --repair`, and listed next to the healthy ones.

Real folders, real FAISS files, the real tiny sentence-transformers embedder, `ingest.py`'s own main() (in
process: its exit code and stderr are what a user sees) and the real FastAPI app for GET /api/kbs.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from configs import PROJECT_ROOT, load_settings
from retrieval.store import KBCorruptError, KnowledgeBase, repair_knowledge_base
from tests.support.tiny_embedder import build_tiny_embedder
from tests.test_store import segment_files, set_checksum

TEXT = ("第{n}章 总则\n\n本办法适用于公司全体员工。员工请假应当提前申请，经部门负责人批准后方可休假。"
        "年假天数根据工龄计算，工龄满一年不满十年的，年假五天；满十年不满二十年的，年假十天。\n\n"
        "差旅费用报销须在出差结束后十五个工作日内提交。住宿标准按照城市等级执行，一线城市每晚不超过六百元。")


def _cli_main():
    spec = importlib.util.spec_from_file_location("ingest_cli", PROJECT_ROOT / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


ingest_main = _cli_main()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-embedder")


@pytest.fixture()
def settings(tmp_settings, tiny_model, monkeypatch):
    monkeypatch.setenv("ZHIWEN_EMBEDDING__MODEL", str(tiny_model))
    monkeypatch.setenv("ZHIWEN_INGEST__WORKERS", "1")
    return load_settings()


def _folder(root: Path, name: str, n: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"f{i}.txt").write_text(TEXT.format(n=i), encoding="utf-8")
    return d


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = ingest_main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def two_generations(settings, tmp_path, capsys):
    """KB "kb" with 3 files in its live generation and 2 in the previous one; returns (folder, live gen).
    The live generation has two segments: the first (shared with the previous generation by hard link) and the
    third file's own, with several chunks."""
    docs = _folder(tmp_path, "docs", 2)
    assert _run(capsys, str(docs), "--kb", "kb")[0] == 0
    (docs / "f2.txt").write_text("\n\n".join(TEXT.format(n=2 + i) for i in range(3)), encoding="utf-8")
    assert _run(capsys, str(docs), "--kb", "kb")[0] == 0
    kb = KnowledgeBase.open("kb", settings)
    assert len(kb.manifest.files) == 3
    return docs, kb.generation


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.parent != path}  # every generation's files (not CURRENT / the lock files)


def _one_sentence(err: str) -> None:
    assert "Traceback" not in err and err.strip().count("\n") == 0, err


# -- 1. a damaged CURRENT never costs a generation ---------------------------------------------------------------
@pytest.mark.parametrize("current", ["../../../etc", "gen-99", None])
def test_damaged_current_is_refused_keeping_every_generation_then_repaired(settings, two_generations, capsys,
                                                                           current):
    docs, live = two_generations
    kb_path = settings.kb_root / "kb"
    if current is None:
        (kb_path / "CURRENT").unlink()
    else:
        (kb_path / "CURRENT").write_text(current)
    before = _snapshot(kb_path)
    (docs / "new.txt").write_text(TEXT.format(n=7), encoding="utf-8")

    rc, out, err = _run(capsys, str(docs), "--kb", "kb")
    assert rc == 2, out + err
    _one_sentence(err)
    assert "--repair" in err and "损坏" in err
    assert _snapshot(kb_path) == before, "a refused ingest changes no generation"
    with pytest.raises(KBCorruptError, match="--repair"):
        KnowledgeBase.open("kb", settings)

    rc, out, err = _run(capsys, "--repair", "--kb", "kb")
    assert rc == 0, err
    assert live in out and (kb_path / "CURRENT").read_text().strip() == live
    kb = KnowledgeBase.open("kb", settings)
    assert len(kb.manifest.files) == 3, "nothing lost"

    assert _run(capsys, str(docs), "--kb", "kb")[0] == 0
    assert set(KnowledgeBase.open("kb", settings).manifest.files) == {f"docs/{n}" for n in
                                                                      ("f0.txt", "f1.txt", "f2.txt", "new.txt")}


def test_repair_skips_a_damaged_newest_generation_and_leaves_a_good_current_alone(settings, two_generations):
    _, live = two_generations
    kb_path = settings.kb_root / "kb"
    previous = f"gen-{int(live[4:]) - 1}"
    assert (kb_path / previous).is_dir()
    r = repair_knowledge_base("kb", settings)
    assert not r.changed and r.generation == live and "无需修复" in r.describe()

    newest = segment_files(kb_path / live, ".faiss")[-1]
    newest.unlink()
    r = repair_knowledge_base("kb", settings)
    assert r.changed and r.generation == previous and r.skipped[0][0] == live and newest.name in r.skipped[0][1]
    assert len(KnowledgeBase.open("kb", settings).manifest.files) == 2

    shutil.rmtree(kb_path / previous)
    (kb_path / "CURRENT").write_text(live)
    with pytest.raises(KBCorruptError, match="--rebuild"):
        repair_knowledge_base("kb", settings)


# -- 4. corruption is found on open, never carried into a new generation ------------------------------------------
def _rewrite_chunks(gen_dir: Path, change) -> Path:
    """Change the rows of the newest segment's chunk file (the one only the live generation holds)."""
    path = segment_files(gen_dir, ".chunks.jsonl")[-1]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 2
    change(rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _swap_texts(rows):
    rows[0]["text"], rows[-1]["text"] = rows[-1]["text"], rows[0]["text"]


def _int_text(rows):
    rows[1]["text"] = 12345


def _nan_vectors(gen_dir: Path) -> Path:
    path = segment_files(gen_dir, ".faiss")[-1]
    index = faiss.read_index(str(path))
    v = index.reconstruct_n(0, index.ntotal)
    v[0, :] = np.nan
    out = faiss.IndexFlatIP(index.d)
    out.add(v)
    faiss.write_index(out, str(path))
    return path


@pytest.mark.parametrize("damage,checksums,expected", [
    ("swap", True, "校验和"),
    ("int_text", True, "校验和"),
    ("int_text", False, "'text' must be str"),
    ("nan", True, "校验和"),
    ("nan", False, "NaN"),
])
def test_corruption_is_refused_on_open_and_not_copied_forward(settings, two_generations, capsys, damage, checksums,
                                                              expected):
    docs, live = two_generations
    gen_dir = settings.kb_root / "kb" / live
    if damage == "swap":
        changed = _rewrite_chunks(gen_dir, _swap_texts)
    elif damage == "int_text":
        changed = _rewrite_chunks(gen_dir, _int_text)
    else:
        changed = _nan_vectors(gen_dir)
    if not checksums:  # the damage with a matching checksum (as if committed so): the other checks still find it
        set_checksum(gen_dir, changed)
    with pytest.raises(KBCorruptError, match=expected) as e:
        KnowledgeBase.open("kb", settings)
    assert "--repair" in str(e.value)

    (docs / "new.txt").write_text(TEXT.format(n=8), encoding="utf-8")
    rc, _, err = _run(capsys, str(docs), "--kb", "kb")
    assert rc == 2 and "--repair" in err
    _one_sentence(err)
    assert (settings.kb_root / "kb" / "CURRENT").read_text().strip() == live, "no new generation over the damage"
    # the repair goes back to the previous, complete generation
    r = repair_knowledge_base("kb", settings)
    assert r.changed and r.generation != live
    assert len(KnowledgeBase.open("kb", settings).manifest.files) == 2


def test_swapped_rows_without_checksums_are_still_caught_by_types_or_counts(settings, two_generations):
    """With a matching checksum, swapping whole rows (ids included) leaves ids out of order: refused as well."""
    _, live = two_generations
    gen_dir = settings.kb_root / "kb" / live
    set_checksum(gen_dir, _rewrite_chunks(gen_dir, lambda rows: rows.reverse()))
    with pytest.raises(KBCorruptError, match="ids out of order"):
        KnowledgeBase.open("kb", settings)


# -- 6. damaged manifests: one sentence, exit 2 -----------------------------------------------------------------
def _files_list(gen: Path) -> None:
    m = json.loads((gen / "manifest.json").read_text(encoding="utf-8"))
    m["files"] = []
    (gen / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _manifest_list(gen: Path) -> None:
    (gen / "manifest.json").write_text("[1, 2, 3]", encoding="utf-8")


def _no_index(gen: Path) -> None:
    segment_files(gen, ".faiss")[-1].unlink()


def _other_dim(gen: Path) -> None:
    path = segment_files(gen, ".faiss")[-1]
    index = faiss.read_index(str(path))
    v = np.zeros((index.ntotal, index.d + 4), dtype=np.float32)
    v[:, 0] = 1
    out = faiss.IndexFlatIP(index.d + 4)
    out.add(v)
    faiss.write_index(out, str(path))
    set_checksum(gen, path)  # even with its checksum updated to match


def _missing_generation(gen: Path) -> None:
    (gen.parent / "CURRENT").write_text("gen-41")


@pytest.mark.parametrize("damage,expected", [
    (_files_list, "files"), (_manifest_list, "JSON 对象"), (_no_index, ".faiss"),
    (_other_dim, "维"), (_missing_generation, "gen-41"),
])
def test_ingest_on_a_damaged_manifest_is_one_sentence_exit_2(settings, two_generations, capsys, damage, expected):
    docs, live = two_generations
    damage(settings.kb_root / "kb" / live)
    rc, out, err = _run(capsys, str(docs), "--kb", "kb")
    assert rc == 2, out + err
    _one_sentence(err)
    assert expected in err and "--repair" in err


# -- 5. one damaged KB never breaks the list ---------------------------------------------------------------------
def test_kb_list_marks_the_damaged_one_and_lists_the_others(settings, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from app import library
    from app.server import create_app

    for name in ("好的", "坏的"):
        assert _run(capsys, str(_folder(tmp_path / name, "docs", 2)), "--kb", name)[0] == 0
    (settings.kb_root / "坏的" / "CURRENT").write_text("../../../etc")

    with TestClient(create_app(settings)) as client:
        r = client.get("/api/kbs")
        assert r.status_code == 200, r.text
        by_name = {k["name"]: k for k in r.json()}
        assert by_name["好的"]["files"] == 2 and by_name["好的"]["chunks"] > 0 and not by_name["好的"]["error"]
        assert "CURRENT" in by_name["坏的"]["error"] and "--repair" in by_name["坏的"]["error"]
        assert client.get("/api/health").json()["knowledge_bases"] == 2
    assert ("坏的（已损坏）", "坏的") in library.choices(settings) and ("好的", "好的") in library.choices(settings)


def test_kb_list_reads_only_the_manifest(settings, tmp_path, capsys):
    """Counts come from the manifest (manifest.json and its parts): the list stays right (and instant) without
    reading the index or chunks."""
    from app import library

    assert _run(capsys, str(_folder(tmp_path, "docs", 3)), "--kb", "kb")[0] == 0
    kb = KnowledgeBase.open("kb", settings)
    expected = library.KBSize("kb", 3, len(kb.chunks), 0)
    gen_dir = kb.path / kb.generation
    aside = settings.kb_root.parent / "aside"
    aside.mkdir()
    for f in list(gen_dir.iterdir()):
        if not (f.name.startswith("manifest") and f.suffix == ".json"):
            f.rename(aside / f.name)  # gone: any read of the index or the chunks would fail
    assert library.sizes(settings) == [expected]
    assert [r[0] for r in library.file_table("kb", settings)] == [f"docs/f{i}.txt" for i in range(3)]
    assert library.file_paths("kb", settings) == [f"docs/f{i}.txt" for i in range(3)]
