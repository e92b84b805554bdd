"""Pictures (.png .jpg .jpeg .bmp .tif .tiff .webp): OCR with RapidOCR; a multi-page TIFF is one page per frame."""
from __future__ import annotations

from PIL import Image, ImageSequence, UnidentifiedImageError

from ingest import ocr
from ingest.loaders.base import Ctx, LoadError


def load_image(ctx: Ctx) -> None:
    if not ctx.settings.ocr:
        raise LoadError("unsupported", f"图片「{ctx.name}」需要 OCR 才能读取文字，而 OCR 已关闭：请在设置中开启 ingest.ocr 后重新导入")
    Image.MAX_IMAGE_PIXELS = ocr.MAX_PIXELS
    try:
        img = Image.open(ctx.path)
        frames = [f.copy() for _, f in zip(range(max(1, ctx.settings.ocr_max_pages)), ImageSequence.Iterator(img))]
    except Image.DecompressionBombError as e:
        raise LoadError("too_large", f"图片「{ctx.name}」像素过多（超过 {ocr.MAX_PIXELS // 1_000_000} 百万像素）：请缩小后重新导入") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LoadError("corrupt", f"图片「{ctx.name}」无法打开（{e}）：文件可能已损坏，请重新导出后再导入") from e
    multi = len(frames) > 1
    for number, frame in enumerate(frames, start=1):
        if not ctx.take_ocr_slot():
            break
        extra = {"page": number} if multi else {}
        ctx.add_ocr(ocr.ocr_image(frame), **extra)
    if not ctx.docs:
        raise LoadError("no_text", f"图片「{ctx.name}」中没有识别出文字：如果图中确有文字，请提供更清晰的图片")
