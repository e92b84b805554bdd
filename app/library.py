"""Knowledge-base administration shared by the page and the API: list with sizes, create, delete, file table.

Thin wrappers over retrieval.store (the store owns the folder layout); this module only shapes the answers the
two faces show. Everything here reads the manifest only (retrieval.store.read_manifest), never the index or the
chunks: the KB list and the status line stay instant at a million chunks. A damaged knowledge base is listed with
its reason (KBSize.error) instead of breaking the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from configs import Settings
from retrieval.store import (
    LIVE_STATUSES,
    KBError,
    KBNotFoundError,
    KnowledgeBase,
    Manifest,
    delete_knowledge_base,
    list_knowledge_bases,
    read_manifest,
)

FILE_TABLE_HEADERS = ["文件名", "大小", "段落数", "状态", "原因", "导入时间"]


@dataclass(frozen=True)
class KBSize:
    name: str
    files: int     # live files (ok or duplicate)
    chunks: int
    failed: int    # files kept in the manifest with status failed/empty
    error: str = ""  # set when the knowledge base is damaged: the reason and the repair command


def names(settings: Settings) -> list[str]:
    return list_knowledge_bases(settings)


def _manifest(name: str, settings: Settings) -> Manifest:
    return read_manifest(name, settings)[1]


def size(name: str, settings: Settings) -> KBSize:
    """File and chunk counts from the manifest (an "ok" entry owns its chunks; duplicates share them)."""
    entries = _manifest(name, settings).files.values()
    live = sum(e.status in LIVE_STATUSES for e in entries)
    chunks = sum(len(e.chunk_ids) for e in entries if e.status == "ok")
    return KBSize(name, live, chunks, len(entries) - live)


def sizes(settings: Settings) -> list[KBSize]:
    """Every knowledge base; a damaged one is listed with `error` set instead of failing the whole list."""
    out = []
    for n in list_knowledge_bases(settings):
        try:
            out.append(size(n, settings))
        except KBNotFoundError:  # deleted between listing and opening
            continue
        except KBError as e:
            out.append(KBSize(n, 0, 0, 0, error=str(e)))
    return out


def choices(settings: Settings) -> list[tuple[str, str]]:
    """(label, name) pairs for the page's KB selector: a damaged knowledge base is marked 已损坏 (the status line
    under it gives the reason and the repair command when it is selected)."""
    return [(k.name if not k.error else f"{k.name}（已损坏）", k.name) for k in sizes(settings)]


def create(name: str, settings: Settings) -> str:
    """Create an empty knowledge base; the name is checked by the store (KBNameError says what is allowed)."""
    name = name.strip()
    if name in list_knowledge_bases(settings):
        raise ValueError(f"知识库「{name}」已存在，请换一个名称，或直接在上方选择它。")
    KnowledgeBase.create(name, settings, exist_ok=False)
    return name


def delete(name: str, settings: Settings) -> None:
    delete_knowledge_base(name, settings, timeout=5)


def _when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def file_table(name: str, settings: Settings) -> list[list]:
    """Rows for the page's file table (FILE_TABLE_HEADERS), sorted by path."""
    from .render import STATUS_NAMES, human_size

    rows = []
    for e in sorted(_manifest(name, settings).files.values(), key=lambda e: e.path):
        reason = e.reason or (f"与「{e.duplicate_of}」内容相同" if e.duplicate_of else "")
        rows.append([e.path, human_size(e.size), len(e.chunk_ids), STATUS_NAMES.get(e.status, e.status), reason,
                     _when(e.ingested_at) if e.ingested_at else ""])
    return rows


def file_paths(name: str, settings: Settings) -> list[str]:
    return sorted(_manifest(name, settings).files)
