"""PowerPoint .pptx (python-pptx): one group of Documents per slide, page = slide number.

Per slide: the title as a '#' heading, other text boxes top-to-bottom then left-to-right, tables as table
Documents, pictures OCRed (within settings.ocr_max_pages), speaker notes last (「备注：」).
"""
from __future__ import annotations

import zipfile

from pptx import Presentation
from pptx.enum.shapes import MSO_SHAPE_TYPE
from pptx.exc import PackageNotFoundError

from ingest.loaders.base import Ctx, LoadError, heading
from ingest.loaders.office import check_encrypted_office


def load_pptx(ctx: Ctx) -> None:
    check_encrypted_office(ctx, "PowerPoint 文件")
    try:
        prs = Presentation(str(ctx.path))
    except (zipfile.BadZipFile, PackageNotFoundError, KeyError, ValueError) as e:
        raise LoadError("corrupt", f"PowerPoint 文件「{ctx.name}」无法打开（{e}）：请用 PowerPoint 打开并另存为 .pptx "
                                   "后重新导入") from e
    for number, slide in enumerate(prs.slides, start=1):
        lines: list[str] = []
        title_shape = slide.shapes.title
        if title_shape is not None and title_shape.has_text_frame and title_shape.text_frame.text.strip():
            lines.append(heading(1, title_shape.text_frame.text))
        pictures: list[bytes] = []
        tables: list[list[list[str]]] = []
        _walk(slide.shapes, title_shape, lines, tables, pictures)
        if slide.has_notes_slide:
            notes = slide.notes_slide.notes_text_frame
            if notes is not None and notes.text.strip():
                lines.append("备注：" + notes.text.strip())
        ctx.add_text("\n".join(lines), page=number)
        for rows in tables:
            ctx.add_table(rows, page=number)
        ctx.ocr_images(pictures, page=number)


def _walk(shapes, title_shape, lines: list[str], tables: list, pictures: list[bytes]) -> None:
    # Reading order: top to bottom, then left to right (shape order in the file is z-order, not reading order).
    ordered = sorted(shapes, key=lambda s: ((s.top or 0), (s.left or 0)))
    for shape in ordered:
        if title_shape is not None and shape.shape_id == title_shape.shape_id:
            continue
        if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
            _walk(shape.shapes, None, lines, tables, pictures)
            continue
        if getattr(shape, "has_table", False) and shape.has_table:
            tables.append([[c.text for c in row.cells] for row in shape.table.rows])
            continue
        if shape.shape_type == MSO_SHAPE_TYPE.PICTURE:
            try:
                pictures.append(shape.image.blob)
            except (AttributeError, KeyError, ValueError):
                pass
            continue
        if shape.has_text_frame:
            for p in shape.text_frame.paragraphs:
                text = " ".join(p.text.replace("\v", " ").split())
                if text:
                    lines.append(("  " * (p.level or 0)) + text)
