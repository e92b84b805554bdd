"""Word documents: .docx (python-docx), legacy .doc (antiword / catdoc, or LibreOffice converting to .docx).

docx: paragraphs (and their text boxes) and tables in body order; headings (built-in "Heading N"/"标题 N" styles,
"Title", or any style with an outline level) become '#' lines; list paragraphs get '- '; tables become table
Documents; header and footer text is kept once at the end; embedded pictures are OCRed (counted against
settings.ocr_max_pages).
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import docx
from docx.opc.constants import RELATIONSHIP_TYPE as RT
from docx.oxml.ns import qn
from docx.table import Table
from docx.text.paragraph import Paragraph

from ingest.loaders.base import Ctx, LoadError, heading

log = logging.getLogger(__name__)
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_HEADING_STYLE = re.compile(r"^(heading|标题)\s*(\d)$", re.IGNORECASE)
CONVERT_TIMEOUT_S = 120


def check_encrypted_office(ctx: Ctx, what: str) -> None:
    """Password-protected Office files are OLE containers; say so instead of "not a zip file"."""
    with open(ctx.path, "rb") as f:
        if f.read(8) != _OLE_MAGIC:
            return
    import msoffcrypto
    from msoffcrypto.exceptions import FileFormatError, ParseError

    try:
        with open(ctx.path, "rb") as f:
            encrypted = msoffcrypto.OfficeFile(f).is_encrypted()
    except (FileFormatError, ParseError, OSError, ValueError, KeyError, IndexError):
        return  # not an Office container msoffcrypto knows: the format's own parser reports it
    if encrypted:
        raise LoadError("encrypted", f"{what}「{ctx.name}」设置了打开密码，无法读取：请在 Office 中去除密码后重新导入")


def load_docx(ctx: Ctx) -> None:
    check_encrypted_office(ctx, "Word 文档")
    try:
        document = docx.Document(str(ctx.path))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise LoadError("corrupt", f"Word 文档「{ctx.name}」无法打开（{e}）：文件可能已损坏或不是 .docx，请用 Word "
                                   "打开并另存为 .docx 后重新导入") from e
    lines: list[str] = []
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            line = _paragraph_line(block)
            if line:
                lines.append(line)
            lines.extend(_text_boxes(block))
        elif isinstance(block, Table):
            ctx.add_text("\n".join(lines))
            lines = []
            ctx.add_table(_table_rows(block))
    ctx.add_text("\n".join(lines))
    _headers_footers(ctx, document)
    ctx.ocr_images([rel.target_part.blob for rel in document.part.rels.values()
                    if rel.reltype == RT.IMAGE and not rel.is_external])


def _paragraph_line(p: Paragraph) -> str:
    text = p.text.strip()
    if not text:
        return ""
    level = _heading_level(p)
    if level:
        return heading(level, text)
    style = (p.style.name if p.style is not None else "") or ""
    if "list" in style.lower() or p._p.xpath("./w:pPr/w:numPr"):
        return f"- {text}"
    return text


_MC_FALLBACK = "{http://schemas.openxmlformats.org/markup-compatibility/2006}Fallback"


def _text_boxes(p: Paragraph) -> list[str]:
    """Text in text boxes anchored to `p` (python-docx's p.text skips them; flowchart labels live there).

    Word stores each modern text box twice (DrawingML choice + VML fallback): the fallback copy is skipped.
    """
    out = []
    for box in p._p.iter(qn("w:txbxContent")):
        if any(anc.tag == _MC_FALLBACK for anc in box.iterancestors()):
            continue
        for para in box.iter(qn("w:p")):
            text = "".join(t.text or "" for t in para.iter(qn("w:t"))).strip()
            if text:
                out.append(text)
    return out


def _heading_level(p: Paragraph) -> int:
    style = p.style
    name = (style.name if style is not None else "") or ""
    if name.lower() == "title":
        return 1
    m = _HEADING_STYLE.match(name.strip())
    if m:
        return int(m.group(2))
    # Custom or localised heading styles carry an outline level (0-8; 9 = body text) on the paragraph or style.
    levels = p._p.xpath("./w:pPr/w:outlineLvl/@w:val")
    while not levels and style is not None:
        levels = style.element.xpath("./w:pPr/w:outlineLvl/@w:val")
        style = style.base_style
    if levels and levels[0].isdigit() and int(levels[0]) < 9:
        return int(levels[0]) + 1
    return 0


def _table_rows(table: Table) -> list[list[str]]:
    rows = []
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:
            # A merged cell appears once per grid column it spans; keep it once.
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            parts = [cell.text] + [" ".join(c.text for r in t.rows for c in r.cells) for t in cell.tables]
            cells.append(" ".join(" ".join(parts).split()))
        rows.append(cells)
    return rows


def _headers_footers(ctx: Ctx, document: docx.document.Document) -> None:
    seen: list[str] = []
    for section in document.sections:
        for part in (section.header, section.first_page_header, section.even_page_header,
                     section.footer, section.first_page_footer, section.even_page_footer):
            if part is None or part.is_linked_to_previous:
                continue
            text = "\n".join(p.text.strip() for p in part.paragraphs if p.text.strip())
            if text and text not in seen:
                seen.append(text)
    if seen:
        ctx.add_text("\n".join(seen), part="header_footer")


def load_doc(ctx: Ctx) -> None:
    """Legacy Word: antiword, then catdoc, then LibreOffice (soffice) converting to .docx; none -> 'unsupported'."""
    check_encrypted_office(ctx, "Word 文档")
    with open(ctx.path, "rb") as f:
        if f.read(8) != _OLE_MAGIC:
            # Many ".doc" files are really RTF, HTML or .docx saved under the old name.
            raise LoadError("corrupt", f"文件「{ctx.name}」不是 Word 97-2003 格式：请用 Word 打开并另存为 .docx "
                                       "后重新导入")
    converters = []
    if shutil.which("antiword"):
        converters.append(["antiword", "-m", "UTF-8.txt", "-w", "0", str(ctx.path)])
    if shutil.which("catdoc"):
        # catdoc reads the short documents antiword refuses ("text stream ... too small to handle").
        converters.append(["catdoc", "-d", "utf-8", "-w", str(ctx.path)])
    failure: LoadError | None = None
    for cmd in converters:
        try:
            text = _run(cmd, ctx)
        except LoadError as e:
            failure = e
            continue
        if text.strip():
            ctx.add_text(text)
            return
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if failure is not None and not soffice:
        raise failure
    if converters and not soffice:
        return  # the converters ran and found no text: load_file reports the file as empty
    if soffice:
        with tempfile.TemporaryDirectory() as tmp:
            # A private profile dir: a running desktop LibreOffice would otherwise swallow the request.
            _run([soffice, f"-env:UserInstallation=file://{tmp}/profile", "--headless", "--convert-to", "docx",
                  "--outdir", tmp, str(ctx.path)], ctx)
            out = Path(tmp) / (ctx.path.stem + ".docx")
            if not out.is_file():
                raise LoadError("corrupt", f"LibreOffice 未能转换「{ctx.name}」：请用 Word 打开并另存为 .docx "
                                           "后重新导入")
            load_docx(Ctx(path=out, settings=ctx.settings, ocr_left=ctx.ocr_left, docs=ctx.docs))
        for d in ctx.docs:
            d.metadata["source"] = str(ctx.path)
        return
    raise LoadError(
        "unsupported",
        f"读取 .doc 文件「{ctx.name}」需要 antiword、catdoc 或 LibreOffice，本机都没有安装："
        "请让管理员安装（apt-get install antiword catdoc），或用 Word 另存为 .docx 后重新导入",
    )


def _run(cmd: list[str], ctx: Ctx) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=CONVERT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise LoadError("corrupt", f"转换「{ctx.name}」超过 {CONVERT_TIMEOUT_S} 秒仍未完成：请用 Word 另存为 .docx "
                                   "后重新导入") from e
    if res.returncode != 0:
        msg = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        detail = msg[-1][:160] if msg else f"exit code {res.returncode}"
        raise LoadError("corrupt", f"无法读取 Word 文档「{ctx.name}」（{detail}）：请用 Word 打开并另存为 .docx "
                                   "后重新导入")
    return res.stdout.decode("utf-8", errors="replace")
