"""Which files are looked at: walk a folder, stat each file and decide whether it is a candidate or ignored.

Hidden files and folders (name starts with ".") and the knowledge-base folder itself are skipped. A file whose
extension the loaders support is a candidate. Any other file is a candidate with a known problem ("unsupported")
when it looks like a document a person expects to be searchable — a known document extension we cannot read
(.ppt, .wps, .pages, ...) or text-like bytes (no NUL byte in the first 8 KB, e.g. README, LICENSE) — so nobody
wonders where it went; binary files of unknown kind (.exe, .zip, .mp4, ...), Office lock files (~$x.docx) and
Thumbs.db / desktop.ini are ignored (listed in `report.ignored` only).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs import Settings

# Extensions of documents we cannot read: reported as unsupported rather than silently ignored.
DOCUMENT_LIKE_EXTENSIONS = frozenset({
    ".doc", ".ppt", ".pps", ".xls", ".wps", ".et", ".dps", ".pages", ".numbers", ".key", ".chm", ".djvu", ".caj",
    ".kdh", ".nh", ".mobi", ".azw", ".azw3", ".xps", ".oxps", ".tex", ".ofd", ".hwp", ".one", ".msg", ".eml",
    ".vsd", ".vsdx", ".wpd", ".fb2", ".ps", ".tif", ".tiff", ".gif", ".webp", ".heic", ".svg",
})
JUNK_PREFIXES = ("~$", ".~lock.")                      # Office / LibreOffice lock files of open documents
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})    # Windows folder metadata


@dataclass
class SourceFile:
    """A file seen on disk: its manifest key, location and stat; sha256 once known."""

    key: str
    path: Path
    root: Path
    size: int
    mtime_ns: int
    sha256: str = ""
    hashed_at: float = 0.0
    problem: tuple[str, str] | None = None  # (status, reason) decided before parsing: unsupported / too large


@functools.cache
def _supported_extensions() -> frozenset[str]:
    from ingest.loaders import SUPPORTED_EXTENSIONS

    return frozenset(e.lower() for e in SUPPORTED_EXTENSIONS)


def manifest_key(root: Path, path: Path) -> str:
    """Manifest key: `<root folder name>/<path inside root>` with POSIX separators."""
    rel = path.relative_to(root).as_posix()
    return f"{root.name}/{rel}" if root.name else path.as_posix()


def scan_folder(root: Path, settings: Settings) -> tuple[list[SourceFile], list[str]]:
    """Walk `root` (not following directory symlinks); return candidate files and ignored keys, sorted."""
    kb_root = settings.kb_root.resolve()
    files: list[SourceFile] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != kb_root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = classify(here / name, root, settings)
            if f is None:
                ignored.append(manifest_key(root, here / name))
            else:
                files.append(f)
    return files, ignored


def classify(path: Path, root: Path, settings: Settings) -> SourceFile | None:
    """Stat a file and decide whether it is a candidate (maybe with a known problem) or ignored (None)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file() or path.name.startswith(JUNK_PREFIXES) or path.name.lower() in JUNK_NAMES:
        return None
    f = SourceFile(manifest_key(root, path), path, root, st.st_size, st.st_mtime_ns)
    ext = path.suffix.lower()
    if ext not in _supported_extensions():
        if ext not in DOCUMENT_LIKE_EXTENSIONS and not _looks_like_text(path):
            return None
        f.problem = ("failed", f"不支持的文件类型（{ext or '无扩展名'}），未导入；"
                               "如需检索，请另存为 PDF、Word、TXT 或 Markdown 后再导入。")
    elif st.st_size > settings.ingest.max_file_mb * 1024 * 1024:
        f.problem = ("failed", (f"文件大小 {st.st_size / 1048576:.0f} MB 超过上限 {settings.ingest.max_file_mb:g} MB"
                                f"（ingest.max_file_mb），未导入；可调大该设置后重新导入。"))
    return f


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        return False
    return b"\0" not in head

