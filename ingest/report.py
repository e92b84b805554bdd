"""What an ingest run tells its caller: per-file results, totals, time per phase, an exit code, a text table.

Plain data (dataclasses) so the CLI prints it, the web page renders it and tests assert on it.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# What a run did to a file. ok: parsed and embedded now; unchanged: already in the KB (same content);
# renamed: same content as a path that is gone, moved over without re-embedding; duplicate: same content as
# another live path, shares its chunks; empty: readable but no text; failed: see reason; removed: dropped from
# the KB (--prune, or remove_files).
STATUSES = ("ok", "unchanged", "renamed", "duplicate", "empty", "failed", "removed")
# The one Chinese word for each status, in the CLI's table and on the page alike.
STATUS_NAMES = {"ok": "已导入", "unchanged": "未变", "renamed": "改名", "duplicate": "重复", "empty": "无文本",
                "failed": "失败", "removed": "已移除"}
PHASES = ("scan", "parse", "split", "embed", "write")


@dataclass(frozen=True)
class FileResult:
    path: str                     # the manifest key (`<folder name>/<path inside it>`)
    status: str                   # one of STATUSES
    chunks: int = 0               # chunks this path has in the KB after the run
    reason: str = ""              # for empty / failed (and a note for renamed: the old path)
    duplicate_of: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """Sent to `on_progress` as the run advances (the web app shows it; the CLI uses tqdm)."""

    phase: str                    # scan | parse | embed | write | done
    files_done: int
    files_total: int
    current: str | None = None    # the file just finished (or being scanned)
    chunks_done: int = 0
    message: str = ""


@dataclass
class IngestReport:
    kb_name: str
    files: list[FileResult] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    ignored: list[str] = field(default_factory=list)   # files skipped on purpose (binary, unknown type, junk)
    generation: str | None = None                      # the KB generation live after the run
    chunks_embedded: int = 0                           # vectors computed by this run (0 on an unchanged rerun)
    bytes_parsed: int = 0                              # size of the files parsed by this run

    @property
    def totals(self) -> dict[str, int]:
        c = Counter(f.status for f in self.files)
        out = {s: c.get(s, 0) for s in STATUSES}
        out["files"] = len(self.files)
        out["chunks"] = sum(f.chunks for f in self.files if f.status != "removed")
        out["ignored"] = len(self.ignored)
        return out

    @property
    def exit_code(self) -> int:
        """0 when every file is in the KB (or deliberately empty), 1 when some failed (the rest is committed)."""
        return 1 if any(f.status == "failed" for f in self.files) else 0

    def by_path(self) -> dict[str, FileResult]:
        return {f.path: f for f in self.files}

    def to_table(self, *, only_problems: bool = False) -> str:
        """A fixed-width table (CJK-aware column widths) followed by totals and the time per phase."""
        rows = [f for f in self.files if not only_problems or f.status in ("failed", "empty")]
        status_zh = STATUS_NAMES
        lines = []
        if rows:
            w = min(60, max(_width(f.path) for f in rows))
            lines.append(f"{_pad('文件', w)}  {'状态':<6}  {'块数':>5}  说明")
            for f in rows:
                note = f.reason or (f"与 {f.duplicate_of} 内容相同" if f.duplicate_of else "")
                lines.append(f"{_pad(_clip(f.path, w), w)}  {_pad(status_zh.get(f.status, f.status), 6)}  "
                             f"{f.chunks:>5}  {note}")
        t = self.totals
        lines.append(
            f"知识库「{self.kb_name}」{self.generation or ''}：{t['files']} 个文件，{t['chunks']} 个文本块；"
            + "，".join(f"{status_zh[s]} {t[s]}" for s in STATUSES if t[s])
            + (f"；忽略 {t['ignored']} 个非文档文件" if t["ignored"] else "")
        )
        lines.append("用时：" + "，".join(f"{p} {self.phase_seconds.get(p, 0.0):.2f}s" for p in PHASES)
                     + f"（本次计算向量 {self.chunks_embedded} 个）")
        return "\n".join(lines)


def _width(s: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def _pad(s: str, w: int) -> str:
    return s + " " * max(0, w - _width(s))


def _clip(s: str, w: int) -> str:
    if _width(s) <= w:
        return s
    out, used = "", 1
    for ch in reversed(s):  # keep the end of the path: the file name says more than the folder
        cw = _width(ch)
        if used + cw > w:
            break
        out, used = ch + out, used + cw
    return "…" + out
