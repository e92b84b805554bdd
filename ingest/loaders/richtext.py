"""OpenDocument text (.odt, odfpy) and RTF (striprtf)."""
from __future__ import annotations

import re
import zipfile

from odf import teletype
from odf.element import Element
from odf.namespaces import TABLENS, TEXTNS
from odf.opendocument import load as odf_load
from striprtf.striprtf import rtf_to_text

from ingest.encoding import canonical, decode_bytes
from ingest.loaders.base import Ctx, LoadError, heading


def load_odt(ctx: Ctx) -> None:
    try:
        with zipfile.ZipFile(ctx.path) as z:
            manifest = z.read("META-INF/manifest.xml") if "META-INF/manifest.xml" in z.namelist() else b""
    except zipfile.BadZipFile as e:
        raise LoadError("corrupt", f"ODT 文档「{ctx.name}」无法打开（{e}）：请用 WPS/LibreOffice "
                                   "打开另存后重新导入") from e
    if b"encryption-data" in manifest:
        raise LoadError("encrypted", f"ODT 文档「{ctx.name}」设置了密码，无法读取：请去除密码后重新导入")
    try:
        doc = odf_load(str(ctx.path))
    except Exception as e:
        raise LoadError("corrupt", f"ODT 文档「{ctx.name}」无法解析（{type(e).__name__}: {str(e)[:120]}）："
                                   "请另存后重新导入") from e
    lines: list[str] = []
    _walk_odf(ctx, doc.text, lines)
    ctx.add_text("\n".join(lines))


def _walk_odf(ctx: Ctx, node: Element, lines: list[str]) -> None:
    for child in node.childNodes:
        if child.nodeType != child.ELEMENT_NODE:
            continue
        qname = child.qname
        if qname == (TEXTNS, "h"):
            level = child.getAttrNS(TEXTNS, "outline-level")
            lines.append(heading(int(level) if level and str(level).isdigit() else 1, teletype.extractText(child)))
        elif qname == (TEXTNS, "p"):
            text = teletype.extractText(child).strip()
            if text:
                lines.append(text)
        elif qname == (TEXTNS, "list-item"):
            before = len(lines)
            _walk_odf(ctx, child, lines)
            if len(lines) > before:
                lines[before] = "- " + lines[before]
        elif qname == (TABLENS, "table"):
            ctx.add_text("\n".join(lines))
            lines.clear()
            ctx.add_table(_odf_rows(child))
        else:
            _walk_odf(ctx, child, lines)


def _odf_rows(table: Element) -> list[list[str]]:
    rows = []
    for row in _find(table, (TABLENS, "table-row")):
        cells = []
        for cell in row.childNodes:
            if cell.nodeType != cell.ELEMENT_NODE \
                    or cell.qname not in ((TABLENS, "table-cell"), (TABLENS, "covered-table-cell")):
                continue
            repeat = cell.getAttrNS(TABLENS, "number-columns-repeated")
            # Spreadsheet-style rows repeat an empty cell thousands of times: cap it.
            n = min(int(repeat), 50) if repeat and str(repeat).isdigit() else 1
            cells.extend([teletype.extractText(cell).strip()] * n)
        rows.append(cells)
    return rows


def _find(node: Element, qname: tuple[str, str]) -> list[Element]:
    out = []
    for child in node.childNodes:
        if child.nodeType == child.ELEMENT_NODE:
            if child.qname == qname:
                out.append(child)
            else:
                out.extend(_find(child, qname))
    return out


_ANSICPG = re.compile(rb"\\ansicpg(\d+)")


def load_rtf(ctx: Ctx) -> None:
    data = ctx.path.read_bytes()
    if not data.lstrip().startswith(b"{\\rtf"):
        raise LoadError("corrupt", f"文件「{ctx.name}」不是 RTF 格式：请用 Word/WPS 打开另存为 .rtf 或 .docx "
                                   "后重新导入")
    # \'hh escapes are bytes in the document's ANSI code page (\ansicpg936 = GBK for Chinese Word files).
    m = _ANSICPG.search(data[:4096])
    codepage = canonical(f"cp{int(m.group(1))}") if m else None
    markup = decode_bytes(data).text
    try:
        text = rtf_to_text(markup, encoding=codepage or "cp1252", errors="replace")
    except Exception as e:
        raise LoadError("corrupt", f"RTF 文件「{ctx.name}」无法解析（{type(e).__name__}）：请用 Word/WPS 另存为 .docx "
                                   "后重新导入") from e
    ctx.add_text(text, encoding=codepage or "cp1252")
