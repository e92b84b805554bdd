"""Put uploaded files into a knowledge base's sources/ folder without ever writing outside it.

Rules (each rejection carries a Chinese sentence for the file table):
  - a name is reduced to its last path component, stripped of control and reserved characters and of invisible
    format characters (bidi overrides such as U+202E, which make "gpj.exe" look like "exe.jpg", zero widths);
  - a name that already exists with other content gets " (2)", " (3)", ... — nothing is overwritten;
    the same name with the same bytes is reused, so ingestion reports it as unchanged;
  - only extensions the loaders support; each file at most `max_file_bytes`;
  - a zip is opened, never trusted: entries with absolute paths, '..', drive letters or links are refused,
    the entry count, the total unpacked size and each entry's compression ratio are capped (zip bombs),
    and the unpacked byte count is enforced while copying (the header's sizes may lie).
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.files import sha256_file

_RESERVED = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f]')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_NAME_BYTES = 200  # below the usual 255-byte file-name limit, leaving room for " (n)"


@dataclass(frozen=True)
class Rejected:
    """A file or zip entry that was not stored; `reason` is shown to the person who uploaded it."""

    name: str
    reason: str


@dataclass(frozen=True)
class UploadLimits:
    allowed_extensions: frozenset[str]   # lower-case, with the dot: ".pdf"
    max_file_bytes: int                  # one uploaded file, or one unpacked zip entry
    max_unzipped_bytes: int              # all entries of one zip together
    max_zip_entries: int
    max_zip_ratio: float                 # unpacked / compressed size of one entry


@dataclass
class StoredUploads:
    saved: list[Path]
    rejected: list[Rejected]


def safe_filename(name: str) -> str:
    """A harmless single file name.

    safe_filename("../../etc/pass wd") -> "pass wd"; safe_filename("a\\b:c.txt") -> "b_c.txt"."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/")).split("/")[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) != "Cf")  # bidi overrides, zero widths
    # leading dots would hide the file; trailing ones vanish on Windows
    name = _RESERVED.sub("_", name).strip().strip(".")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.upper() in _WINDOWS_DEVICES:
        stem = "_" + stem
    ext = ("." + ext) if ext else ""
    while len((stem + ext).encode("utf-8")) > MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    return (stem + ext) or "file"


def too_big_reason(size: float, limit: int) -> str:
    """The sentence for a file over app.max_upload_mb (also used by the API while it streams an upload in)."""
    return f"文件大小 {size / 2**20:.1f} MB 超过上限 {limit / 2**20:.0f} MB（配置项 app.max_upload_mb）。"


def _unique_target(folder: Path, name: str, sha256: str) -> tuple[Path, bool]:
    """(path, already_there): the same name with the same content is reused, a different content gets a new name."""
    stem, ext = os.path.splitext(name)
    n = 1
    while True:
        candidate = folder / (name if n == 1 else f"{stem} ({n}){ext}")
        if not candidate.exists():
            return candidate, False
        if candidate.is_file() and not candidate.is_symlink() and sha256_file(candidate) == sha256:
            return candidate, True
        n += 1


def _inside(folder: Path, target: Path) -> bool:
    return target.resolve().is_relative_to(folder.resolve())


def _store_file(src: Path, display: str, dest: Path, limits: UploadLimits, out: StoredUploads) -> None:
    name = safe_filename(display)
    ext = os.path.splitext(name)[1].lower()
    if ext not in limits.allowed_extensions:
        allowed = ", ".join(sorted(limits.allowed_extensions))
        out.rejected.append(Rejected(display, f"不支持的文件类型「{ext or '无扩展名'}」，支持：{allowed}。"))
        return
    size = src.stat().st_size
    if size > limits.max_file_bytes:
        out.rejected.append(Rejected(display, too_big_reason(size, limits.max_file_bytes)))
        return
    target, existing = _unique_target(dest, name, sha256_file(src))
    if not _inside(dest, target):  # cannot happen after safe_filename; kept as the last line of defence
        out.rejected.append(Rejected(display, "文件名不安全，已拒绝。"))
        return
    if not existing:
        shutil.copyfile(src, target)
    out.saved.append(target)


def _entry_name(info: zipfile.ZipInfo) -> str:
    """Zip tools on Chinese Windows write GBK names without the UTF-8 flag; Python then shows them as cp437."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437", errors="replace")
    for enc in ("utf-8", "gb18030"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return info.filename


def _unsafe_entry_reason(name: str, info: zipfile.ZipInfo) -> str | None:
    p = name.replace("\\", "/")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p):
        return "压缩包内的绝对路径，已拒绝。"
    if ".." in PurePosixPath(p).parts:
        return "压缩包内的路径包含「..」（试图写到知识库目录之外），已拒绝。"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "压缩包内的符号链接，已拒绝。"
    return None


def _extract_zip(zip_path: Path, display: str, dest: Path, limits: UploadLimits, out: StoredUploads) -> None:
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        out.rejected.append(Rejected(display, "不是有效的 zip 压缩包（可能已损坏），请重新打包后上传。"))
        return
    with zf:
        entries = [i for i in zf.infolist() if not i.is_dir()]
        if len(entries) > limits.max_zip_entries:
            out.rejected.append(Rejected(display, f"压缩包内有 {len(entries)} 个文件，超过上限 {limits.max_zip_entries}"
                                                  "（配置项 app.max_zip_entries），请分批上传。"))
            return
        if sum(i.file_size for i in entries) > limits.max_unzipped_bytes:
            out.rejected.append(Rejected(display, f"压缩包解压后超过 {limits.max_unzipped_bytes / 2**20:.0f} MB"
                                                  "（配置项 app.max_unzipped_mb），请分批上传。"))
            return
        budget = limits.max_unzipped_bytes
        staging = dest / f".unzip-{os.getpid()}-{id(zf)}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            for info in entries:
                name = _entry_name(info)
                label = f"{display}/{name}"
                reason = _unsafe_entry_reason(name, info)
                if reason is None and info.flag_bits & 0x1:
                    reason = "压缩包内的文件已加密，请解密后再上传。"
                if reason is None and info.compress_size and info.file_size / info.compress_size > limits.max_zip_ratio:
                    reason = (f"压缩比异常（{info.file_size / info.compress_size:.0f} 倍，"
                              f"上限 {limits.max_zip_ratio:.0f}，疑似压缩炸弹），已拒绝。")
                if reason is None and os.path.splitext(name)[1].lower() not in limits.allowed_extensions:
                    reason = f"不支持的文件类型「{os.path.splitext(name)[1] or '无扩展名'}」，已跳过。"
                if reason:
                    out.rejected.append(Rejected(label, reason))
                    continue
                tmp = staging / "entry"
                limit = min(limits.max_file_bytes, budget)
                written = 0
                too_big = False
                try:
                    with zf.open(info) as src, tmp.open("wb") as dst:
                        while block := src.read(1 << 20):
                            written += len(block)
                            if written > limit:  # the header may lie about the size: count what really comes out
                                too_big = True
                                break
                            dst.write(block)
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                    out.rejected.append(Rejected(label, f"无法解压此文件（{type(e).__name__}），压缩包可能已损坏。"))
                    continue
                if too_big:
                    out.rejected.append(Rejected(label, f"解压后超过大小上限 {limit / 2**20:.0f} MB，已拒绝。"))
                    continue
                budget -= written
                _store_file(tmp, os.path.basename(name.replace("\\", "/")), dest, limits, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def store_uploads(files: Iterable[tuple[Path, str]], dest: Path, limits: UploadLimits) -> StoredUploads:
    """Copy (temp_path, original_name) pairs into `dest`, unpacking zips; returns what was saved and refused."""
    dest.mkdir(parents=True, exist_ok=True)
    out = StoredUploads(saved=[], rejected=[])
    for src, display in files:
        src = Path(src)
        if not src.is_file():
            out.rejected.append(Rejected(display, "上传的临时文件已不存在，请重新上传。"))
        elif display.lower().endswith(".zip") and ".zip" not in limits.allowed_extensions:
            _extract_zip(src, display, dest, limits, out)
        else:
            _store_file(src, display, dest, limits, out)
    # a zip may hold the same file twice: ingest each stored path once
    out.saved = list(dict.fromkeys(out.saved))
    return out
