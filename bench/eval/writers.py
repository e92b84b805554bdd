"""Write evaluation passages out as real files in the formats people keep documents in.

One passage per file, named `<passage id>.<ext>`, so every chunk's source names its passage. Formats rotate
over FORMATS: UTF-8 and GBK plain text, Markdown, Word (.docx), PDF and HTML. The title (if any) becomes the
file's heading. PDFs use reportlab's built-in CID font STSong-Light: no font file is needed offline, and the
text layer maps back to Unicode (checked by extraction with pypdfium2 in tests/test_eval_writers.py).
"""
from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from pathlib import Path
from xml.sax.saxutils import escape

from bench.eval.datasets import Passage

FORMATS: tuple[str, ...] = ("txt-utf8", "txt-gbk", "md", "docx", "pdf", "html")


def _txt_utf8(p: Passage, path: Path) -> Path:
    path = path.with_suffix(".txt")
    path.write_text(f"{p.title}\n\n{p.text}\n" if p.title else f"{p.text}\n", encoding="utf-8")
    return path


def _txt_gbk(p: Passage, path: Path) -> Path:
    # GBK cannot encode every character of Chinese Wikipedia; GB18030 is its superset and what a Chinese
    # Windows machine writes for them, so such passages still exercise the non-UTF-8 path.
    text = f"{p.title}\n\n{p.text}\n" if p.title else f"{p.text}\n"
    path = path.with_suffix(".txt")
    try:
        path.write_bytes(text.encode("gbk"))
    except UnicodeEncodeError:
        path.write_bytes(text.encode("gb18030"))
    return path


def _md(p: Passage, path: Path) -> Path:
    path = path.with_suffix(".md")
    path.write_text(f"# {p.title}\n\n{p.text}\n" if p.title else f"{p.text}\n", encoding="utf-8")
    return path


def _docx(p: Passage, path: Path) -> Path:
    import docx  # python-docx

    path = path.with_suffix(".docx")
    doc = docx.Document()
    if p.title:
        doc.add_heading(p.title, level=1)
    doc.add_paragraph(p.text)
    doc.save(str(path))
    return path


def _pdf(p: Passage, path: Path) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.platypus import Paragraph, SimpleDocTemplate

    if "STSong-Light" not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    # wordWrap="CJK" breaks lines between any two Chinese characters, as Chinese typesetting does.
    body = ParagraphStyle("body", fontName="STSong-Light", fontSize=11, leading=16, wordWrap="CJK")
    head = ParagraphStyle("head", parent=body, fontSize=16, leading=22, spaceAfter=8)
    path = path.with_suffix(".pdf")
    story = ([Paragraph(escape(p.title), head)] if p.title else []) + [Paragraph(escape(p.text), body)]
    SimpleDocTemplate(str(path), pagesize=A4, title=p.title or p.id).build(story)
    return path


def _html(p: Passage, path: Path) -> Path:
    path = path.with_suffix(".html")
    title = html.escape(p.title or p.id)
    heading = f"<h1>{html.escape(p.title)}</h1>\n" if p.title else ""
    path.write_text(
        f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8"><title>{title}</title></head>\n'
        f"<body>\n{heading}<p>{html.escape(p.text)}</p>\n</body></html>\n",
        encoding="utf-8",
    )
    return path


_WRITERS: dict[str, Callable[[Passage, Path], Path]] = {
    "txt-utf8": _txt_utf8, "txt-gbk": _txt_gbk, "md": _md, "docx": _docx, "pdf": _pdf, "html": _html,
}


def write_passage(passage: Passage, folder: Path, fmt: str) -> Path:
    """Write one passage as `folder/<id>.<ext>` in format `fmt` (one of FORMATS); returns the path."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown file format {fmt!r}; choose from {', '.join(FORMATS)}")
    folder.mkdir(parents=True, exist_ok=True)
    safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in passage.id)
    return _WRITERS[fmt](passage, folder / safe_id)


def write_corpus(passages: Iterable[Passage], folder: Path,
                 formats: tuple[str, ...] = FORMATS) -> dict[str, tuple[str, str]]:
    """Write passages round-robin over `formats`; returns {file name: (passage id, format)}."""
    if not formats:
        raise ValueError("formats must name at least one of " + ", ".join(FORMATS))
    out: dict[str, tuple[str, str]] = {}
    for i, p in enumerate(passages):
        fmt = formats[i % len(formats)]
        path = write_passage(p, folder, fmt)
        out[path.name] = (p.id, fmt)
    return out
