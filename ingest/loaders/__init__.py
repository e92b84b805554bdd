"""File -> list[langchain Document], or LoadError(kind, reason). Contract: docs/ARCHITECTURE.md "ingest/loaders.py".

    from ingest.loaders import load_file, LoadError, SUPPORTED_EXTENSIONS
    docs = load_file(Path("制度/员工手册.pdf"), settings.ingest)

One module per family of formats; this file only checks size, picks the loader by extension and turns any
unexpected library exception into LoadError("corrupt") with the library's message summarised, so a caller
never sees a bare traceback. load_file is a top-level function holding no state: it pickles for
ProcessPoolExecutor, and the heavy OCR engine is created lazily inside the worker that first needs it.

Why not `unstructured`'s partitioners? Measured offline (bench/unstructured_eval.py, docs/models.md "Parsers"):
unstructured 0.27 read 7 of the 81 messy_docs files (tables only) and none of 240 CMRC passage files; its text,
HTML, DOCX, PPTX and e-mail partitioners download spaCy's en_core_web_sm from GitHub at run time (no pinned
PyPI package of it exists), and md, PDF, images, ODT and RTF need extras. It is not a dependency; the
libraries below are what those partitioners wrap.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

from langchain_core.documents import Document

from configs.settings import IngestSettings
from ingest.encoding import EncodingError
from ingest.loaders.base import Ctx, LoadError

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_EXTENSIONS", "LoadError", "load_file"]


def _loader(module: str, func: str) -> Callable[[Ctx], None]:
    """Import a format's module only when a file of that format arrives (keeps `import ingest.loaders` light)."""

    def run(ctx: Ctx) -> None:
        import importlib

        getattr(importlib.import_module(f"ingest.loaders.{module}"), func)(ctx)

    return run


_LOADERS: dict[str, Callable[[Ctx], None]] = {
    ".txt": _loader("text", "load_txt"),
    ".text": _loader("text", "load_txt"),
    ".md": _loader("text", "load_md"),
    ".markdown": _loader("text", "load_md"),
    ".csv": _loader("text", "load_csv"),
    ".tsv": _loader("text", "load_csv"),
    ".json": _loader("text", "load_json"),
    ".jsonl": _loader("text", "load_json"),
    ".html": _loader("markup", "load_html"),
    ".htm": _loader("markup", "load_html"),
    ".xhtml": _loader("markup", "load_html"),
    ".xml": _loader("markup", "load_xml"),
    ".pdf": _loader("pdf", "load_pdf"),
    ".docx": _loader("office", "load_docx"),
    ".doc": _loader("office", "load_doc"),
    ".pptx": _loader("slides", "load_pptx"),
    ".xlsx": _loader("sheets", "load_xlsx"),
    ".xlsm": _loader("sheets", "load_xlsx"),
    ".xls": _loader("sheets", "load_xls"),
    ".epub": _loader("books_mail", "load_epub"),
    ".eml": _loader("books_mail", "load_eml"),
    ".odt": _loader("richtext", "load_odt"),
    ".rtf": _loader("richtext", "load_rtf"),
    ".png": _loader("images", "load_image"),
    ".jpg": _loader("images", "load_image"),
    ".jpeg": _loader("images", "load_image"),
    ".bmp": _loader("images", "load_image"),
    ".tif": _loader("images", "load_image"),
    ".tiff": _loader("images", "load_image"),
    ".webp": _loader("images", "load_image"),
}

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_LOADERS)

# Formats that are zip archives of XML. Their parsers inflate whole parts in memory, so a "zip bomb" (a few MB
# that unpack to many GB) is refused by its declared unpacked size before any parser sees it.
_ZIP_FORMATS = frozenset({".docx", ".pptx", ".xlsx", ".xlsm", ".odt", ".epub"})
UNPACKED_SIZE_FACTOR = 5  # unpacked size allowed: this many times ingest.max_file_mb


def _check_unpacked_size(path: Path, settings: IngestSettings) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (e.g. an encrypted Office file): the format's loader gives the specific error
    limit = settings.max_file_mb * UNPACKED_SIZE_FACTOR * 1024 * 1024
    if unpacked > limit:
        raise LoadError(
            "too_large",
            f"文件「{path.name}」解压后有 {unpacked / 1048576:.0f} MB，超过上限 {limit / 1048576:.0f} MB"
            f"（ingest.max_file_mb 的 {UNPACKED_SIZE_FACTOR} 倍）：请拆分文件，或调大设置 ingest.max_file_mb",
        )


def load_file(path: Path, settings: IngestSettings) -> list[Document]:
    """Read one file into Documents (metadata: kind, source, and page/encoding/sheet/table_header where known).

    Raises LoadError with kind "unsupported", "too_large", "empty", "encrypted", "corrupt" or "no_text".
    """
    path = Path(path)
    ext = path.suffix.lower()
    loader = _LOADERS.get(ext)
    if loader is None:
        raise LoadError(
            "unsupported",
            f"不支持的文件类型「{ext or '无扩展名'}」（{path.name}）："
            f"支持的类型有 {' '.join(sorted(SUPPORTED_EXTENSIONS))}",
        )
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LoadError("corrupt",
                        f"无法读取文件「{path.name}」（{e.strerror or e}）：请检查文件是否存在、是否有读取权限") from e
    if size > settings.max_file_mb * 1024 * 1024:
        raise LoadError(
            "too_large",
            f"文件「{path.name}」有 {size / 1048576:.1f} MB，超过上限 {settings.max_file_mb:g} MB："
            "请拆分文件，或调大设置 ingest.max_file_mb",
        )
    if size == 0:
        raise LoadError("empty", f"文件「{path.name}」是空文件（0 字节）：请确认文件内容后重新导入")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise LoadError("corrupt", f"无法读取文件「{path.name}」（{e.strerror or e}）：请检查文件权限后重新导入") from e
    if ext in _ZIP_FORMATS:
        _check_unpacked_size(path, settings)
    ctx = Ctx(path=path, settings=settings, ocr_left=settings.ocr_max_pages)
    try:
        loader(ctx)
    except LoadError:
        raise
    except EncodingError as e:  # legacy-encoded text that no codec reads as plausible text: never store mojibake
        raise LoadError("corrupt", f"文件「{path.name}」{e.reason}") from e
    except MemoryError as e:
        raise LoadError("too_large", f"文件「{path.name}」解析时内存不足：请拆分文件后重新导入") from e
    except Exception as e:  # any library's failure on a malformed file
        log.debug("loader failed on %s", path, exc_info=True)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LoadError(
            "corrupt",
            f"文件「{path.name}」解析失败（{type(e).__name__}: {detail}）："
            "文件可能已损坏，请用原程序打开并另存后重新导入",
        ) from e
    if not any(d.page_content.strip() for d in ctx.docs):
        raise LoadError("empty", f"文件「{path.name}」没有可读取的文字内容（只有空白）：请确认文件内容后重新导入")
    return ctx.docs
