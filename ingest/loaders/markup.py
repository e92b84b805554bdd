"""HTML and XML: text in reading order, h1-h6 as '#' headings, data tables as table Documents.

Encoding: a charset the page declares (<meta charset>, XML prolog) is used when the bytes decode cleanly with it,
otherwise ingest.encoding detects (see decode_markup). Parsing is lxml through BeautifulSoup, which never
fetches external entities or DTDs.
"""
from __future__ import annotations

import re
import warnings

from bs4 import BeautifulSoup, Comment, NavigableString, Tag, XMLParsedAsHTMLWarning
from bs4.dammit import EncodingDetector
from lxml import etree

from ingest.encoding import Decoded, decode_bytes
from ingest.loaders.base import Ctx, heading

_DROP = {"script", "style", "noscript", "template", "head", "svg", "iframe", "object", "canvas", "button",
         "select", "option", "input", "form"}
_BLOCK = {"address", "article", "aside", "blockquote", "body", "center", "dd", "details", "dialog", "dir",
          "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "header", "hr", "li", "main",
          "menu", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th",
          "thead", "tr", "ul", "caption", "html", "br"}
_HEADING = re.compile(r"^h([1-6])$")


def decode_markup(data: bytes, is_html: bool) -> Decoded:
    declared = EncodingDetector.find_declared_encoding(data[:8192], is_html=is_html)
    return decode_bytes(data, declared)


def load_html(ctx: Ctx) -> None:
    decoded = decode_markup(ctx.path.read_bytes(), is_html=True)
    html_to_docs(ctx, decoded.text, encoding=decoded.encoding)


def html_to_docs(ctx: Ctx, html: str, **meta: object) -> None:
    """Walk an HTML string into ctx: text Documents interleaved with table Documents, in page order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        soup = BeautifulSoup(html, "lxml")
    walker = _Walker(ctx, meta)
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = soup.body or soup
    # The <title> leads when the body has no heading of its own: it names the page for the splitter.
    if title and not body.find(re.compile(r"^h[1-6]$")):
        walker.lines.append(heading(1, title))
    walker.walk(body)
    walker.flush()


class _Walker:
    def __init__(self, ctx: Ctx, meta: dict) -> None:
        self.ctx, self.meta = ctx, meta
        self.lines: list[str] = []
        self.inline: list[str] = []

    def newline(self) -> None:
        line = " ".join("".join(self.inline).split())
        if line:
            self.lines.append(line)
        self.inline = []

    def flush(self) -> None:
        self.newline()
        self.ctx.add_text("\n".join(self.lines), **self.meta)
        self.lines = []

    def walk(self, root: Tag) -> None:
        """Depth-first over `root`'s children with an explicit stack: pages nested thousands of <div>s deep
        must not hit Python's recursion limit. A (tag, True) entry closes a block element."""
        stack: list[tuple[object, bool]] = [(c, False) for c in reversed(list(root.children))]
        while stack:
            child, closing = stack.pop()
            if closing:
                self.newline()
                continue
            if isinstance(child, Comment):
                continue
            if isinstance(child, NavigableString):
                if type(child) is NavigableString or child.__class__.__name__ == "CData":
                    self.inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            name = (child.name or "").lower()
            if name in _DROP:
                continue
            m = _HEADING.match(name)
            if m:
                self.newline()
                self.lines.append(heading(int(m.group(1)), child.get_text(" ", strip=True)))
                continue
            if name in ("pre", "textarea") or (name == "code" and "\n" in child.get_text()):
                # Preformatted text keeps its line breaks (code, poems, fixed-width tables).
                self.newline()
                self.lines.extend(ln.rstrip() for ln in child.get_text().strip("\n").split("\n") if ln.strip())
                continue
            if name == "table" and _is_data_table(child):
                self.flush()
                self.ctx.add_table(_table_rows(child), **self.meta)
                continue
            if name == "img":
                alt = (child.get("alt") or "").strip()
                if alt:
                    self.inline.append(f" {alt} ")
                continue
            if name == "li":
                self.newline()
                self.inline.append("- ")
            elif name in _BLOCK:
                self.newline()
            if name in ("td", "th"):
                self.inline.append(" ")
            if name in _BLOCK or name == "li":
                stack.append((child, True))
            stack.extend((c, False) for c in reversed(list(child.children)))


def _is_data_table(table: Tag) -> bool:
    """A table of data (kept as rows) rather than page layout (walked as text): no nested tables, 2+ rows x 2+ cols."""
    if table.find("table"):
        return False
    rows = _table_rows(table)
    return len(rows) >= 2 and max((len(r) for r in rows), default=0) >= 2


def _table_rows(table: Tag) -> list[list[str]]:
    rows = []
    for tr in table.find_all("tr"):
        cells = []
        for cell in tr.find_all(["td", "th"], recursive=False):
            text = cell.get_text(" ", strip=True)
            # colspan repeats the value so that the columns stay aligned with the header.
            span = int(cell.get("colspan", 1)) if str(cell.get("colspan", "1")).isdigit() else 1
            cells.extend([text] * max(1, min(span, 50)))
        if cells:
            rows.append(cells)
    return rows


def load_xml(ctx: Ctx) -> None:
    """XML: the text of every element, one per line; pages that are really XHTML/HTML go to the HTML walker."""
    data = ctx.path.read_bytes()
    decoded = decode_markup(data, is_html=False)
    text = decoded.text
    head = text[:2048].lower()
    if "<html" in head or "<!doctype html" in head:
        html_to_docs(ctx, text, encoding=decoded.encoding)
        return
    # The prolog would name the original charset; we hand lxml UTF-8 bytes, so drop it.
    body = re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)
    parser = etree.XMLParser(recover=True, resolve_entities=False, no_network=True, huge_tree=False,
                             remove_comments=True, remove_pis=True, encoding="utf-8")
    root = etree.fromstring(body.encode("utf-8"), parser)
    if root is None:
        ctx.add_text(BeautifulSoup(text, "lxml").get_text("\n"), encoding=decoded.encoding)
        return
    lines: list[str] = []
    for el in root.iter():
        for piece in (el.text, el.tail):
            piece = (piece or "").strip()
            if not piece:
                continue
            if "<" in piece and ">" in piece:
                # RSS/Atom carry escaped HTML in <description>/<content>: read it as HTML, not as tags.
                piece = BeautifulSoup(piece, "lxml").get_text(" ", strip=True)
            if piece:
                lines.append(" ".join(piece.split()))
    ctx.add_text("\n".join(lines), encoding=decoded.encoding)
