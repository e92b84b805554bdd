"""ingest.loaders on real files: every file of the shared messy_docs folder, plus files generated here.

The messy_docs sweep runs once per session in a 2-process pool (spawn), which also proves that load_file and
LoadError cross process boundaries. OCR dominates the time (a dozen images/pages).
"""
from __future__ import annotations

import base64
import email.message
import json
import pickle
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from langchain_core.documents import Document

from configs import PROJECT_ROOT, load_settings
from configs.settings import IngestSettings
from ingest.loaders import SUPPORTED_EXTENSIONS, LoadError, load_file

CJK = re.compile(r"[\u4e00-\u9fff]")
HAS_DOC_CONVERTER = any(shutil.which(t) for t in ("antiword", "catdoc", "soffice", "libreoffice"))


def settings(**over) -> IngestSettings:
    return load_settings(ingest=over).ingest


def text_of(docs: list[Document], kind: str | None = None) -> str:
    return "\n".join(d.page_content for d in docs if kind is None or d.metadata["kind"] == kind)


def _load_one(path: str) -> tuple:
    """Worker for the sweep: ("ok", docs) or ("error", kind, reason)."""
    try:
        return ("ok", load_file(Path(path), load_settings().ingest))
    except LoadError as e:
        return ("error", e.kind, e.reason)


# ---------------------------------------------------------------------------------------------------------------
# messy_docs: one expectation per file. ("error", kind) or ("ok", {kind: [phrases...]}) where kind "any" = any
# Document; every phrase must appear in the Documents of that kind.
# ---------------------------------------------------------------------------------------------------------------
GB2312_PHRASES = {
    "_chromium_gb18030_with_no_encoding_specified.html.xml": "中国制造的领军者",
    "_mozilla_bug171813_text.html": "搜狐在线",
    "cappuccinos.3322.org.xml": "日子如流沙",
    "chen56.blogcn.com.xml": "测试驱动的敏捷方法",
    "coverer.com.xml": "当我们在建设网站时",
    "w3cn.org.xml": "网页设计师",
    "pda.blogsome.com.xml": "留下我们最真的回忆",
    "lily.blogsome.com.xml": "午后红茶",
    "14.blog.westca.com.xml": "加西公社温哥华大队",
    "softsea.net.xml": "系统工具",
}

EXPECT: dict[str, tuple] = {
    "chardet-5.2.0-tests/LICENSE": ("error", "unsupported"),
    "langchain-chatchat/LICENSE.Apache-2.0": ("error", "unsupported"),
    "unstructured/LICENSE.Apache-2.0": ("error", "unsupported"),
    "langchain-chatchat/langchain-ChatGLM_closed.csv": ("ok", {"table": ["title: 加油~以及一些建议"]}),
    "langchain-chatchat/langchain-ChatGLM_closed.xlsx": ("ok", {"table": ["title: 加油~以及一些建议"]}),
    "langchain-chatchat/langchain-ChatGLM_open.csv": ("ok", {"table": ["title: 效果如何优化"]}),
    "langchain-chatchat/langchain-ChatGLM_open.xlsx": ("ok", {"table": ["title: 效果如何优化"]}),
    "langchain-chatchat/langchain.pdf": ("ok", {"text": ["LangChain"]}),
    "langchain-chatchat/ocr_test.docx": ("ok", {"text": ["我是文字"], "table": ["我是表格1: 我是表格3"],
                                                "ocr": ["横向文本框"]}),
    "langchain-chatchat/ocr_test.jpg": ("ok", {"ocr": ["横向文本框", "竖向文本框"]}),
    "langchain-chatchat/ocr_test.pdf": ("ok", {"text": ["我是文字"], "ocr": ["横向文本框"]}),
    "langchain-chatchat/ocr_test.pptx": ("ok", {"text": ["我是文字"], "table": ["我是表格"], "ocr": ["横向文本框"]}),
    "langchain-chatchat/test.txt": ("ok", {"text": ["ChatGPT是OpenAI开发的一个大型语言模型"]}),
    "langchain-chatchat/分布式训练技术原理.md": ("ok", {"text": ["# 分布式训练技术原理", "FSDP"]}),
    "langchain-chatchat/大模型应用技术原理.md": ("ok", {"text": ["# 大模型应用技术原理", "向量数据库"]}),
    "langchain-chatchat/大模型技术栈-实战与应用.md": ("ok", {"text": ["# 大模型技术栈-实战与应用", "deepspeed"]}),
    "langchain-chatchat/大模型技术栈-算法与原理.md": ("ok", {"text": ["# 大模型技术栈-算法与原理", "tokenizer"]}),
    "langchain-chatchat/大模型指令对齐训练原理.md": ("ok", {"text": ["# 大模型指令对齐训练原理", "RLHF"]}),
    "langchain-chatchat/大模型推理优化策略.md": ("ok", {"text": ["# 大模型推理优化策略", "PagedAttention"]}),
    "unstructured/_full_example-docs_listing.tsv": ("ok", {"table": ["列2: example-docs/CantinaBand3.wav"]}),
    "unstructured/codeblock.md": ("ok", {"text": ["## HTML Example", "<!DOCTYPE html>"]}),
    "unstructured/contains-pictures.docx": ("ok", {"text": ["Some paragraph text that runs"]}),
    "unstructured/docx-hdrftr.docx": ("ok", {"text": ["Main document", "First header para"]}),
    "unstructured/docx-tables.docx": ("ok", {"text": ["Simple uniform table"], "table": ["Header Col 1: Lorem ipsum"]}),
    "unstructured/empty.txt": ("error", "empty"),
    "unstructured/example-steelJIS-datasheet-utf-16.html": ("ok", {"text": ["# SteelJIS"],
                                                                   "table": ["Cr: 0.75 - 1.2"]}),
    "unstructured/example-with-scripts.html": ("ok", {"any": ["Who We Are"]}),
    "unstructured/fake-doc.rtf": ("ok", {"text": ["My first paragraph.", "Row 2, Cell 2"]}),
    "unstructured/fake-html-cp1252.html": ("ok", {"text": ["# My First Heading", "\nEl niño comió paella", "15,50 €"]}),
    "unstructured/fake-html-with-base64-image.html": ("ok", {"text": ["Test page"]}),
    "unstructured/fake-text-all-whitespace.txt": ("error", "empty"),
    "unstructured/fake-text-utf-16-be.txt": ("ok", {"text": ["This is a test document to use for unit "
                                                             "tests.", "Doylestown, PA 18901"]}),
    "unstructured/fake-text-utf-32.txt": ("ok", {"text": ["This is a test document to use for unit "
                                                          "tests.", "Doylestown, PA 18901"]}),
    "unstructured/fake.doc": ("ok", {"text": ["Lorem ipsum dolor sit "
                                              "amet."]}) if HAS_DOC_CONVERTER else ("error", "unsupported"),
    "unstructured/fake.odt": ("ok", {"text": ["Lorem ipsum dolor sit amet."], "table": ["Mon: Blue"]}),
    "unstructured/hebrew-text-base64-iso88598i.txt": ("ok", {"text": ["8uPr5e8gVGVzbGEg"]}),
    "unstructured/img_DA-1p.png": ("ok", {"ocr": ["CREATURES", "Abomination"]}),
    "unstructured/img_chi_sim_image.jpeg": ("ok", {"ocr": ["清道夫", "肌肤"]}),
    "unstructured/img_english-and-korean.png": ("ok", {"ocr": ["RULES"]}),
    "unstructured/img_jpn-vert.jpeg": ("ok", {"ocr": []}),  # vertical Japanese: checked for CJK below
    "unstructured/language-docs_UDHR_first_article_all.txt": ("ok", {"text": ["人人生而自由",
                                                                              "Universal Declaration"]}),
    "unstructured/page-breaks.docx": ("ok", {"text": ["First page"]}),
    "unstructured/password_protected.xlsx": ("error", "encrypted"),
    "unstructured/pdf_DA-1p.pdf": ("ok", {"text": ["Abomination"]}),
    "unstructured/pdf_copy-protected.pdf": ("ok", {"text": ["LayoutParser"]}),
    "unstructured/pdf_embedded-cmap-cidfont.pdf": ("ok", {"text": ["embedded CMap"]}),
    "unstructured/pdf_failure-after-repair.pdf": ("ok", {"text": ["A guide for people with cancer"]}),
    "unstructured/pdf_figure-overlay-text.pdf": ("ok", {"text": ["Jane Doe"]}),
    "unstructured/pdf_invalid-pdf-structure-pdfminer-one-page.pdf": ("ok", {"text": [
        "Threats Highlight the Importance"]}),
    "unstructured/pdf_korean-text-with-tables.pdf": ("ok", {"text": ["적립 제외 대상"]}),
    "unstructured/pdf_layout-parser-paper-with-empty-pages.pdf": ("ok", {"text": ["LayoutParser"],
                                                                       "ocr": ["intentionally left blank"]}),
    "unstructured/pdf_multi-column-2p.pdf": ("ok", {"text": ["Dense Passage Retrieval"]}),
    "unstructured/pdf_negative-coords.pdf": ("ok", {"text": ["Carbon Footprint"]}),
    "unstructured/pdf_password.pdf": ("error", "encrypted"),
    "unstructured/pdf_pdf-with-ocr-text.pdf": ("ok", {"text": ["tanntxim"]}),  # the file's own (poor) OCR layer
    "unstructured/rotated-page-90.pdf": ("ok", {"text": ["Rotated page fixture"]}),
    "unstructured/semicolon-delimited.csv": ("ok", {"table": ["dolor sit: adipiscing"]}),
    "unstructured/simple-table.md": ("ok", {"table": ["Item: Bananas"]}),
    "unstructured/stanley-cups-utf-16.csv": ("ok", {"text": ["# Stanley Cups"],
                                                    "table": ["Team: Blues | Location: STL | Stanley Cups: 1"]}),
    "unstructured/tables-with-incomplete-rows.docx": ("ok", {"table": ["a: c | b: d"]}),
    "unstructured/umlauts-non-utf8.md": ("ok", {"text": ["## können", "äöüß"]}),
}
for _name, _phrase in GB2312_PHRASES.items():
    EXPECT[f"chardet-5.2.0-tests/GB2312/{_name}"] = ("ok", {"text": [_phrase]})


@pytest.fixture(scope="session")
def messy_results(messy_docs: Path) -> dict[str, tuple]:
    files = sorted(p for p in messy_docs.rglob("*") if p.is_file())
    # Biggest first: the slow OCR files start early and the two workers finish together.
    order = sorted(files, key=lambda p: (p.suffix.lower() not in {".png", ".jpg", ".jpeg", ".pdf"}, -p.stat().st_size))
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        results = dict(zip(order, pool.map(_load_one, [str(p) for p in order]), strict=False))
    return {p.relative_to(messy_docs).as_posix(): results[p] for p in files}


def test_every_messy_file_has_an_expectation(messy_results):
    gb2312 = {k for k in messy_results if k.startswith("chardet-5.2.0-tests/GB2312/")}
    missing = sorted(set(messy_results) - set(EXPECT) - gb2312)
    assert not missing, f"add expectations for: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_messy_file(messy_results, name):
    if name not in messy_results:
        pytest.skip(f"{name} not in this copy of messy_docs")
    expected, got = EXPECT[name], messy_results[name]
    if expected[0] == "error":
        assert got[0] == "error", f"{name}: expected LoadError {expected[1]}, got {len(got[1])} Documents"
        assert got[1] == expected[1], f"{name}: {got[1]} ({got[2]})"
        assert CJK.search(got[2]) and name.rsplit("/", 1)[-1] in got[2], "reason must be Chinese and name the file"
        return
    assert got[0] == "ok", f"{name}: LoadError {got[1]}: {got[2]}"
    docs = got[1]
    assert docs and all(d.page_content.strip() for d in docs)
    assert all(d.metadata["kind"] in {"text", "table", "ocr"} for d in docs)
    for kind, phrases in expected[1].items():
        body = text_of(docs, None if kind == "any" else kind)
        assert body, f"{name}: no Documents of kind {kind}"
        for phrase in phrases:
            assert phrase in body, f"{name}: {phrase!r} not in {kind} text: {body[:300]!r}"
    for d in docs:
        if d.metadata["kind"] == "table":
            assert d.metadata["table_header"]
        assert "\ufffd" not in d.page_content or name.endswith(".pdf"), f"{name}: replacement characters"


def test_gb2312_pages_decode_to_chinese(messy_results):
    gb = {k: v for k, v in messy_results.items() if k.startswith("chardet-5.2.0-tests/GB2312/")}
    assert len(gb) >= 10
    for name, got in gb.items():
        assert got[0] == "ok", f"{name}: {got}"
        body = text_of(got[1])
        assert "\ufffd" not in body, name
        assert {d.metadata.get("encoding") for d in got[1]} == {"gb18030"}, name
        # No Latin-1/cp1252 mojibake of GBK bytes (e.g. 'ÖÐÎÄ' for 中文) anywhere.
        assert not re.search(r"[À-ÿ]{3,}", body), (name, re.search(r"[À-ÿ]{3,}", body))
    # Some feeds are English blogs with a few Chinese words; most are Chinese through and through.
    assert sum(len(CJK.findall(text_of(got[1]))) >= 100 for got in gb.values()) >= len(gb) // 2


def test_feeds_keep_entries_and_drop_bookkeeping(messy_results):
    """issue 13 item 8: a blog feed's ids (tag:blogger.com,...), timestamps, flags (true/false) and markup never
    reach the text; the feed title and each entry title are headings above the entry's text."""
    gb = {k: v for k, v in messy_results.items() if k.startswith("chardet-5.2.0-tests/GB2312/") and k.endswith(".xml")}
    feeds = 0
    for name, got in gb.items():
        body = text_of(got[1])
        assert "tag:blogger.com" not in body, name
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", body), (name, "timestamp")
        assert not re.search(r"^(true|false)$", body, re.M), (name, "a flag")
        markup = re.search(r"(?i)<(br|p|div|a|img)\b[^>]*>", body)
        assert not markup, (name, markup)
        feeds += body.startswith("# ") and "\n## " in body
    assert feeds >= 15, "the feeds are read entry by entry: feed title, then entry titles as headings"
    blogger = text_of(gb["chardet-5.2.0-tests/GB2312/eighthday.blogspot.com.xml"][1]).splitlines()
    assert blogger[:2] == ["# Live for the moment...", "## 又颠了"]
    assert "## 梦醒时分" in blogger


def test_ocr_docs_carry_pages(messy_results):
    docs = messy_results["langchain-chatchat/ocr_test.pdf"][1]
    assert {(d.metadata["kind"], d.metadata["page"]) for d in docs} == {("text", 1), ("ocr", 1)}
    paper = messy_results["unstructured/pdf_layout-parser-paper-with-empty-pages.pdf"][1]
    # Pages 1 and 4 have a text layer; page 3 is an image saying "intentionally left blank"; page 2 is empty.
    assert {(d.metadata["kind"], d.metadata["page"]) for d in paper} == {("text", 1), ("ocr", 3), ("text", 4)}
    jpn = text_of(messy_results["unstructured/img_jpn-vert.jpeg"][1], "ocr")
    assert len(re.findall(r"[\u3040-\u30ff\u4e00-\u9fff]", jpn)) >= 20


def test_sheets_keep_names_and_headers(messy_results):
    docs = messy_results["langchain-chatchat/langchain-ChatGLM_closed.xlsx"][1]
    assert [d.metadata["kind"] for d in docs] == ["table"]
    assert docs[0].metadata["sheet"] and docs[0].metadata["page"] == 1
    assert "title" in docs[0].metadata["table_header"].split(" | ")
    csv_rows = messy_results["langchain-chatchat/langchain-ChatGLM_closed.csv"][1][0].page_content.splitlines()
    xlsx_rows = docs[0].page_content.splitlines()
    assert len(csv_rows) == len(xlsx_rows) > 50


# ---------------------------------------------------------------------------------------------------------------
# Generated files
# ---------------------------------------------------------------------------------------------------------------
ZH = "第一章 总则\n为规范公司知识库的使用，制定本办法。镕、堃等字也应正确显示。"


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [("gbk", "gb18030"), ("gb18030", "gb18030"), ("utf-8", "utf-8"), ("utf-8-sig", "utf-8"),
     ("utf-16", "utf-16-le"), ("utf-16-be", "utf-16-be"), ("utf-32", "utf-32-le")],
)
def test_chinese_text_in_any_encoding_and_chinese_path(tmp_path, encoding, expected):
    folder = tmp_path / "公司资料" / "制度"
    folder.mkdir(parents=True)
    f = folder / f"员工手册-{encoding}.txt"
    f.write_bytes(ZH.encode(encoding))
    docs = load_file(f, settings())
    assert text_of(docs) == ZH
    assert docs[0].metadata["encoding"] == expected
    assert docs[0].metadata["source"] == str(f)


def test_big5_text(tmp_path):
    text = "知識庫問答系統的使用說明：請先上傳文件，再提出問題。"
    f = tmp_path / "說明.txt"
    f.write_bytes(text.encode("big5"))
    docs = load_file(f, settings())
    assert text_of(docs) == text and docs[0].metadata["encoding"] == "cp950"


TW = ("中華民國的教育制度分為國民教育、高級中等教育與高等教育三個階段。國民教育為九年，包括國民小學六年與國民中學三年。"
      "學生完成國民教育後，可以選擇進入高級中學、職業學校或五年制專科學校就讀。政府每年編列預算，補助偏遠地區的學校。")


@pytest.mark.skipif(not shutil.which("iconv"), reason="no iconv (glibc) to write EUC-TW with")
def test_euc_tw_text_is_decoded_not_stored_as_mojibake(tmp_path):
    """issue 13 item 7: Python has no EUC-TW codec; the bytes decode cleanly as GB18030 or EUC-JP into nonsense.
    The file is written by glibc's iconv (the real encoder) and must come back as the original text."""
    f = tmp_path / "教育.txt"
    f.write_bytes(subprocess.run(["iconv", "-f", "UTF-8", "-t", "EUC-TW"], input=TW.encode(), capture_output=True,
                                 check=True).stdout)
    docs = load_file(f, settings())
    assert text_of(docs) == TW
    assert docs[0].metadata["encoding"] == "euc-tw"


def test_text_no_codec_reads_as_text_fails_with_a_reason(tmp_path):
    """issue 13 item 7: bytes that decode 'cleanly' as GB18030 but read as nonsense in every codec (here a seeded
    random run of high bytes, as from a wrong or unknown legacy encoding) fail that file with a reason instead of
    being stored as mojibake."""
    import random

    rnd = random.Random(13)
    f = tmp_path / "乱码.txt"
    f.write_bytes(bytes(rnd.randrange(0xA1, 0xFF) for _ in range(600)))
    with pytest.raises(LoadError) as e:
        load_file(f, settings())
    assert e.value.kind == "corrupt"
    assert "乱码.txt" in e.value.reason and "编码" in e.value.reason and "UTF-8" in e.value.reason


def test_plausibility_separates_text_from_mojibake():
    from ingest.encoding import plausibility

    gbk = ZH.encode("gbk") * 3
    assert plausibility(gbk.decode("gb18030")).ok
    assert not plausibility(gbk.decode("cp950", errors="ignore")).ok, "GBK read as Big5"
    assert not plausibility(TW.encode("cp950").decode("gb18030", errors="ignore")).ok, "Big5 read as GB18030"
    assert plausibility(TW).ok
    assert plausibility("한국어 텍스트입니다. 서울에 사는 사람들은 매일 지하철로 출근합니다.").ok


def test_markup_line_breaks_never_reach_the_text(tmp_path):
    """issue 13 item 8: <br> written into markdown, and an RSS item whose HTML was escaped twice."""
    md = tmp_path / "说明.md"
    md.write_text("# 说明\n\n第一行<br>第二行<br />第三行\n\n| 项目 | 说明 |\n|---|---|\n| 甲 | 一<br/>二 |\n\n"
                  "```html\n<p>代码里的<br>保留</p>\n```\n", encoding="utf-8")
    docs = load_file(md, settings())
    text = text_of(docs, "text")
    assert "第一行\n第二行\n第三行" in text and "<br>保留" in text, "code blocks keep their markup"
    assert text_of(docs, "table") == "项目: 甲 | 说明: 一 二"
    rss = tmp_path / "feed.xml"
    rss.write_text('<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>公司新闻</title>'
                   "<link>http://example.com/</link><lastBuildDate>Mon, 06 Sep 2010 00:01:00 +0000</lastBuildDate>"
                   "<item><title>年会通知</title><guid>tag:example.com,2010:post-1</guid>"
                   "<pubDate>Mon, 06 Sep 2010 00:01:00 +0000</pubDate>"
                   "<description>&amp;lt;p&amp;gt;年会在一月举行。&amp;lt;br /&amp;gt;&amp;lt;br /&amp;gt;请准时参加。"
                   "&amp;lt;/p&amp;gt;</description></item></channel></rss>", encoding="utf-8")
    lines = text_of(load_file(rss, settings())).splitlines()
    assert lines == ["# 公司新闻", "## 年会通知", "年会在一月举行。", "请准时参加。"]


def test_short_gbk_is_not_read_as_korean_or_latin1(tmp_path):
    f = tmp_path / "短.txt"
    f.write_bytes("我们的产品".encode("gbk"))  # charset-normalizer alone says cp949 (Korean)
    assert text_of(load_file(f, settings())) == "我们的产品"


def test_html_gb2312_label_with_gbk_only_characters(tmp_path):
    html = ('<html><head><meta http-equiv="Content-Type" content="text/html; charset=gb2312"><title>通知</title>'
            "<script>var x = '不要我';</script><style>p{color:red}</style></head><body>"
            "<h1>关于朱镕基同志的报道</h1><p>第一段。</p><h3>小节</h3><ul><li>甲</li><li>乙</li></ul>"
            "<table><tr><th>姓名</th><th>部门</th></tr><tr><td>张三</td><td>研发部</td></tr></table>"
            "<p>表后文字</p></body></html>")
    f = tmp_path / "通知.html"
    f.write_bytes(html.encode("gbk"))  # 镕 is not in GB2312: only a GB18030/GBK decoder reads it
    docs = load_file(f, settings())
    body = text_of(docs, "text")
    assert "# 关于朱镕基同志的报道" in body.splitlines()
    assert "### 小节" in body.splitlines() and "- 甲" in body.splitlines()
    assert "不要我" not in body and "color" not in body
    table = [d for d in docs if d.metadata["kind"] == "table"]
    assert len(table) == 1 and table[0].page_content == "姓名: 张三 | 部门: 研发部"
    assert table[0].metadata["table_header"] == "姓名 | 部门"
    assert [d.metadata["kind"] for d in docs] == ["text", "table", "text"]  # page order kept
    assert docs[-1].page_content == "表后文字"
    assert {d.metadata["encoding"] for d in docs} == {"gb18030"}


def test_html_declared_charset_is_honoured_and_pre_keeps_lines(tmp_path):
    f = tmp_path / "繁體.html"
    # Two Big5 characters alone are ambiguous (they also decode as GB18030); the page's label settles it.
    f.write_bytes('<meta charset="big5"><p>中文</p><pre>第一行\n  第二行</pre>'.encode("big5"))
    docs = load_file(f, settings())
    assert docs[0].page_content.splitlines() == ["中文", "第一行", "  第二行"]
    assert docs[0].metadata["encoding"] == "cp950"


def test_deeply_nested_html(tmp_path):
    f = tmp_path / "深.html"
    f.write_text("<html><body>" + "<div>" * 5000 + "深层文字" + "</div>" * 5000 + "</body></html>", encoding="utf-8")
    assert text_of(load_file(f, settings())) == "深层文字"


def test_html_wrong_latin1_label_on_gbk_bytes(tmp_path):
    f = tmp_path / "错标.htm"
    f.write_bytes('<meta charset="iso-8859-1"><p>这是用 GBK 保存却标成 Latin-1 的网页。</p>'.encode("gbk"))
    assert "这是用 GBK 保存却标成 Latin-1 的网页。" in text_of(load_file(f, settings()))


def test_docx_headings_lists_tables(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("员工手册", level=1)
    d.add_paragraph("本手册适用于全体员工。")
    d.add_heading("第二章 考勤", level=2)
    d.add_paragraph("迟到三次记一次旷工。", style="List Bullet")
    t = d.add_table(rows=3, cols=3)
    rows = [["姓名", "部门", "入职日期"], ["张三", "研发部", "2024-01-05"], ["李四", "", "2023-07-01"]]
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            t.cell(r, c).text = v
    d.add_paragraph("表格之后的段落。")
    d.sections[0].header.paragraphs[0].text = "内部资料 注意保密"
    f = tmp_path / "手册.docx"
    d.save(f)
    docs = load_file(f, settings())
    kinds = [x.metadata["kind"] for x in docs]
    assert kinds == ["text", "table", "text", "text"]
    lines = docs[0].page_content.splitlines()
    assert lines == ["# 员工手册", "本手册适用于全体员工。", "## 第二章 考勤", "- 迟到三次记一次旷工。"]
    assert docs[1].page_content == "姓名: 张三 | 部门: 研发部 | 入职日期: 2024-01-05\n姓名: 李四 | 入职日期: 2023-07-01"
    assert docs[1].metadata["table_header"] == "姓名 | 部门 | 入职日期"
    assert docs[2].page_content == "表格之后的段落。"
    assert docs[3].page_content == "内部资料 注意保密" and docs[3].metadata["part"] == "header_footer"


def test_docx_text_boxes_once(tmp_path):
    import docx
    from docx.oxml import parse_xml

    d = docx.Document()
    p = d.add_paragraph("流程如下：")
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    box = f'<w:txbxContent xmlns:w="{w}"><w:p><w:r><w:t>提交申请</w:t></w:r></w:p></w:txbxContent>'
    # Word's shape: DrawingML text box in mc:Choice, the same text again as VML in mc:Fallback.
    p._p.append(parse_xml(
        f'<w:r xmlns:w="{w}" xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006">'
        f"<mc:AlternateContent><mc:Choice Requires=\"wps\"><w:drawing>{box}</w:drawing></mc:Choice>"
        f"<mc:Fallback><w:pict>{box}</w:pict></mc:Fallback></mc:AlternateContent></w:r>"))
    f = tmp_path / "流程.docx"
    d.save(f)
    assert text_of(load_file(f, settings())).splitlines() == ["流程如下：", "提交申请"]


def test_encrypted_docx(tmp_path):
    import docx
    from msoffcrypto.format.ooxml import OOXMLFile

    plain = tmp_path / "plain.docx"
    d = docx.Document()
    d.add_paragraph("机密")
    d.save(plain)
    locked = tmp_path / "加密.docx"
    with open(plain, "rb") as src, open(locked, "wb") as out:
        OOXMLFile(src).encrypt("secret", out)
    with pytest.raises(LoadError) as e:
        load_file(locked, settings())
    assert e.value.kind == "encrypted" and "加密.docx" in e.value.reason and "密码" in e.value.reason


def test_xlsx_sheets_title_rows_dates(tmp_path):
    import datetime

    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "销售"
    ws.append(["2024 年一季度销售表"])
    ws.append(["产品", "数量", "日期"])
    ws.append(["笔记本", 3.0, datetime.date(2024, 1, 5)])
    ws.append(["显示器", 12, None])
    ws.append([None, None, None])
    ws.cell(row=2, column=40).value = ""  # a formatted-but-empty far column must not widen the header
    other = wb.create_sheet("空表")
    other["A1"] = None
    third = wb.create_sheet("库存")
    third.append(["品名", "库存"])
    third.append(["键盘", 40])
    f = tmp_path / "报表.xlsx"
    wb.save(f)
    docs = load_file(f, settings())
    assert [(d.metadata["kind"], d.metadata["sheet"], d.metadata["page"]) for d in docs] == [
        ("text", "销售", 1), ("table", "销售", 1), ("table", "库存", 3)]
    # The title row becomes a heading before the table (the splitter puts it in every row chunk's heading path).
    assert docs[0].page_content == "# 2024 年一季度销售表"
    assert docs[1].page_content.splitlines() == ["产品: 笔记本 | 数量: 3 | 日期: 2024-01-05", "产品: 显示器 | 数量: 12"]
    assert docs[1].metadata["table_header"] == "产品 | 数量 | 日期"
    assert docs[1].metadata["table_title"] == "2024 年一季度销售表"
    assert docs[2].page_content == "品名: 键盘 | 库存: 40"


def test_xls_legacy_workbook(tmp_path):
    import datetime

    xlwt = pytest.importorskip("xlwt", reason="xlwt (requirements-dev.txt) writes the .xls fixture")
    wb = xlwt.Workbook(encoding="utf-8")
    ws = wb.add_sheet("人员")
    date_style = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    for c, v in enumerate(["姓名", "工号", "入职"]):
        ws.write(0, c, v)
    ws.write(1, 0, "王五")
    ws.write(1, 1, 1024)
    ws.write(1, 2, datetime.date(2022, 3, 1), date_style)
    f = tmp_path / "旧表.xls"
    wb.save(str(f))
    docs = load_file(f, settings())
    assert [(d.metadata["kind"], d.metadata["sheet"], d.metadata["page"]) for d in docs] == [("table", "人员", 1)]
    assert docs[0].page_content == "姓名: 王五 | 工号: 1024 | 入职: 2022-03-01"


def test_pptx_slides_titles_tables_notes(tmp_path):
    from pptx import Presentation
    from pptx.util import Inches

    prs = Presentation()
    s1 = prs.slides.add_slide(prs.slide_layouts[1])
    s1.shapes.title.text = "季度总结"
    s1.placeholders[1].text = "收入增长 20%"
    s1.notes_slide.notes_text_frame.text = "讲到这里停顿"
    s2 = prs.slides.add_slide(prs.slide_layouts[5])
    s2.shapes.title.text = "明细"
    table = s2.shapes.add_table(2, 2, Inches(1), Inches(2), Inches(4), Inches(1)).table
    for (r, c), v in {(0, 0): "地区", (0, 1): "收入", (1, 0): "华东", (1, 1): "120 万"}.items():
        table.cell(r, c).text = v
    f = tmp_path / "汇报.pptx"
    prs.save(f)
    docs = load_file(f, settings())
    assert [(d.metadata["kind"], d.metadata["page"]) for d in docs] == [("text", 1), ("text", 2), ("table", 2)]
    assert docs[0].page_content.splitlines() == ["# 季度总结", "收入增长 20%", "备注：讲到这里停顿"]
    assert docs[1].page_content == "# 明细"
    assert docs[2].page_content == "地区: 华东 | 收入: 120 万"


def test_epub_chapters_in_order(tmp_path):
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("zhiwen-test")
    book.set_title("测试书")
    book.set_language("zh")
    chapters = []
    for i, (title, body) in enumerate([("第一章 起源", "很久以前。"), ("第二章 发展", "后来的事。")], start=1):
        ch = epub.EpubHtml(title=title, file_name=f"c{i}.xhtml", lang="zh")
        ch.content = f"<html><body><h1>{title}</h1><p>{body}</p></body></html>"
        book.add_item(ch)
        chapters.append(ch)
    book.toc = chapters
    book.spine = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    f = tmp_path / "书.epub"
    epub.write_epub(str(f), book)
    body = text_of(load_file(f, settings()))
    assert body.index("# 第一章 起源") < body.index("很久以前。") \
        < body.index("# 第二章 发展") < body.index("后来的事。")


def test_eml_headers_gbk_body_and_attachment(tmp_path):
    msg = email.message.EmailMessage()
    msg["Subject"] = "关于下周例会的通知"
    msg["From"] = "张三 <zhangsan@example.com>"
    msg["To"] = "all@example.com"
    msg.set_content("各位同事：\n下周一上午十点开会。", charset="gb2312")
    msg.add_alternative("<p>各位同事：下周一上午十点开会。</p>", subtype="html")
    msg.add_attachment(b"PK\x03\x04", maintype="application", subtype="zip", filename="议程.zip")
    f = tmp_path / "通知.eml"
    f.write_bytes(msg.as_bytes())
    # What a Chinese mail client writes: a "gb2312"-labelled encoded word holding a GBK-only character (镕).
    gbk_subject = "=?gb2312?B?" + base64.b64encode("朱镕基讲话".encode("gbk")).decode() + "?="
    other = tmp_path / "讲话.eml"
    other.write_bytes(f"Subject: {gbk_subject}\nContent-Type: text/plain; charset=gb2312\n"
                      "Content-Transfer-Encoding: 8bit\n\n".encode() + "正文：镕".encode("gbk"))
    assert text_of(load_file(other, settings())).splitlines() == ["# 朱镕基讲话", "正文：镕"]
    body = text_of(load_file(f, settings()))
    lines = body.splitlines()
    assert lines[0] == "# 关于下周例会的通知"
    assert "发件人: 张三 <zhangsan@example.com>" in lines
    assert "下周一上午十点开会。" in body and "<p>" not in body
    assert "附件: 议程.zip" in lines


def test_rtf_chinese_code_page(tmp_path):
    # What Chinese WordPad/Word writes: \ansicpg936 and \'hh escapes of GBK bytes, plus a \u escape.
    gbk = "".join(f"\\'{b:02x}" for b in "中文测试".encode("gbk"))
    f = tmp_path / "说明.rtf"
    f.write_bytes(("{\\rtf1\\ansi\\ansicpg936\\deff0{\\fonttbl{\\f0 SimSun;}}\\f0 " + gbk + "\\par "
                   "\\u25991?\\u26723?\\par}").encode("ascii"))
    body = text_of(load_file(f, settings()))
    assert "中文测试" in body and "文档" in body


def test_odt_headings_and_table(tmp_path):
    from odf.opendocument import OpenDocumentText
    from odf.table import Table, TableCell, TableColumn, TableRow
    from odf.text import H, P

    doc = OpenDocumentText()
    doc.text.addElement(H(outlinelevel=1, text="总则"))
    doc.text.addElement(P(text="第一条 内容。"))
    table = Table(name="t")
    table.addElement(TableColumn(numbercolumnsrepeated=2))
    for row in (["项目", "金额"], ["差旅", "300"]):
        tr = TableRow()
        for v in row:
            cell = TableCell()
            cell.addElement(P(text=v))
            tr.addElement(cell)
        table.addElement(tr)
    doc.text.addElement(table)
    f = tmp_path / "制度.odt"
    doc.save(str(f))
    docs = load_file(f, settings())
    assert docs[0].page_content.splitlines() == ["# 总则", "第一条 内容。"]
    assert docs[1].metadata["kind"] == "table" and docs[1].page_content == "项目: 差旅 | 金额: 300"


def test_json_and_jsonl(tmp_path):
    records = tmp_path / "问答.json"
    records.write_text(json.dumps([{"问题": "年假几天", "答案": "5 天"}, {"问题": "几点上班", "答案": "9 点"}],
                                  ensure_ascii=False), encoding="utf-8")
    docs = load_file(records, settings())
    assert docs[0].metadata["kind"] == "table"
    assert docs[0].page_content == "问题: 年假几天 | 答案: 5 天\n问题: 几点上班 | 答案: 9 点"
    nested = tmp_path / "配置.json"
    nested.write_text(json.dumps({"公司": {"名称": "知问", "地址": ["北京", "上海"]}}, ensure_ascii=False),
                      encoding="utf-8")
    assert text_of(load_file(nested, settings())).splitlines() == [
        "公司.名称: 知问", "公司.地址[0]: 北京", "公司.地址[1]: 上海"]
    lines = tmp_path / "日志.jsonl"
    lines.write_text('{"事件": "登录"}\n{"事件": "退出"}\n', encoding="utf-8")
    assert text_of(load_file(lines, settings())) == "事件: 登录\n事件: 退出"
    broken = tmp_path / "坏.json"
    broken.write_text('{"a": 1,,}', encoding="utf-8")
    with pytest.raises(LoadError) as e:
        load_file(broken, settings())
    assert e.value.kind == "corrupt" and "第 1 行" in e.value.reason


def test_gbk_csv_with_semicolons_and_md_table(tmp_path):
    f = tmp_path / "名单.csv"
    f.write_bytes("姓名;城市\n王五;杭州\n赵六;成都\n".encode("gbk"))
    docs = load_file(f, settings())
    assert docs[0].page_content == "姓名: 王五 | 城市: 杭州\n姓名: 赵六 | 城市: 成都"
    md = tmp_path / "说明.md"
    md.write_text("价格表\n===\n\n| 商品 | 价格 |\n|---|---:|\n| 苹果 | 5 |\n\n```\n| 不是 | 表格 "
                  "|\n|---|---|\n```\n", encoding="utf-8")
    docs = load_file(md, settings())
    assert [d.metadata["kind"] for d in docs] == ["text", "table", "text"]
    assert docs[0].page_content == "# 价格表"  # setext heading rewritten for the splitter
    assert docs[1].page_content == "商品: 苹果 | 价格: 5"
    assert "| 不是 | 表格 |" in docs[2].page_content


def _text_image(text: str, size=(900, 160)):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((30, 50), text, font=ImageFont.load_default(size=48), fill="black")
    return img


def test_scanned_pdf_is_ocred_within_the_page_bound(tmp_path):
    pages = [_text_image(f"Invoice number {n}0517") for n in (1, 2, 3)]
    f = tmp_path / "扫描件.pdf"
    pages[0].save(f, save_all=True, append_images=pages[1:])
    docs = load_file(f, settings(ocr_max_pages=2))
    assert [(d.metadata["kind"], d.metadata["page"]) for d in docs] == [("ocr", 1), ("ocr", 2)]
    assert "10517" in docs[0].page_content.replace(" ", "") and "20517" in docs[1].page_content.replace(" ", "")
    with pytest.raises(LoadError) as e:
        load_file(f, settings(ocr=False))
    assert e.value.kind == "no_text" and "ingest.ocr" in e.value.reason


def test_pdf_text_quality_flags_garbled_layers():
    from ingest.loaders.pdf import text_quality

    assert text_quality("第一章 总则\n为规范管理") == (10, False)
    assert text_quality("\ue001\ue002\ue003\ue004 \ue005\ue006\ue007\ufffd 第一章") == (3, True)
    assert text_quality("\ue001\ue002") == (0, False)  # too short to judge: the page is OCRed as sparse anyway


def test_control_characters_are_dropped(tmp_path):
    f = tmp_path / "控制符.txt"
    f.write_bytes("排版\x02软连字符\x00与\x07响铃\x0c换页\t制表".encode())
    assert text_of(load_file(f, settings())) == "排版软连字符与响铃\n换页\t制表"


def test_password_pdf_and_owner_only_pdf(tmp_path, messy_docs):
    from pypdf import PdfReader, PdfWriter

    src = messy_docs / "unstructured" / "pdf_DA-1p.pdf"
    for user_password, expect_error in (("secret", True), ("", False)):
        w = PdfWriter()
        w.append(PdfReader(src))
        w.encrypt(user_password=user_password, owner_password="owner", permissions_flag=0)
        f = tmp_path / f"加密-{bool(user_password)}.pdf"
        with open(f, "wb") as out:
            w.write(out)
        if expect_error:
            with pytest.raises(LoadError) as e:
                load_file(f, settings())
            assert e.value.kind == "encrypted" and "去除密码" in e.value.reason
        else:  # printing/copying forbidden, but opening allowed: the text must still come out
            assert "Abomination" in text_of(load_file(f, settings()))


def test_ocr_crops_margins_and_pads_strips():
    from PIL import Image, ImageDraw

    from ingest import ocr

    page = Image.new("RGB", (1100, 1600), "white")
    ImageDraw.Draw(page).rectangle((300, 200, 500, 260), fill=(200, 40, 40))
    assert ocr._crop_to_content(page).size == (201 + 2 * ocr.CROP_MARGIN, 61 + 2 * ocr.CROP_MARGIN)
    assert ocr._crop_to_content(Image.new("RGB", (50, 50), "white")).size == (50, 50)
    assert ocr._pad_short_side(Image.new("RGB", (1600, 284), "white")).size == (1600, 800)
    assert ocr._pad_short_side(Image.new("RGB", (110, 449), "white")).size == (225, 449)
    assert ocr._pad_short_side(Image.new("RGB", (595, 842), "white")).size == (595, 842)


def test_image_without_text(tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(img).ellipse((100, 80, 300, 220), fill=(30, 120, 200))
    f = tmp_path / "圆.png"
    img.save(f)
    with pytest.raises(LoadError) as e:
        load_file(f, settings())
    assert e.value.kind == "no_text" and "圆.png" in e.value.reason
    with pytest.raises(LoadError) as e:
        load_file(f, settings(ocr=False))
    assert e.value.kind == "unsupported" and "ingest.ocr" in e.value.reason


@pytest.mark.parametrize(("name", "data", "kind"), [
    ("坏.pdf", b"%PDF-1.7\nthis is not a pdf", "corrupt"),
    ("坏.docx", b"PK\x03\x04 not really a zip", "corrupt"),
    ("坏.xlsx", b"\x00\x01garbage", "corrupt"),
    ("坏.png", b"\x89PNG\r\n\x1a\n broken", "corrupt"),
    ("坏.epub", b"not an epub", "corrupt"),
    ("空.pdf", b"", "empty"),
    ("空白.md", b" \n\t\n", "empty"),
    ("程序.exe", b"MZ", "unsupported"),
])
def test_specific_errors(tmp_path, name, data, kind):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(LoadError) as e:
        load_file(f, settings())
    assert e.value.kind == kind
    assert name in e.value.reason and CJK.search(e.value.reason)
    assert "Traceback" not in e.value.reason


def test_too_large(tmp_path):
    f = tmp_path / "大.txt"
    f.write_bytes("大".encode() * 400_000)  # 1.2 MB
    with pytest.raises(LoadError) as e:
        load_file(f, settings(max_file_mb=1))
    assert e.value.kind == "too_large" and "ingest.max_file_mb" in e.value.reason


def test_zip_bomb_office_file_is_refused_before_parsing(tmp_path):
    import zipfile

    f = tmp_path / "炸弹.docx"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", b" " * (6 * 1024 * 1024))  # 6 MB of spaces deflate to a few KB
    assert f.stat().st_size < 100_000
    with pytest.raises(LoadError) as e:
        load_file(f, settings(max_file_mb=1))
    assert e.value.kind == "too_large" and "解压后" in e.value.reason


@pytest.mark.skipif(HAS_DOC_CONVERTER, reason="a .doc converter is installed here")
def test_doc_without_converter_says_what_to_install(messy_docs):
    with pytest.raises(LoadError) as e:
        load_file(messy_docs / "unstructured" / "fake.doc", settings())
    assert e.value.kind == "unsupported" and "antiword" in e.value.reason


def test_load_error_pickles_and_extensions_listed():
    e = pickle.loads(pickle.dumps(LoadError("encrypted", "PDF「a.pdf」已加密")))
    assert (e.kind, e.reason, str(e)) == ("encrypted", "PDF「a.pdf」已加密", "PDF「a.pdf」已加密")
    assert {".pdf", ".docx", ".doc", ".pptx", ".xlsx", ".xls", ".epub", ".odt", ".rtf", ".eml", ".html", ".htm",
            ".xml", ".md", ".txt", ".csv", ".tsv", ".json", ".jsonl", ".png", ".jpg", ".jpeg", ".bmp", ".tiff",
            ".webp"} <= SUPPORTED_EXTENSIONS


def test_import_is_light_and_ocr_is_offline(messy_docs, monkeypatch):
    # Importing the loaders must not start OCR (ProcessPoolExecutor workers import this module).
    code = ("import sys, ingest.loaders, ingest.ocr; "
            "assert ingest.ocr._engine is None and 'rapidocr_onnxruntime' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True)
    from ingest import ocr

    assert all(p.is_file() and p.stat().st_size > 100_000 for p in ocr.model_files().values())

    def no_network(*args, **kwargs):
        raise AssertionError("OCR tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    docs = load_file(messy_docs / "langchain-chatchat" / "ocr_test.jpg", settings())
    assert "横向文本框" in text_of(docs, "ocr")
