"""The evaluation's file writers: each format round-trips through the product's loader with the answer intact."""
from __future__ import annotations

import hashlib

import pypdfium2 as pdfium
import pytest

from bench.eval.datasets import Passage, Question, read_eval_set
from bench.eval.metrics import contains_answer, normalize_for_match
from bench.eval.survival import parsed_text, survival_by_format
from bench.eval.writers import FORMATS, write_corpus, write_passage
from configs import load_settings

# Wraps over several PDF lines; GBK-encodable; has digits, Latin text, full-width punctuation and 《》.
TEXT = ("基于《跑跑卡丁车》与《泡泡堂》上所开发的游戏，由韩国Nexon开发与发行。中国大陆由盛大游戏运营，这是Nexon时隔6年"
        "再次授予盛大网络其游戏运营权。玩家以水枪、小枪、锤子或是水炸弹泡封敌人(玩家或NPC)，即为一泡封。若游戏中离，"
        "则4分钟内不得进行配对(每次中离+4分钟)。可选择经典、热血、狙击等模式进行游戏。") * 2
ANSWERS = [(("4分钟",),), (("玩家以水枪、小枪、锤子或是水炸弹泡封敌人",),),
           (("可选择经典、热血、狙击等模式进行游戏。",),)]
PASSAGE = Passage("TRIAL_800", TEXT, "泡泡战士")


@pytest.fixture(scope="module")
def settings():
    return load_settings(ingest={"ocr": False})


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_through_the_loader(tmp_path, settings, fmt):
    path = write_passage(PASSAGE, tmp_path, fmt)
    assert path.stem == "TRIAL_800" and path.stat().st_size > 0
    text = parsed_text(path, settings)
    assert "泡泡战士" in text                                  # the title became part of the document
    for ans in ANSWERS:
        assert contains_answer(text, ans), f"{fmt}: answer {ans[0][0]!r} lost in {text[:200]!r}"
    # Nothing else was lost: the whole passage survives apart from whitespace.
    assert normalize_for_match(TEXT) in normalize_for_match(text)


def test_gbk_file_is_really_gbk(tmp_path):
    path = write_passage(PASSAGE, tmp_path, "txt-gbk")
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert raw.decode("gbk").startswith("泡泡战士")


def test_gbk_falls_back_to_gb18030_for_characters_gbk_lacks(tmp_path, settings):
    p = Passage("rare", "𠀀字之外，答案是甲乙丙丁。", "")  # U+20000 is outside GBK
    path = write_passage(p, tmp_path, "txt-gbk")
    assert path.read_bytes().decode("gb18030").startswith("𠀀")
    assert "甲乙丙丁" in parsed_text(path, settings)


def test_pdf_text_layer_extracts_chinese(tmp_path):
    """Checked with pypdfium2 directly, independent of the product's loader."""
    path = write_passage(PASSAGE, tmp_path, "pdf")
    pdf = pdfium.PdfDocument(path)
    text = "".join(pdf[i].get_textpage().get_text_range() for i in range(len(pdf)))
    pdf.close()
    assert normalize_for_match(TEXT) in normalize_for_match(text)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown file format 'rtf'"):
        write_passage(PASSAGE, tmp_path, "rtf")


def test_cmrc_passages_survive_parsing_and_chunking(tmp_path, settings, cmrc_trial):
    """Real CMRC passages, four per format: every gold answer is in the parsed text and in some chunk."""
    from langchain_core.documents import Document

    from ingest.splitter import split_documents

    ds = read_eval_set(cmrc_trial)
    passages = [ds.passages[pid] for pid in sorted(ds.passages)[: 4 * len(FORMATS)]]
    files = write_corpus(passages, tmp_path)
    assert sorted(f for _, f in files.values()) == sorted(FORMATS * 4)
    chunks = []
    for name in files:
        text = parsed_text(tmp_path / name, settings)
        sha = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        chunks += split_documents([Document(page_content=text, metadata={"kind": "text"})], source=name, sha256=sha,
                                  chunk_size=250, chunk_overlap=50)
    pids = {p.id for p in passages}
    # Short answers (most CMRC answers: names, dates, numbers) fit inside the 50-character overlap, so one chunk
    # must hold each of them whole; answers longer than a chunk cannot be, and are left out here.
    questions = [q for q in ds.questions if q.positives[0] in pids and len(q.answer[0][0]) <= 20]
    stats = survival_by_format(tmp_path, files, ds.passages, questions, chunks, settings)
    assert set(stats) == set(FORMATS)
    assert sum(s["answers"] for s in stats.values()) >= 30      # the check ran on many real answers
    for fmt, s in stats.items():
        assert s["files"] == 4 and s["failed"] == 0
        assert s["survived_parse"] == s["answers"], f"{fmt}: {s['lost']}"
        assert s["survived_chunks"] == s["answers"], f"{fmt}: {s['lost']}"


def test_survival_reports_a_lost_answer(tmp_path, settings):
    """The check can fail: an answer that is not in the knowledge base's chunks is counted as lost."""
    files = write_corpus([PASSAGE], tmp_path, formats=("md",))
    q = Question("q1", "多少分钟？", (("4分钟",),), ("TRIAL_800",))
    stats = survival_by_format(tmp_path, files, {"TRIAL_800": PASSAGE}, [q], chunks=[], settings=settings)
    assert stats["md"]["answers"] == 1 and stats["md"]["survived_parse"] == 1 and stats["md"]["survived_chunks"] == 0
    assert "not inside any one chunk" in stats["md"]["lost"][0]


def test_report_files(tmp_path):
    """The Markdown, JSON and PNG report writers, on a result whose numbers are known."""
    import json

    from bench.eval.report import write_report

    block = {"hit@1": 0.5, "hit@3": 0.75, "hit@5": 0.875, "hit@10": 1.0, "mrr@10": 0.6667}
    result = {"title": "t", "command": "python -m bench.evaluate --limit 8", "machine": "m", "dataset": {},
              "parse": {"by_format": {"pdf": {"files": 2, "failed": 0, "answers": 5, "survived_parse": 5,
                                              "survived_chunks": 4, "lost": []}}},
              "configs": [{"name": "c250-hybrid", "params": {"chunk_size": 250, "mode": "hybrid"},
                           "retrieval": {"n": 8, "strict": block, "loose": block,
                                         "latency_ms": {"p50": 12.5, "p95": 30.0}},
                           "answers": {"n_answerable": 4, "em": 0.25, "f1": 0.5, "refusal_rate": 1.0}}],
              "questions": [{"query": "问？", "references": ["答"], "prediction": "答。", "f1": 1.0, "refused": False}]}
    paths = write_report(result, tmp_path, "cmrc")
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["configs"][0]["retrieval"]["strict"]["hit@5"] == 0.875
    md = paths["md"].read_text(encoding="utf-8")
    assert "| c250-hybrid | 8 | 0.500 | 0.750 | 0.875 | 1.000 | 0.667 |" in md
    assert "| pdf | 2 | 0 | 5 | 5 | 4 |" in md and "![hit@k per configuration](cmrc_hit_at_k.png)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000


def test_threshold_sweep_from_saved_scores():
    from bench.eval.report import threshold_sweep

    result = {"questions": [
        {"answerable": True, "retrieval": {"c": {"best_dense": 0.90}}},
        {"answerable": True, "retrieval": {"c": {"best_dense": 0.85}}},
        {"answerable": False, "retrieval": {"c": {"best_dense": 0.83}}},
        {"answerable": False, "retrieval": {"c": {"best_dense": 0.86}}},
    ]}
    sweep = {t: (fr, r) for t, fr, r in threshold_sweep(result, "c")}
    assert sweep[0.80] == (0.0, 0.0)
    assert sweep[0.84] == (0.0, 0.5)          # 0.83 < 0.84: one of two unanswerable refused
    assert sweep[0.86] == (0.5, 0.5)          # 0.85 < 0.86 refused wrongly; 0.86 is not below 0.86
    assert sweep[0.90] == (0.5, 1.0)
