"""Plain-text formats: .txt, .md, .csv/.tsv, .json/.jsonl. All go through ingest.encoding."""
from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from ingest.encoding import decode_bytes
from ingest.loaders.base import Ctx, LoadError, heading

# A markdown pipe table: a row with pipes followed by a |---|:---:| separator line.
_MD_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
# An HTML line break written into markdown (<br>, <br/>, <BR />): a line break in text, a space inside a table cell.
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def load_txt(ctx: Ctx) -> None:
    decoded = decode_bytes(ctx.path.read_bytes())
    ctx.add_text(decoded.text, encoding=decoded.encoding)


def load_md(ctx: Ctx) -> None:
    """Markdown stays markdown (its '#' headings are what the splitter wants); pipe tables become table Documents."""
    decoded = decode_bytes(ctx.path.read_bytes())
    lines = decoded.text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    buf: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        if (
            not in_fence
            and "|" in line
            and i + 1 < len(lines)
            and _MD_SEPARATOR.match(lines[i + 1])
            and "|" in lines[i + 1]
        ):
            rows = [_md_cells(line)]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.append(_md_cells(lines[i]))
                i += 1
            ctx.add_text("\n".join(buf), encoding=decoded.encoding)
            buf = []
            ctx.add_table(rows, encoding=decoded.encoding)
            continue
        prev = buf[-1].strip() if buf else ""
        if not in_fence and prev and _SETEXT.match(line) and not prev.startswith(("#", "-", "*", "|", ">")):
            # "Title\n=====" is a level-1 heading, "Title\n-----" level 2: rewrite as '#' lines for the splitter.
            buf[-1] = heading(1 if line.strip().startswith("=") else 2, buf[-1])
            i += 1
            continue
        buf.append(line if in_fence else _BR.sub("\n", line))
        i += 1
    ctx.add_text("\n".join(buf), encoding=decoded.encoding)


def _md_cells(line: str) -> list[str]:
    line = line.strip()
    line = line.removeprefix("|")
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [_BR.sub(" ", c).strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def load_csv(ctx: Ctx) -> None:
    decoded = decode_bytes(ctx.path.read_bytes())
    text = decoded.text
    if ctx.path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        try:
            # Sniff among the delimiters people actually use; Excel in many European locales writes ';'.
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    try:
        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error as e:
        raise LoadError("corrupt",
                        f"表格文件「{ctx.name}」格式有误（{e}）：请用 Excel 打开另存为 CSV 后重新导入") from e
    ctx.add_table(rows, title_as_heading=True, encoding=decoded.encoding)


def load_json(ctx: Ctx) -> None:
    """JSON arrays of objects become a table; anything else becomes `a.b.c: 值` lines (one per leaf)."""
    decoded = decode_bytes(ctx.path.read_bytes())
    text = decoded.text.strip()
    if not text:
        return
    if ctx.path.suffix.lower() == ".jsonl":
        values, bad = [], 0
        for line in text.splitlines():
            if line.strip():
                try:
                    values.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
        if bad and not values:
            raise LoadError("corrupt",
                            f"文件「{ctx.name}」不是有效的 JSON Lines（每行一个 JSON）：请检查文件内容后重新导入")
        data: Any = values
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoadError(
                "corrupt",
                f"文件「{ctx.name}」不是有效的 JSON（第 {e.lineno} 行第 {e.colno} 列：{e.msg}）：请修正后重新导入",
            ) from e
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        keys: list[str] = []
        for rec in data:
            keys.extend(k for k in rec if k not in keys)
        rows = [keys] + [[_scalar(rec.get(k)) for k in keys] for rec in data]
        ctx.add_table(rows, encoding=decoded.encoding)
        return
    ctx.add_text("\n".join(f"{k}: {v}" if k else v for k, v in _flatten(data, "")), encoding=decoded.encoding)


def _scalar(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else str(v)


def _flatten(value: Any, prefix: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            out.extend(_flatten(v, f"{prefix}[{i}]"))
        return out
    if value is None or value == "":
        return []
    return [(prefix, str(value))]
