"""ingest/splitter.py: sentence and heading rules on small texts, invariants on real Chinese documents (messy_docs,
CMRC passages) and on generated text (hypothesis)."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from langchain_text_splitters import TextSplitter

from ingest.splitter import ChineseTextSplitter, split_documents, split_sentences
from retrieval.types import Chunk


def split(text: str, size: int = 250, overlap: int = 50, meta: dict | None = None, **kw) -> list[Chunk]:
    doc = Document(page_content=text, metadata=meta if meta is not None else {"kind": "text"})
    return split_documents([doc], source="a.txt", sha256="0" * 64, chunk_size=size, chunk_overlap=overlap, **kw)


def _squash(s: str) -> str:
    # Whitespace is not content; '#' may be dropped as Markdown heading markup.
    return re.sub(r"[\s#]+", "", s)


def assert_invariants(source: str, chunks: list[Chunk], size: int) -> None:
    """No text lost (in order), every chunk an exact piece of the input, no chunk over the limit, positions 0..n-1."""
    s = _squash(source)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.text.strip() == c.text and c.text, f"empty or unstripped chunk {c.position}: {c.text!r}"
        assert len(c.text) <= size, f"chunk {c.position} has {len(c.text)} > {size} characters"
        assert _squash(c.text) in s, f"chunk {c.position} is not a piece of the input: {c.text[:60]!r}"
    # Every non-whitespace character appears in the chunks in order: the input is a subsequence of the headings and
    # texts read in chunk order (overlap repeats text, which a subsequence test allows).
    stream = iter("".join(_squash("".join(c.heading_path) + c.text) for c in chunks))
    missing = [i for i, ch in enumerate(s) if not any(ch == x for x in stream)]
    assert not missing, f"text lost from character {missing[0]}: {s[missing[0]:missing[0] + 40]!r}"


# ---------------------------------------------------------------------------------------------- sentences --------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("你好。再见！", ["你好。", "再见！"]),
        ("他说：“好的。”然后走了", ["他说：“好的。”", "然后走了"]),
        ("真的吗？！当然……好吧；行", ["真的吗？！", "当然……", "好吧；", "行"]),
        ("（见附录。）下一句。", ["（见附录。）", "下一句。"]),
        ("It costs 3.14 yuan. Really? Yes!", ["It costs 3.14 yuan.", "Really?", "Yes!"]),
        ("第一行没有句号\n第二行也没有", ["第一行没有句号", "第二行也没有"]),
        ("  \n\n  ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


# ---------------------------------------------------------------------------------------------- headings ---------
DOC = """# 员工手册
第一章 总则
第一条　为了规范管理，制定本办法。
本办法适用于全体员工。
第二章 考勤
1.1 上班时间
每天九点上班。
1.2 请假
请假须提前申请。
第三章 假期
一、病假
病假需要证明。
（一）短期病假
三天以内。
1. 申请流程
找主管签字。
二、事假
事假扣薪。
## 附录
附录正文。
"""


def test_headings_nest_by_rank() -> None:
    paths = {c.text: c.heading_path for c in split(DOC)}
    assert paths["为了规范管理，制定本办法。\n本办法适用于全体员工。"] == ("员工手册", "第一章 总则", "第一条")
    assert paths["每天九点上班。"] == ("员工手册", "第二章 考勤", "1.1 上班时间")
    assert paths["请假须提前申请。"] == ("员工手册", "第二章 考勤", "1.2 请假")
    assert paths["病假需要证明。"] == ("员工手册", "第三章 假期", "一、病假")
    assert paths["三天以内。"] == ("员工手册", "第三章 假期", "一、病假", "（一）短期病假")
    assert paths["找主管签字。"] == ("员工手册", "第三章 假期", "一、病假", "（一）短期病假", "1. 申请流程")
    assert paths["事假扣薪。"] == ("员工手册", "第三章 假期", "二、事假")
    assert paths["附录正文。"] == ("员工手册", "附录")


def test_chunks_never_cross_a_heading() -> None:
    chunks = split(DOC, size=500, overlap=100)
    assert all("上班" not in c.text or "请假" not in c.text for c in chunks)
    assert_invariants(DOC, chunks, 500)


def test_numbered_list_and_sentences_are_not_headings() -> None:
    text = (
        "# 步骤\n做法如下：\n1. 苹果\n2. 香蕉\n3. 橙子\n"
        "1. 确定您要讨论的主题或想法。\n"
        "2023.10 会议纪要\n"
        "一、这一行很长并且以句号结尾，所以它是正文而不是标题。\n"
        "```\n# 代码里的注释\n```\n"
    )
    chunks = split(text)
    assert {c.heading_path for c in chunks} == {("步骤",)}
    assert len(chunks) == 1 and "1. 苹果\n2. 香蕉\n3. 橙子" in chunks[0].text


def test_a_numbered_question_is_a_heading() -> None:
    chunks = split("## 常见问题\n1. 如何申请？\n填写申请表并交给主管。\n2. 多久批复？\n三个工作日内。")
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("常见问题", "1. 如何申请？"), "填写申请表并交给主管。"),
        (("常见问题", "2. 多久批复？"), "三个工作日内。"),
    ]


def test_heading_without_body_is_kept_as_a_chunk() -> None:
    chunks = split("# 总标题\n## 空的一节\n## 有内容的一节\n内容。\n## 结语")
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("总标题",), "空的一节"),
        (("总标题", "有内容的一节"), "内容。"),
        (("总标题",), "结语"),
    ]


def test_heading_path_carries_across_pages_and_chunks_keep_their_page() -> None:
    docs = [
        Document("第一章 总则\n第一页的正文。",
                 metadata={"kind": "text", "page": 1, "encoding": "utf-8", "source": "/x/a.pdf"}),
        Document("第二页接着写。", metadata={"kind": "text", "page": 2, "encoding": "utf-8", "source": "/x/a.pdf"}),
        Document("第二页还有一段。", metadata={"kind": "text", "page": 2, "encoding": "utf-8", "source": "/x/a.pdf"}),
        Document("第二章 附则\n第三页。", metadata={"kind": "ocr", "page": 3, "ocr": True}),
    ]
    chunks = split_documents(docs, source="a.pdf", sha256="f" * 64, chunk_size=250, chunk_overlap=50)
    assert [(c.page, c.heading_path, c.text) for c in chunks] == [
        (1, ("第一章 总则",), "第一页的正文。"),
        (2, ("第一章 总则",), "第二页接着写。\n\n第二页还有一段。"),
        (3, ("第二章 附则",), "第三页。"),
    ]
    assert chunks[0].metadata == {"kind": "text", "encoding": "utf-8"}  # page moved to Chunk.page, source dropped
    assert chunks[2].metadata == {"kind": "ocr", "ocr": True}
    assert {(c.source, c.sha256) for c in chunks} == {("a.pdf", "f" * 64)}


# ---------------------------------------------------------------------------------------------- size, overlap ----
SENTENCES = [f"这是第{i}句话，内容{'长' * (i % 7)}一些。" for i in range(60)]


def test_whole_sentences_packed_with_trailing_sentence_overlap() -> None:
    text = "".join(SENTENCES)
    chunks = split(text, size=80, overlap=30)
    assert_invariants(text, chunks, 80)
    for c in chunks:
        assert split_sentences(c.text) and all(s in SENTENCES for s in split_sentences(c.text)), "a sentence was cut"
    for prev, cur in itertools.pairwise(chunks):
        prev_s, cur_s = split_sentences(prev.text), split_sentences(cur.text)
        k = next(i for i in range(len(cur_s) + 1) if i == len(cur_s) or cur_s[i] not in prev_s)
        overlap = cur_s[:k]
        assert overlap == prev_s[len(prev_s) - k:], "overlap must be the previous chunk's trailing sentences"
        assert len("".join(overlap)) <= 30
        # The overlap is as long as allowed: one more trailing sentence would not have fit.
        if k < len(prev_s) - 1:
            assert len("".join(prev_s[len(prev_s) - k - 1:])) > 30 or len(cur.text) + len(prev_s[-k - 1]) > 80


def test_long_sentence_cut_at_clauses_then_hard_cut() -> None:
    clauses = "，".join(f"第{i}个分句的内容" for i in range(30)) + "。"
    chunks = split(clauses, size=60, overlap=0)
    assert_invariants(clauses, chunks, 60)
    assert all(c.text.endswith(("，", "。")) for c in chunks), "cuts fall after clause marks"
    blob = "无标点长文本" * 50
    chunks = split(blob, size=64, overlap=10)
    assert_invariants(blob, chunks, 64)
    assert "".join(c.text for c in chunks) == blob  # hard cuts: no overlap, no loss


def test_english_hard_cut_prefers_word_boundaries() -> None:
    text = " ".join(["retrieval"] * 40)
    chunks = split(text, size=50, overlap=0)
    assert_invariants(text, chunks, 50)
    assert all(set(c.text.split()) == {"retrieval"} for c in chunks)


def test_token_limit_is_never_exceeded() -> None:
    def count(t: str) -> int:  # a tokenizer that spends 2 tokens on each ASCII letter and 1 on anything else
        return 2 + sum(2 if ch.isascii() and ch.isalpha() else 1 for ch in t)

    text = "# Heading one\n" + "".join(SENTENCES) + "English words make more tokens than characters here. " * 8
    chunks = split(text, size=250, overlap=50, count_tokens=count, max_tokens=90)
    assert_invariants(text, chunks, 250)
    assert max(count(c.embedding_text()) for c in chunks) <= 90
    assert max(count(c.embedding_text()) for c in chunks) > 60, "chunks should still use most of the budget"


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(ValueError, match="chunk_overlap"):
        split("x", size=50, overlap=50)
    with pytest.raises(ValueError, match="count_tokens and max_tokens"):
        split("x", count_tokens=len)


def test_deterministic() -> None:
    assert split(DOC, size=40, overlap=10) == split(DOC, size=40, overlap=10)


# ---------------------------------------------------------------------------------------------- tables -----------
def test_table_documents_keep_whole_rows_under_the_header() -> None:
    header = "姓名,部门,电话"
    rows = [f"员工{i},研发部{i % 3},1380000{i:04d}" for i in range(40)]
    long_row = "超长备注," + "很长的说明" * 40
    meta = {"kind": "table", "sheet": "通讯录", "table_header": header, "page": 2}
    chunks = split("\n".join([header, *rows, long_row]), size=120, overlap=20, meta=meta)
    assert all(c.text.startswith(header + "\n") and len(c.text) <= 120 for c in chunks)
    body = [line for c in chunks for line in c.text.split("\n")[1:]]
    assert body[:40] == rows, "rows whole, in order, each once"
    assert "".join(body[40:]) == long_row and len(body) > 41, "only the over-long row is cut"
    assert all(c.page == 2 and c.metadata["sheet"] == "通讯录" for c in chunks)


def test_a_header_too_long_to_repeat_is_kept_once_as_text() -> None:
    header = ",".join(f"第{i}列的名称" for i in range(12))
    rows = [",".join(str(i * j) for j in range(12)) for i in range(20)]
    chunks = split("\n".join(rows), size=100, overlap=0, meta={"kind": "table", "table_header": header})
    assert all(len(c.text) <= 100 for c in chunks)
    assert "".join(c.text for c in chunks).replace("\n", "") == header + "".join(rows)
    assert [r for c in chunks[1:] for r in c.text.split("\n")] == rows


def test_markdown_table_in_text() -> None:
    rows = "\n".join(f"| 产品{i} | {i * 10} |" for i in range(30))
    text = f"## 价格表\n下表列出价格。\n| 名称 | 价格 |\n| --- | ---: |\n{rows}\n表后的说明。"
    chunks = split(text, size=100, overlap=20)
    tables = [c for c in chunks if c.metadata["kind"] == "table"]
    assert len(tables) > 2
    assert all(c.text.startswith("| 名称 | 价格 |\n| --- | ---: |\n") for c in tables)
    assert [r for c in tables for r in c.text.split("\n")[2:]] == rows.split("\n")
    assert chunks[0].text == "下表列出价格。" and chunks[-1].text == "表后的说明。"
    assert {c.heading_path for c in chunks} == {("价格表",)}


# ---------------------------------------------------------------------------------------------- LangChain --------
def test_chinese_text_splitter_is_a_langchain_text_splitter() -> None:
    splitter = ChineseTextSplitter(chunk_size=60, chunk_overlap=10)
    assert isinstance(splitter, TextSplitter)
    texts = splitter.split_text("".join(SENTENCES[:10]))
    assert texts == [c.text for c in split("".join(SENTENCES[:10]), size=60, overlap=10)] and len(texts) > 1
    docs = splitter.split_documents([Document(DOC, metadata={"source": "manual.md", "page": 1})])
    assert docs[0].metadata["heading_path"] == ["员工手册", "第一章 总则", "第一条"]
    assert all(d.metadata["source"] == "manual.md" and d.metadata["page"] == 1 for d in docs)
    assert [d.metadata["position"] for d in docs] == list(range(len(docs)))


# ---------------------------------------------------------------------------------------------- real documents ---
@pytest.mark.parametrize("size, overlap", [(250, 50), (100, 20), (500, 0)])
def test_invariants_on_messy_docs(messy_docs: Path, size: int, overlap: int) -> None:
    folder = messy_docs / "langchain-chatchat"
    files = sorted(folder.glob("*.md")) + [folder / "test.txt"]
    for f in files:
        text = f.read_text(encoding="utf-8")
        chunks = split(text, size=size, overlap=overlap)
        assert_invariants(text, chunks, size)


def test_messy_docs_headings(messy_docs: Path) -> None:
    text = (messy_docs / "langchain-chatchat" / "test.txt").read_text(encoding="utf-8")
    chunks = split(text)
    title = "如何向 ChatGPT 提问以获得高质量答案：提示技巧工程完全指南"
    chapters = [c.heading_path for c in chunks if len(c.heading_path) == 2]
    assert chapters[0] == (title, "介绍") and chapters[-1] == (title, "结语")
    assert len(set(chapters)) == 26  # 介绍, 第一章 … 第二十四章, 结语
    assert all(len(c.heading_path) <= 2 for c in chunks), "numbered list items in the chapters are not headings"


def test_invariants_on_cmrc_passages(cmrc_trial: Path) -> None:
    data = json.loads(cmrc_trial.read_text(encoding="utf-8"))["data"]
    contexts = [p["context"] for d in data for p in d["paragraphs"]]
    assert len(contexts) > 200
    for text in contexts:
        assert_invariants(text, split(text), 250)


def test_token_limit_with_a_real_tokenizer(messy_docs: Path, tmp_path: Path) -> None:
    from configs import load_settings
    from retrieval.embeddings import Embedder
    from tests.support.tiny_embedder import build_tiny_embedder

    emb = Embedder.from_settings(load_settings(embedding={"model": str(build_tiny_embedder(tmp_path / "tiny"))}))
    text = (messy_docs / "langchain-chatchat" / "分布式训练技术原理.md").read_text(encoding="utf-8")
    chunks = split(text, size=250, overlap=50, count_tokens=emb.count_tokens, max_tokens=96)
    assert_invariants(text, chunks, 250)
    counts = [emb.count_tokens(c.embedding_text()) for c in chunks]
    assert max(counts) <= 96 < max(len(c.text) for c in split(text))


# ---------------------------------------------------------------------------------------------- generated text ---
_ALPHABET = "你好世界知识问答文档模型训练中文句子，。！？；：、…”）“（ \n\n#第一二章节条1.23一、（）abcXYZ"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=_ALPHABET, max_size=600),
    size=st.integers(min_value=21, max_value=120),
    overlap_frac=st.floats(min_value=0, max_value=0.9),
)
def test_invariants_on_generated_text(text: str, size: int, overlap_frac: float) -> None:
    overlap = int(size * overlap_frac)
    chunks = split(text, size=size, overlap=overlap)
    assert_invariants(text, chunks, size)
    assert chunks == split(text, size=size, overlap=overlap)
