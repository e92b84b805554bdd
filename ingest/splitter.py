"""Chinese-aware splitting: a file's Documents → Chunks (see docs/ARCHITECTURE.md, "ingest/splitter.py").

    split_sentences("你好。再见！") -> ["你好。", "再见！"]

Rules, in the order they apply:
  1. Consecutive Documents of one page with the same metadata form one stream; a chunk never crosses a page.
  2. Each line of a text stream is a heading, part of a Markdown table, or body text. Headings (Markdown `#`,
     第X编/章/节/条, 一、, （一）, 1. / 1.1 / 1.1.1) go into `heading_path`, nested by rank; the path carries over
     from one page to the next. A chunk never crosses a heading.
  3. Body text is cut into sentences (terminators and closing quotes stay with their sentence; a line break ends a
     sentence); a sentence longer than `chunk_size` is cut at clause marks (，、：), then hard-cut.
  4. Whole sentences are packed up to `chunk_size` characters; each chunk after the first in a section starts with
     the trailing whole sentences of the previous one, up to `chunk_overlap` characters.
  5. Tables (Documents with kind == "table", and Markdown tables in text) are packed by whole rows, each chunk
     starting with the header; a row is cut only when it cannot fit alone.
  6. With `count_tokens` and `max_tokens`, no chunk's `embedding_text()` (heading path + text) counts more than
     `max_tokens`: a chunk that would is packed smaller, a piece that would is cut smaller.

Chunk texts are exact slices of the input (whitespace at their ends stripped), so nothing is rewritten and nothing
but whitespace and Markdown heading marks (`##`) is dropped: a heading with no body of its own becomes a chunk.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.documents import Document
from langchain_text_splitters import TextSplitter

from configs import load_settings
from retrieval.sentences import CLOSERS, SENTENCE_END, split_sentences
from retrieval.types import Chunk

__all__ = ["ChineseTextSplitter", "split_documents", "split_sentences"]

TokenCounter = Callable[[str], int]
Span = tuple[int, int]  # [start, end) offsets into the stream text

# ---------------------------------------------------------------------------------------------- sentences ---------
# One definition of "a sentence" for chunking and for prompt trimming: retrieval/sentences.py (re-exported here).
_CLAUSE_END = re.compile(rf"[，、：,:]+[{CLOSERS}]*")


def _strip_span(text: str, s: int, e: int) -> Span:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _spans(text: str, s: int, e: int, pattern: re.Pattern[str]) -> list[Span]:
    """Non-empty, whitespace-stripped pieces of text[s:e], each ending at a match of `pattern` (or at e)."""
    out: list[Span] = []
    pos = s
    for m in pattern.finditer(text, s, e):
        a, b = _strip_span(text, pos, m.end())
        if a < b:
            out.append((a, b))
        pos = m.end()
    a, b = _strip_span(text, pos, e)
    if a < b:
        out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------- headings ----------
_CN_DIGITS = "零〇一二三四五六七八九十百千两"
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_DI_HEADING = re.compile(rf"^第[{_CN_DIGITS}\d]{{1,6}}(编|部分|章|节|条)")
_CN_ENUM = re.compile(rf"^[{_CN_DIGITS}]{{1,4}}、")
_CN_PAREN = re.compile(rf"^[（(][{_CN_DIGITS}]{{1,4}}[）)]")
# 1. / 1、 / 1.1 / 1.1.1 followed by a title that starts with a letter (not "3.5 亿" or "2023.10.1").
_NUMBERED = re.compile(r"^(\d{1,3}(?:[.．]\d{1,3}){0,4})([.．、]?)[ \t\u3000]*(?=[^\W\d_]|[“《「*])")
_FENCE = re.compile(r"^\s*(```|~~~)")
# Rank of each heading family below Markdown headings: a heading closes every open heading of equal or lower rank.
_DI_RANK = {"编": 0, "部分": 0, "章": 1, "节": 2, "条": 3}
_CN_ENUM_RANK, _CN_PAREN_RANK, _NUMBERED_RANK0 = 3, 4, 4
_MAX_MD_HEADING = 100  # longer "# ..." lines are body text: real titles are short
_MAX_HEADING = 50  # the same for 第X章 / 一、 / 1.1 style headings, which are easily confused with body text
_NOT_TITLE_END = tuple("。！；…!;，,：:、.")  # a title may ask a question ("1. 如何申请？"), not end a statement


@dataclass(frozen=True)
class _Heading:
    rank: tuple[int, int]  # (0, markdown level) or (1, family rank); smaller is outer
    title: str
    body_at: int = 0  # "第一条　为了……。": where the article's own text starts on the heading's line (0: none)
    listy: bool = False  # 一、 / （一） / 1.: a run of them with nothing between is a list, not headings


def _ends_like_title(line: str) -> bool:
    return not line.rstrip("*_` \t").endswith(_NOT_TITLE_END)


def _match_heading(line: str) -> _Heading | None:
    """The heading a stripped line opens, or None for body text. Pure: looks at this line only."""
    m = _MD_HEADING.match(line)
    if m:
        return _Heading((0, len(m.group(1))), m.group(2).strip()) if len(line) <= _MAX_MD_HEADING else None
    m = _DI_HEADING.match(line)
    if m:
        kind = m.group(1)
        rest = line[m.end():]
        if kind == "条" and rest[:1] in (" ", "\u3000", "\t") and rest.strip():
            # A law article carries its text on the same line: the article number is the heading, the rest is body.
            return _Heading((1, _DI_RANK[kind]), line[: m.end()], body_at=m.end() + len(rest) - len(rest.lstrip()))
        if len(line) <= _MAX_HEADING and _ends_like_title(line) and not rest.startswith(("的", "中", "规定", "所")):
            return _Heading((1, _DI_RANK[kind]), line)
        return None
    if len(line) > _MAX_HEADING or not _ends_like_title(line):
        return None
    if _CN_ENUM.match(line):
        return _Heading((1, _CN_ENUM_RANK), line, listy=True)
    if _CN_PAREN.match(line):
        return _Heading((1, _CN_PAREN_RANK), line, listy=True)
    m = _NUMBERED.match(line)
    if m:
        depth = m.group(1).count(".") + m.group(1).count("．") + 1
        if depth == 1 and not m.group(2):
            return None  # "1 abc" is not a numbered heading; "1." / "1、" are
        return _Heading((1, _NUMBERED_RANK0 + depth), line, listy=True)
    return None


# ---------------------------------------------------------------------------------------------- tables ------------
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


# ---------------------------------------------------------------------------------------------- the splitter ------
@dataclass
class _Open:
    heading: _Heading
    used: bool = False  # some chunk carries it in its heading_path


@dataclass
class _FileSplitter:
    """Splits the Documents of one file; holds the heading stack that carries across its pages."""

    source: str
    sha256: str
    chunk_size: int
    chunk_overlap: int
    count_tokens: TokenCounter | None
    max_tokens: int | None
    stack: list[_Open] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    # -- limits ------------------------------------------------------------------------------------------------
    def _path(self) -> tuple[str, ...]:
        return tuple(o.heading.title for o in self.stack)

    def _fits_tokens(self, path: tuple[str, ...], text: str) -> bool:
        if self.count_tokens is None or self.max_tokens is None:
            return True
        return self.count_tokens(Chunk(text, "", "", 0, heading_path=path).embedding_text()) <= self.max_tokens

    def _token_safe_path(self) -> tuple[str, ...]:
        """The heading path, outer headings dropped if it alone would take more than half of max_tokens."""
        path = self._path()
        if self.count_tokens is None or self.max_tokens is None:
            return path
        budget = self.max_tokens // 2
        while len(path) > 1 and self.count_tokens(" > ".join(path)) > budget:
            path = path[1:]
        while path and path[0] and self.count_tokens(path[0]) > budget:
            path = (path[0][: len(path[0]) // 2],)  # a pathological 100-character heading and a tiny model
        return path

    def _emit(self, text: str, path: tuple[str, ...], page: int | None, meta: dict[str, Any]) -> None:
        for o in self.stack:
            o.used = True
        self.chunks.append(
            Chunk(text=text, source=self.source, sha256=self.sha256, position=len(self.chunks), page=page,
                  heading_path=path, metadata=dict(meta))
        )

    # -- headings ----------------------------------------------------------------------------------------------
    def _close_until(self, rank: tuple[int, int] | None, page: int | None, meta: dict[str, Any]) -> None:
        """Close open headings of rank >= `rank` (all for None); one that got no chunk becomes a chunk itself."""
        while self.stack and (rank is None or self.stack[-1].heading.rank >= rank):
            top = self.stack.pop()
            if not top.used:
                self._emit(top.heading.title, self._token_safe_path(), page, meta)

    def _open(self, h: _Heading, page: int | None, meta: dict[str, Any]) -> None:
        self._close_until(h.rank, page, meta)
        self.stack.append(_Open(h))

    # -- one stream of text (one page) -------------------------------------------------------------------------
    def add_text(self, text: str, page: int | None, meta: dict[str, Any]) -> None:
        lines = _line_spans(text)
        headings = _detect_headings(text, lines)
        body_start: int | None = None  # start of the current run of body lines
        i = 0
        while i < len(lines):
            s, e = lines[i]
            h = headings[i]
            is_table = (i + 1 < len(lines) and _TABLE_ROW.match(text[s:e])
                        and _TABLE_RULE.match(text[lines[i + 1][0]:lines[i + 1][1]]))
            if h is None and not is_table:
                body_start = s if body_start is None else body_start
                i += 1
                continue
            if body_start is not None:
                self._add_body(text, body_start, s, page, meta)
                body_start = None
            if h is not None:
                self._open(h, page, meta)
                if h.body_at:
                    body_start = s + h.body_at
                i += 1
                continue
            # A Markdown table: header line, rule line, then every following "| ... |" line.
            j = i + 2
            while j < len(lines) and _TABLE_ROW.match(text[lines[j][0]:lines[j][1]]):
                j += 1
            header = text[lines[i][0]:lines[i + 1][1]]
            rows = [text[a:b].strip() for a, b in lines[i + 2:j]]
            self.add_table(header, rows, page, {**meta, "kind": "table"})
            i = j
        if body_start is not None:
            self._add_body(text, body_start, len(text), page, meta)

    def _add_body(self, text: str, s: int, e: int, page: int | None, meta: dict[str, Any]) -> None:
        path = self._token_safe_path()
        units: list[Span] = []
        for a, b in _spans(text, s, e, SENTENCE_END):
            units.extend(self._cut_to_size(text, a, b))
        for a, b in self._pack(text, units, path, overlap=self.chunk_overlap):
            self._emit(text[a:b], path, page, meta)

    def _cut_to_size(self, text: str, a: int, b: int) -> list[Span]:
        """A sentence as itself if it fits chunk_size, else its clauses, hard-cut where a clause is still too long."""
        if b - a <= self.chunk_size:
            return [(a, b)]
        out: list[Span] = []
        for ca, cb in _spans(text, a, b, _CLAUSE_END):
            out.extend(_hard_cut(text, ca, cb, lambda x, y: y - x <= self.chunk_size))
        return out

    def _pack(self, text: str, units: list[Span], path: tuple[str, ...], overlap: int) -> list[Span]:
        """Greedy packing of whole units into chunk spans, with trailing whole units of the previous chunk as overlap.

        Units are cut smaller on the fly when one alone breaks the token limit (lazily, so that count_tokens runs
        about once per chunk, not once per sentence).
        """
        size = self.chunk_size
        out: list[Span] = []
        prev_a = -1  # first unit of the previous chunk: the overlap never repeats a whole chunk
        i = 0
        while i < len(units):
            a = i
            while a - 1 > prev_a and units[i - 1][1] - units[a - 1][0] <= overlap:
                a -= 1
            while a < i and units[i][1] - units[a][0] > size:
                a += 1
            b = i + 1
            while b < len(units) and units[b][1] - units[a][0] <= size:
                b += 1
            # Over the token limit: first give new units back to the next chunk, then drop overlap.
            while (b - 1 > i or a < i) and not self._fits_tokens(path, text[units[a][0]:units[b - 1][1]]):
                if b - 1 > i:
                    b -= 1
                else:
                    a += 1
            if a == i and b == i + 1 and not self._fits_tokens(path, text[units[i][0]:units[i][1]]):
                # One unit alone breaks the token limit: replace it by pieces that fit, and pack again from here.
                pieces = _hard_cut(text, *units[i], lambda x, y: self._fits_tokens(path, text[x:y]))
                if len(pieces) > 1:
                    units[i:i + 1] = pieces
                    continue
            out.append((units[a][0], units[b - 1][1]))
            prev_a, i = a, b
        return out

    # -- tables ------------------------------------------------------------------------------------------------
    def add_table(self, header: str, rows: list[str], page: int | None, meta: dict[str, Any]) -> None:
        """Rows packed whole under a repeated header; a row that cannot fit alone is cut (each piece keeps it)."""
        path = self._token_safe_path()
        header = header.strip()
        if header and (2 * len(header) > self.chunk_size or not self._fits_tokens(path, header * 2)):
            # A header that would take half of every chunk is not repeated: it becomes text of its own.
            self._add_body(header, 0, len(header), page, meta)
            header = ""

        def fits(body: str) -> bool:
            t = f"{header}\n{body}" if header else body
            return len(t) <= self.chunk_size and self._fits_tokens(path, t)

        rows = [r for r in rows if r.strip()]
        pieces: list[str] = []
        for row in rows:
            if fits(row):
                pieces.append(row)
            else:
                pieces.extend(row[a:b] for a, b in _hard_cut(row, 0, len(row), lambda x, y, row=row: fits(row[x:y])))
        if not pieces:  # a header with no rows is still text of the file
            if header:
                self._emit(header, path, page, meta)
            return
        current: list[str] = []
        for piece in pieces:
            if current and not fits("\n".join(current + [piece])):
                self._emit("\n".join([header, *current] if header else current), path, page, meta)
                current = []
            current.append(piece)
        self._emit("\n".join([header, *current] if header else current), path, page, meta)

    def finish(self, page: int | None, meta: dict[str, Any]) -> list[Chunk]:
        self._close_until(None, page, meta)
        return self.chunks


def _line_spans(text: str) -> list[Span]:
    """Stripped, non-empty lines of `text` as spans."""
    out: list[Span] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        a, b = _strip_span(text, pos, pos + len(line))
        if a < b:
            out.append((a, b))
        pos += len(line)
    return out


def _detect_headings(text: str, lines: list[Span]) -> list[_Heading | None]:
    """Heading (or None) for each line, with the context rules a single line cannot see:
    nothing inside a ``` code fence is a heading, and a run of consecutive numbered lines of the same rank with
    nothing between them (1. 苹果 / 2. 香蕉) is a list, not headings."""
    out: list[_Heading | None] = []
    in_fence = False
    for a, b in lines:
        line = text[a:b]
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append(None)
            continue
        out.append(None if in_fence else _match_heading(line))
    ranks = [h.rank if h is not None and h.listy else None for h in out]
    for i, r in enumerate(ranks):
        if r is not None and ((i > 0 and ranks[i - 1] == r) or (i + 1 < len(ranks) and ranks[i + 1] == r)):
            out[i] = None
    return out


def _hard_cut(text: str, a: int, b: int, fits: Callable[[int, int], bool]) -> list[Span]:
    """Cut text[a:b] into the fewest stripped pieces that satisfy `fits`, each as long as possible; prefer to cut
    after whitespace (English words) when that keeps at least half of the piece."""
    out: list[Span] = []
    while a < b:
        if fits(a, b):
            out.append((a, b))
            break
        lo, hi = 1, b - a  # largest n with fits(a, a + n); fits is monotone in the length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(a, a + mid):
                lo = mid
            else:
                hi = mid - 1
        cut = a + lo
        ws = max(text.rfind(" ", a + lo // 2, cut), text.rfind("\n", a + lo // 2, cut))
        if ws > a:
            cut = ws
        piece = _strip_span(text, a, cut)
        if piece[0] < piece[1]:
            out.append(piece)
        a = _strip_span(text, cut, b)[0]
    return out


# ---------------------------------------------------------------------------------------------- public API --------
def _page_of(meta: dict[str, Any]) -> int | None:
    page = meta.get("page")
    return int(page) if isinstance(page, (int, str)) and str(page).isdigit() else None


def _streams(docs: Iterable[Document]) -> list[tuple[str, dict[str, Any]]]:
    """Consecutive non-table Documents with equal metadata (one page, one kind) joined into one text stream."""
    out: list[tuple[str, dict[str, Any]]] = []
    for d in docs:
        meta = dict(d.metadata or {})
        if out and meta.get("kind") != "table" and out[-1][1] == meta:
            out[-1] = (out[-1][0] + "\n\n" + d.page_content, meta)
        else:
            out.append((d.page_content, meta))
    return out


def split_documents(
    docs: list[Document],
    *,
    source: str,
    sha256: str,
    chunk_size: int,
    chunk_overlap: int,
    count_tokens: TokenCounter | None = None,
    max_tokens: int | None = None,
) -> list[Chunk]:
    """Chunks of one file's Documents (in file order), following the rules in this module's docstring.

    `count_tokens` should count what the embedder will see (its passage prefix included); with `max_tokens` it
    bounds every chunk's `embedding_text()`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be >= 0 and smaller than chunk_size, got {chunk_overlap} >= {chunk_size}")
    if (count_tokens is None) != (max_tokens is None):
        raise ValueError("count_tokens and max_tokens go together: pass both (from the Embedder) or neither")
    fs = _FileSplitter(source, sha256, chunk_size, chunk_overlap, count_tokens, max_tokens)
    page, meta = None, {}
    for text, full_meta in _streams(docs):
        page = _page_of(full_meta)
        # page has its own field; so has source, and a loader's copy of it would go stale when the file is renamed.
        meta = {k: v for k, v in full_meta.items() if k not in ("page", "source")}
        if meta.get("kind") == "table":
            lines = [ln for ln in text.splitlines() if ln.strip()]
            header = str(meta.get("table_header") or (lines[0] if lines else ""))
            if lines and lines[0].strip() == header.strip():
                lines = lines[1:]  # the loader may or may not repeat the header as the first line
            fs.add_table(header, lines, page, meta)
        else:
            fs.add_text(text, page, meta)
    return fs.finish(page, meta)


class ChineseTextSplitter(TextSplitter):
    """The same rules for LangChain users: `split_text` returns chunk texts; `split_documents` keeps each
    Document's metadata and adds `heading_path` (list of headings, outermost first) and `position`.

    Heading lines go into `heading_path`, not into the text, except a heading with no body of its own, which is
    a chunk by itself. `chunk_size` / `chunk_overlap` left out are the product's settings (ingest.chunk_size /
    chunk_overlap: configs/default.yaml, profile, ZHIWEN_CONFIG, ZHIWEN_INGEST__*).
    """

    def __init__(
        self,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
        *,
        count_tokens: TokenCounter | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if chunk_size is None or chunk_overlap is None:  # the product's ingest.chunk_size / chunk_overlap
            ingest = load_settings().ingest
            chunk_size = ingest.chunk_size if chunk_size is None else chunk_size
            chunk_overlap = ingest.chunk_overlap if chunk_overlap is None else chunk_overlap
        super().__init__(chunk_size=chunk_size, chunk_overlap=chunk_overlap, **kwargs)
        self._count_tokens = count_tokens
        self._max_tokens = max_tokens

    def _chunks(self, docs: list[Document]) -> list[Chunk]:
        source = str(docs[0].metadata.get("source", "")) if docs else ""
        return split_documents(
            docs, source=source, sha256="", chunk_size=self._chunk_size, chunk_overlap=self._chunk_overlap,
            count_tokens=self._count_tokens, max_tokens=self._max_tokens,
        )

    def split_text(self, text: str) -> list[str]:
        return [c.text for c in self._chunks([Document(page_content=text, metadata={"kind": "text"})])]

    def split_documents(self, documents: Iterable[Document]) -> list[Document]:
        """All `documents` are taken as one file (pages in order, so headings carry across pages)."""
        return [
            Document(
                page_content=c.text,
                metadata={**c.metadata, **({"source": c.source} if c.source else {}),
                          **({"page": c.page} if c.page is not None else {}),
                          "heading_path": list(c.heading_path), "position": c.position},
            )
            for c in self._chunks(list(documents))
        ]

    def create_documents(self, texts: list[str], metadatas: list[dict[Any, Any]] | None = None) -> list[Document]:
        """Each text is split on its own (one text = one file)."""
        metadatas = metadatas or [{}] * len(texts)
        return [d for t, m in zip(texts, metadatas, strict=False)
                for d in self.split_documents([Document(t, metadata=dict(m))])]
