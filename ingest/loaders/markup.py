"""HTML and XML: text in reading order, h1-h6 as '#' headings, data tables as table Documents.

Encoding: a charset the page declares (<meta charset>, XML prolog) is used when the bytes decode cleanly with it,
otherwise ingest.encoding detects (see decode_markup). Parsing is lxml through BeautifulSoup, which never
fetches external entities or DTDs.

Feeds (RSS 0.9x/1.0/2.0, Atom 0.3/1.0, saved as .xml) are read with feedparser: the feed's title and each
entry's title and content, as '#'/'##' headings and HTML text; the bookkeeping (ids such as
tag:blogger.com,1999:..., timestamps, generator, flags such as <draft>false</draft>, links) is left out, and the
entries' escaped HTML (<br />, <p>) is read as HTML, never kept as literal markup.
"""
from __future__ import annotations

import html
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


_FEED_ROOTS = {"rss", "feed", "rdf", "channel"}


def load_xml(ctx: Ctx) -> None:
    """XML: the text of every element, one per line; pages that are really XHTML/HTML go to the HTML walker, feeds
    to feed_to_docs."""
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
    if root is not None and etree.QName(root).localname.lower() in _FEED_ROOTS and feed_to_docs(ctx, body, decoded):
        return
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


def feed_to_docs(ctx: Ctx, xml: str, decoded: Decoded) -> bool:
    """An RSS/Atom feed into ctx as one HTML page: feed title (h1), subtitle, then per entry its title (h2) and
    content. False when feedparser finds no entry with text (the caller then reads the XML as plain XML)."""
    import feedparser

    # Bytes, never a str: feedparser.parse fetches a string that looks like a URL. UTF-8, as the prolog is gone.
    feed = feedparser.parse(xml.encode("utf-8"), response_headers={"content-type": "application/xml; charset=utf-8"},
                            resolve_relative_uris=False)
    parts: list[str] = []
    for entry in feed.entries:
        body = _entry_html(entry)
        title = entry.get("title", "").strip()
        if body or title:
            parts.append(f"<h2>{html.escape(title)}</h2>" if title else "")
            parts.append(f"<div>{body}</div>")
    if not parts:
        return False
    head = [f"<h1>{html.escape(t)}</h1>" if (t := feed.feed.get("title", "").strip()) else ""]
    subtitle = feed.feed.get("subtitle_detail") or feed.feed.get("tagline_detail")
    if subtitle and subtitle.get("value", "").strip():
        head.append(f"<p>{_detail_html(subtitle)}</p>")
    html_to_docs(ctx, "<html><body>" + "".join(head + parts) + "</body></html>", encoding=decoded.encoding)
    return True


def _entry_html(entry) -> str:
    """The entry's fullest text as HTML: content, else summary (feedparser has already unescaped escaped modes)."""
    for detail in [*entry.get("content", []), entry.get("summary_detail")]:
        if detail and detail.get("value", "").strip():
            return _detail_html(detail)
    return ""


def _detail_html(detail) -> str:
    value = detail.get("value", "")
    if "html" in (detail.get("type") or "text/html"):
        # Some engines escape their HTML twice: a second round of tags shows up as text ("<br />"); parse it too.
        if re.search(r"&lt;(br|p|div|a|img|span)\b", value, re.I) and "<" not in value:
            value = html.unescape(value)
        return value
    return html.escape(value).replace("\n", "<br>")
