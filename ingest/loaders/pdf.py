"""PDF: the text layer of every page (pypdfium2), OCR for pages that have (almost) none.

A page whose text layer has fewer than settings.ocr_min_chars non-space characters, or is garbled (fonts
without a Unicode map give private-use/replacement characters, see text_quality), is rendered (longer side
~1600 px) and OCRed as a whole: that covers scans, pictures of text and pages drawn as vector outlines in one
way. Its text-layer characters, if any, are kept too (kind "text"); the OCR result is a separate kind "ocr"
Document of the same page. At most settings.ocr_max_pages pages are OCRed per file; the rest are skipped
with a warning, so a 900-page scan takes minutes, not hours.

Pictures on pages that do have a text layer are not OCRed (charts and photos would cost seconds a page for
little text); pictures in .docx/.pptx files are, within the same per-file limit.

Permissions ("copy-protected" PDFs) are not enforced by PDFium: such files give their text like any other.
"""
from __future__ import annotations

import logging

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from ingest import ocr
from ingest.loaders.base import Ctx, LoadError

log = logging.getLogger(__name__)
# ~137 dpi for A4: 9-pt text is ~17 px high, plenty for PP-OCR, and a third fewer pixels than 2000 px.
_RENDER_LONG_SIDE = 1600


def load_pdf(ctx: Ctx) -> None:
    try:
        pdf = pdfium.PdfDocument(str(ctx.path))
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise LoadError("encrypted", f"PDF「{ctx.name}」已加密，需要密码才能读取：请去除密码后重新导入") from e
        raise LoadError(
            "corrupt", f"PDF「{ctx.name}」无法打开（{_summary(e)}）：文件可能已损坏，"
                       "请用 PDF 阅读器打开并另存后重新导入"
        ) from e
    try:
        n = len(pdf)
        if n == 0:
            raise LoadError("empty", f"PDF「{ctx.name}」没有任何页面：请检查文件后重新导入")
        for i in range(n):
            _load_page(ctx, pdf, i)
        if ctx.ocr_skipped:
            log.warning("%s: OCR limit reached (ingest.ocr_max_pages=%d); %d page(s) without a text layer skipped",
                        ctx.path, ctx.settings.ocr_max_pages, ctx.ocr_skipped)
        if not ctx.docs:
            if not ctx.settings.ocr:
                raise LoadError("no_text", f"PDF「{ctx.name}」没有文字层（可能是扫描件），而 OCR 已关闭："
                                           "请在设置中开启 ingest.ocr 后重新导入")
            if ctx.ocr_skipped:
                raise LoadError("no_text", f"PDF「{ctx.name}」没有文字层，且超过了每个文件的 OCR 页数上限 "
                                           "ingest.ocr_max_pages：请调大该设置")
            raise LoadError("no_text", f"PDF「{ctx.name}」没有文字层，OCR 也未识别出文字：请确认扫描件清晰，"
                                       "或提供带文字的版本")
    finally:
        pdf.close()


def _load_page(ctx: Ctx, pdf: pdfium.PdfDocument, i: int) -> None:
    """Read page i into ctx: its text layer, and OCR when the layer is (almost) empty or garbled."""
    try:
        page = pdf[i]
    except pdfium.PdfiumError as e:
        log.warning("%s: page %d cannot be read (%s); skipped", ctx.path, i + 1, e)
        return
    try:
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_bounded()
        finally:
            textpage.close()
        usable, garbled = text_quality(text)
        if garbled:
            # Fonts without a Unicode map (common in old Chinese PDFs) give private-use or replacement
            # characters: worthless for search, so the page is treated as having no text layer.
            log.info("%s: page %d text layer is garbled; OCR instead", ctx.path, i + 1)
        else:
            ctx.add_text(text, page=i + 1)
            if usable >= ctx.settings.ocr_min_chars:
                return
        if not ctx.take_ocr_slot():
            return
        w, h = page.get_size()
        scale = max(1.0, min(4.0, _RENDER_LONG_SIDE / max(w, h, 1)))
        bitmap = page.render(scale=scale)
        try:
            image = bitmap.to_pil()
            ctx.add_ocr(ocr.ocr_image(image), page=i + 1)
        finally:
            bitmap.close()
    finally:
        page.close()


def text_quality(text: str) -> tuple[int, bool]:
    """(number of usable non-space characters, whether the text layer is garbled).

    Garbled: at least 10 non-space characters and over 30% of them private-use (U+E000-U+F8FF) or
    replacement/non-characters (U+FFFD, U+FFFE, U+FFFF).

    >>> text_quality("第一章 总则")
    (5, False)
    """
    chars = [c for c in text if not c.isspace()]
    bad = sum(1 for c in chars if "\ue000" <= c <= "\uf8ff" or c in "\ufffd\ufffe\uffff")
    return len(chars) - bad, len(chars) >= 10 and bad > 0.3 * len(chars)


def _summary(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]
