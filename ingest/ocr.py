"""OCR of images and scanned pages with RapidOCR (PP-OCRv4 Chinese + English, ONNX Runtime, CPU).

The three ONNX models ship inside the rapidocr_onnxruntime wheel (rapidocr_onnxruntime/models/); we point the
engine at those files explicitly and check they exist, so OCR never reaches for the network — a missing model
is an OcrUnavailable error that says to reinstall the pinned package.

The engine is created lazily, once per process (about 0.4 s and ~200 MB), on the first image: importing this
module costs nothing, so `load_file` stays cheap to send to ProcessPoolExecutor workers.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Images are shrunk so that their longer side is at most this before OCR: bounds time and memory per image
# (RapidOCR would shrink anything above 2000 px itself; doing it here keeps the decoded array small too).
MAX_SIDE = 2000
# Below this on the shorter side, an image cannot hold a readable line of text (icons, bullets, spacers).
MIN_SIDE = 16
# Grey-level distance from the background that counts as drawn content, and the border kept around it.
CONTENT_DIFF = 32
CROP_MARGIN = 24
# RapidOCR's text detector (config Det.limit_side_len, limit_type "min") enlarges images to a 736-px shorter
# side; thinner images are padded to at most this long/short ratio first (see _pad_short_side).
MAX_ASPECT = 2

_engine: Any = None
_lock = threading.Lock()


class OcrUnavailable(RuntimeError):
    """RapidOCR or its bundled models are missing."""


def _model_dir() -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"


def model_files() -> dict[str, Path]:
    """The bundled detection, direction-classification and recognition models."""
    d = _model_dir()
    return {
        "det": d / "ch_PP-OCRv4_det_infer.onnx",
        "cls": d / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rec": d / "ch_PP-OCRv4_rec_infer.onnx",
    }


def get_engine() -> Any:
    """The process-wide RapidOCR engine, created on first use."""
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                except ImportError as e:  # pragma: no cover - the package is pinned in requirements.txt
                    raise OcrUnavailable(f"rapidocr_onnxruntime is not installed ({e}): pip install -r "
                                         "requirements.txt") from e
                files = model_files()
                missing = [str(p) for p in files.values() if not p.is_file()]
                if missing:
                    raise OcrUnavailable(
                        f"OCR model files missing: {', '.join(missing)}; reinstall rapidocr-onnxruntime==1.4.4"
                    )
                _engine = RapidOCR(
                    det_model_path=str(files["det"]),
                    cls_model_path=str(files["cls"]),
                    rec_model_path=str(files["rec"]),
                    print_verbose=False,
                )
    return _engine


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB. Raises OSError/ValueError for broken data and PIL's DecompressionBombError
    for images over ~179 million pixels (PIL's own limit)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "P", "PA"):
        # Transparent backgrounds become white, not black: text drawn on transparency stays readable.
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def is_blank(img: Image.Image) -> bool:
    """True for an image of (almost) one colour: an empty scanned page; OCR would find nothing, slowly."""
    lo, hi = img.convert("L").getextrema()
    return hi - lo < 16


def ocr_image(img: Image.Image) -> str:
    """Text found in `img`, one detected line per output line, in RapidOCR's reading order ('' if none)."""
    img = to_rgb(img)
    if min(img.size) < MIN_SIDE or is_blank(img):
        return ""
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    img = _pad_short_side(_crop_to_content(img))
    # RapidOCR expects OpenCV's BGR channel order for ndarray input.
    arr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
    result, _elapsed = get_engine()(arr)
    if not result:
        return ""
    return _join_lines(result)


def _crop_to_content(img: Image.Image) -> Image.Image:
    """Cut away the empty margins around what is drawn, keeping a small border.

    A rendered page with one picture or one line of text is mostly white; the detector's cost grows with the
    pixel count, so a sparse page OCRs 4-5x faster cropped (measured: ocr_test.pdf's page 2.5 s -> 0.6 s CPU).
    "Empty" is "within CONTENT_DIFF grey levels of the most common grey level" (the background colour).
    """
    gray = img.convert("L")
    background = max(range(256), key=gray.histogram().__getitem__)
    mask = gray.point(lambda v: 255 if abs(v - background) > CONTENT_DIFF else 0)
    box = mask.getbbox()
    if box is None:
        return img
    m = CROP_MARGIN
    box = (max(0, box[0] - m), max(0, box[1] - m), min(img.width, box[2] + m), min(img.height, box[3] + m))
    return img if box == (0, 0, img.width, img.height) else img.crop(box)


def _pad_short_side(img: Image.Image) -> Image.Image:
    """Pad a wide or tall strip (a line of text, a banner) with white until long/short <= MAX_ASPECT.

    RapidOCR's detector scales an image until its *shorter* side is 736 px, so its cost grows with the
    aspect ratio: a 1600x284 strip would become 4147x736 and a 449x110 label 3004x736. Padded to 2:1 they
    become 1600x800 (not enlarged) and 1468x736. White padding below/right keeps box coordinates, and images
    of ordinary shape are enlarged exactly as before, which their small text needs.
    """
    w, h = img.size
    long_side, short_side = max(w, h), min(w, h)
    target = -(-long_side // MAX_ASPECT)  # ceil
    if short_side >= target:
        return img
    size = (w, target) if w >= h else (target, h)
    padded = Image.new("RGB", size, (255, 255, 255))
    padded.paste(img, (0, 0))
    return padded


def _join_lines(result: list) -> str:
    """Boxes whose vertical centres are close form one line (joined by a space), top to bottom."""
    boxes = []
    for box, text, _score in result:
        text = str(text).strip()
        if not text:
            continue
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        boxes.append((min(ys), max(ys), min(xs), text))
    boxes.sort(key=lambda b: (b[0], b[2]))
    lines: list[list[tuple]] = []
    for b in boxes:
        if lines:
            last = lines[-1][-1]
            height = max(b[1] - b[0], last[1] - last[0], 1)
            if abs((b[0] + b[1]) / 2 - (last[0] + last[1]) / 2) < 0.5 * height:
                lines[-1].append(b)
                continue
        lines.append([b])
    return "\n".join(" ".join(t for *_, t in sorted(line, key=lambda b: b[2])) for line in lines)
