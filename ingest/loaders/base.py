"""What every loader shares: the error type, the Document builders and the table-row format.

Table rows are written as `列名: 值 | 列名: 值`, one row per line, and the header line goes to
metadata["table_header"]. Why not a markdown row (`| 值 | 值 |`)? The splitter cuts long tables between rows;
a chunk of rows 40-45 must still say what each value means, both to the embedding model and to the LLM
reading the 「已知信息」. "name: value" pairs do that on every line; bare markdown cells do not. Empty cells are
left out so that sparse rows stay short.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from PIL import Image

from configs.settings import IngestSettings

log = logging.getLogger(__name__)


class LoadError(Exception):
    """A file that gives no Documents, with a kind for programs and a Chinese reason for people.

    kind: "encrypted" | "empty" | "unsupported" | "corrupt" | "too_large" | "no_text"
    """

    KINDS = frozenset({"encrypted", "empty", "unsupported", "corrupt", "too_large", "no_text"})

    def __init__(self, kind: str, reason: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"LoadError kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        # Both go to Exception.args so that the error pickles across ProcessPoolExecutor workers.
        super().__init__(kind, reason)
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass
class Ctx:
    """One load_file call: the file, the settings and the per-file OCR allowance (settings.ocr_max_pages)."""

    path: Path
    settings: IngestSettings
    ocr_left: int = 0
    ocr_skipped: int = 0
    docs: list[Document] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def base_meta(self) -> dict[str, Any]:
        return {"source": str(self.path)}

    def add_text(self, text: str, **meta: Any) -> None:
        """Append a kind="text" Document unless `text` is blank."""
        text = tidy(text)
        if text:
            self.docs.append(Document(page_content=text, metadata={**self.base_meta(), "kind": "text", **meta}))

    def add_ocr(self, text: str, **meta: Any) -> None:
        text = tidy(text)
        if text:
            self.docs.append(Document(page_content=text, metadata={**self.base_meta(), "kind": "ocr", **meta}))

    def add_table(self, rows: Sequence[Sequence[Any]], *, title_as_heading: bool = False, **meta: Any) -> None:
        """Append a kind="table" Document from rows of cells; the first non-empty row is the header.

        A title row found above the table (see table_document) is also put just before it as a kind="text"
        Document: as a '#' heading when the table is the whole file or sheet (title_as_heading, CSV and
        spreadsheets), so that the splitter puts it in the heading path of every chunk of rows; as a plain line
        inside documents, where a heading would also claim the text after the table.
        """
        doc = table_document(rows, {**self.base_meta(), **meta})
        if doc is None:
            return
        title = doc.metadata.get("table_title")
        if title:
            self.add_text(heading(1, title) if title_as_heading else title, **meta)
        self.docs.append(doc)

    def ocr_images(self, blobs: Iterable[bytes], **meta: Any) -> None:
        """OCR pictures embedded in a document (within the OCR allowance) into kind="ocr" Documents.

        Formats PIL cannot decode (EMF/WMF drawings), icons under 32 px and blank images are skipped.
        """
        from ingest import ocr

        for blob in blobs:
            if not self.settings.ocr:
                return
            try:
                image = ocr.open_image(blob)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                # Not a raster image PIL knows (EMF/WMF), or a broken one: nothing to read in it.
                log.debug("%s: embedded picture skipped (%s)", self.path, e)
                continue
            if min(image.size) < 32 or ocr.is_blank(image):
                continue
            if self.take_ocr_slot():
                self.add_ocr(ocr.ocr_image(image), **meta)

    def take_ocr_slot(self) -> bool:
        """True while this file may OCR one more page/image; counts what had to be skipped."""
        if not self.settings.ocr:
            return False
        if self.ocr_left <= 0:
            self.ocr_skipped += 1
            return False
        self.ocr_left -= 1
        return True


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def tidy(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, collapse blank lines; keep indentation."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u000c", "\n").replace("\u000b", "\n")
    # Other control characters (PDFium's \x02 for a hyphen at a line end, NULs, BELs) are never content.
    text = _CONTROL.sub("", text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    out: list[str] = []
    for ln in lines:
        if not ln and (not out or not out[-1]):
            continue
        out.append(ln)
    return "\n".join(out).strip("\n")


def cell_text(value: Any) -> str:
    """A cell as one line: floats that are whole numbers lose '.0', newlines become spaces."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if hasattr(value, "isoformat") and not isinstance(value, str):
        s = value.isoformat(sep=" ") if hasattr(value, "hour") else value.isoformat()
        return s.removesuffix(" 00:00:00")
    return " ".join(str(value).split())


def table_document(rows: Iterable[Sequence[Any]], meta: dict[str, Any]) -> Document | None:
    """rows -> Document(kind="table") in the `列名: 值 | 列名: 值` format, or None when no row has a value.

    Leading rows with a single filled cell above a wider table are its title (「2023 年销售表」): they go to
    metadata["table_title"], not into page_content (one row per line). A first row with a number in it is data,
    not a header: columns are then named 列1, 列2, ...
    """
    cleaned = [r for row in rows if (r := _rstrip_cells([cell_text(c) for c in row]))]
    if not cleaned:
        return None
    titles, cleaned = _split_titles(cleaned)
    header, data = _header_and_data(cleaned)
    # A lone header row (a one-line table) is still content: keep it as the only line.
    lines = _pair_lines(header, data) or [" | ".join(h for h in cleaned[0] if h)]
    extra: dict[str, Any] = {"table_title": " ".join(titles)} if titles else {}
    return Document(
        page_content="\n".join(lines),
        metadata={**meta, "kind": "table", "table_header": " | ".join(header), **extra},
    )


def _filled(row: list[str]) -> int:
    return sum(1 for c in row if c)


def _split_titles(rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Leading one-cell rows above a wider table -> (titles, the rest). A title needs a header and at least one
    data row below it; otherwise it is a short (incomplete) row."""
    width = max(_filled(r) for r in rows)
    titles: list[str] = []
    while len(rows) > 2 and width > 1 and _filled(rows[0]) == 1:
        titles.append(next(c for c in rows[0] if c))
        rows = rows[1:]
    return titles, rows


def _header_and_data(rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The column names and the data rows. Unnamed columns get a position name so that "列3: 值" still tells the
    reader which column it was; a first row with a number in it is data, and every column is named by position."""
    ncols = max(len(r) for r in rows)
    if len(rows) > 1 and any(_is_number(c) for c in rows[0]):
        return [f"列{i + 1}" for i in range(ncols)], rows
    first = rows[0] + [""] * (ncols - len(rows[0]))
    return [h or f"列{i + 1}" for i, h in enumerate(first)], rows[1:]


def _pair_lines(header: list[str], data: list[list[str]]) -> list[str]:
    """One `列名: 值 | 列名: 值` line per data row; empty cells are left out, empty rows dropped."""
    lines = []
    for r in data:
        pairs = [f"{header[i]}: {v}" for i, v in enumerate(r) if v]
        if pairs:
            lines.append(" | ".join(pairs))
    return lines


def _rstrip_cells(row: list[str]) -> list[str]:
    """Drop empty cells at the end of a row: formatted-but-empty spreadsheet columns would widen every header."""
    end = len(row)
    while end and not row[end - 1]:
        end -= 1
    return row[:end]


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
    except ValueError:
        return False
    return True


def heading(level: int, text: str) -> str:
    """A markdown heading line ('## 标题'), the form the splitter tracks heading paths by."""
    text = " ".join(text.split())
    return f"{'#' * max(1, min(level, 6))} {text}" if text else ""
