"""Pictures (.png .jpg .jpeg .bmp .tif .tiff .webp): OCR with RapidOCR; a multi-page TIFF is one page per frame.

Phone photos are turned upright from their EXIF orientation first (the OCR's direction classifier only knows
0 and 180 degrees). Frames are decoded one at a time and at most settings.ocr_max_pages of them are read.
PIL's own guard refuses images over ~179 million pixels (a "decompression bomb") before decoding them.
"""
from __future__ import annotations

import logging

from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from ingest import ocr
from ingest.loaders.base import Ctx, LoadError

log = logging.getLogger(__name__)


def load_image(ctx: Ctx) -> None:
    if not ctx.settings.ocr:
        raise LoadError("unsupported", f"图片「{ctx.name}」需要 OCR 才能读取文字，而 OCR 已关闭：请在设置中开启 "
                                       "ingest.ocr 后重新导入")
    try:
        with Image.open(ctx.path) as img:
            multi = getattr(img, "n_frames", 1) > 1
            for number, frame in enumerate(ImageSequence.Iterator(img), start=1):
                if not ctx.take_ocr_slot():
                    log.warning("%s: OCR limit reached (ingest.ocr_max_pages=%d); later frames skipped",
                                ctx.path, ctx.settings.ocr_max_pages)
                    break
                upright = ImageOps.exif_transpose(frame.copy())
                ctx.add_ocr(ocr.ocr_image(upright), **({"page": number} if multi else {}))
    except Image.DecompressionBombError as e:
        raise LoadError("too_large", f"图片「{ctx.name}」像素过多（{e}）：请缩小后重新导入") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LoadError("corrupt", f"图片「{ctx.name}」无法打开（{e}）：文件可能已损坏，请重新导出后再导入") from e
    if not ctx.docs:
        if ctx.ocr_skipped:
            raise LoadError("no_text", f"图片「{ctx.name}」未做 OCR：已达到每个文件的 OCR 页数上限 "
                                       "ingest.ocr_max_pages，请调大该设置")
        raise LoadError("no_text", f"图片「{ctx.name}」中没有识别出文字：如果图中确有文字，请提供更清晰的图片")
