"""Turn the bytes of a text file into str, the way a Chinese office needs it.

Order (first that applies wins):
  1. a byte-order mark: UTF-8, UTF-16 LE/BE, UTF-32 LE/BE (UTF-32 is checked first: its LE mark starts like UTF-16's);
  2. strict UTF-8 (most files today; cheap and never wrong when it succeeds on non-ASCII bytes);
  3. a charset the file declares itself (HTML <meta>, XML prolog), when the bytes decode cleanly with it;
  4. charset-normalizer's best guess (near-ties between Western code pages go to cp1252) — but when that guess is not a Chinese codec and the bytes also read
     cleanly as GB18030 or Big5, the Chinese reading wins if charset-normalizer, limited to Chinese codecs,
     finds it no messier. Short GBK text is otherwise often taken for Korean (cp949) and Chinese in
     single-byte codecs for Latin-1 mojibake; this product ingests Chinese documents first.
  5. nothing fits: GB18030 with replacement characters (never Latin-1, which "succeeds" on any bytes).

GB2312/GBK/CP936 labels are decoded as GB18030 (a strict superset: files labelled GB2312 routinely contain
GBK-only characters); Big5 as CP950 (Microsoft's Big5, what Traditional-Chinese Windows actually writes).

>>> decode_bytes("中文".encode("gbk")).encoding
'gb18030'
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

import charset_normalizer

# Python codec names (after codecs.lookup) mapped to the superset we decode with.
_SUPERSETS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "cp936": "gb18030",
    "euc_cn": "gb18030",
    "big5": "cp950",
}
_CHINESE = {"gb18030", "cp950", "big5hkscs", "hz"}
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class Decoded:
    text: str
    encoding: str  # canonical Python codec name actually used, e.g. "utf-8", "gb18030", "utf-16-be"
    method: str  # "bom" | "utf-8" | "declared" | "detected" | "fallback"


def canonical(name: str) -> str | None:
    """The codec we decode a label with: 'GB2312' -> 'gb18030', 'UTF8' -> 'utf-8'; None if unknown."""
    try:
        py = codecs.lookup(name.strip().strip("\"'")).name
    except (LookupError, AttributeError):
        return None
    return _SUPERSETS.get(py.replace("-", "_"), py)


def _strict(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _mostly_chinese(text: str) -> bool:
    non_ascii = [c for c in text if ord(c) > 127]
    if len(non_ascii) < 2:
        return False
    return sum(1 for c in non_ascii if _CJK.match(c)) >= 0.9 * len(non_ascii)


def _detect(data: bytes) -> Decoded | None:
    results = charset_normalizer.from_bytes(data)
    best = results.best()
    if best is not None:
        # Near-ties among Western single-byte codecs (cp1250 vs cp1252 on Spanish 'ñ') go to windows-1252,
        # the legacy Western default browsers also use for unlabelled pages.
        tied = [r for r in results if r.chaos <= best.chaos + 0.01 and canonical(r.encoding) == "cp1252"]
        best = tied[0] if tied and canonical(best.encoding) not in _CHINESE else best
    best_enc = (canonical(best.encoding) or best.encoding) if best is not None else None
    # Second opinion limited to Chinese codecs, ranked by charset-normalizer's "chaos" (mess) score.
    # Ties (very short text) go to GB18030: Simplified Chinese is this product's common case.
    zh_results = sorted(
        charset_normalizer.from_bytes(data, cp_isolation=["gb18030", "big5"]),
        key=lambda r: (r.chaos, canonical(r.encoding) != "gb18030"),
    )
    for zh in zh_results[:1]:
        enc = canonical(zh.encoding) or zh.encoding
        text = _strict(data, enc)
        if text is None:
            continue
        if best_enc in _CHINESE or (_mostly_chinese(text) and (best is None or zh.chaos <= best.chaos + 0.02)):
            return Decoded(text, enc, "detected")
    if best_enc is not None:
        text = _strict(data, best_enc)
        if text is not None:
            return Decoded(text, best_enc, "detected")
    return None


def decode_bytes(data: bytes, declared: str | None = None) -> Decoded:
    """Decode `data` following the order in the module docstring. `declared` is a charset the file states."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            # errors="replace": a file with a BOM is that encoding; a stray bad unit should not lose the file.
            return Decoded(data[len(bom):].decode(enc, errors="replace"), enc, "bom")
    wide = _bomless_wide(data)
    if wide is not None:
        return wide
    text = _strict(data, "utf-8")
    if text is not None:
        return Decoded(text, "utf-8", "utf-8")
    if declared:
        enc = canonical(declared)
        text = _strict(data, enc) if enc else None
        # A Western single-byte label "decodes" any bytes; only trust it when the Chinese reading is not better.
        if text is not None and not (codecs.lookup(enc).name in _SINGLE_BYTE and _chinese_reading(data)):
            return Decoded(text, enc, "declared")
    found = _detect(data)
    if found is not None:
        return found
    return Decoded(data.decode("gb18030", errors="replace"), "gb18030", "fallback")


def _bomless_wide(data: bytes) -> Decoded | None:
    """UTF-16/32 without a BOM: NUL bytes are valid UTF-8, so look at where they sit before trying UTF-8.

    Text that is mostly ASCII or CJK in UTF-16 has NUL (or, for CJK, small) high bytes in every other position;
    UTF-32 has three of four bytes NUL. Only consulted when NULs are frequent, so binary-ish text is unaffected.
    """
    sample = data[:4096]
    if len(sample) < 4 or sample.count(0) < len(sample) // 4:
        return None
    n = len(sample) - len(sample) % 4
    for enc, zero_at in (("utf-32-le", (1, 2, 3)), ("utf-32-be", (0, 1, 2))):
        if all(sample[i + z] == 0 for i in range(0, n, 4) for z in zero_at):
            text = _strict(data[: len(data) - len(data) % 4], enc)
            if text is not None:
                return Decoded(text, enc, "detected")
    even = sample[0::2].count(0)
    odd = sample[1::2].count(0)
    enc = "utf-16-be" if even > 2 * odd else "utf-16-le" if odd > 2 * even else None
    if enc is not None:
        text = _strict(data[: len(data) - len(data) % 2], enc)
        if text is not None:
            return Decoded(text, enc, "detected")
    return None


def _chinese_reading(data: bytes) -> bool:
    text = _strict(data, "gb18030")
    return text is not None and _mostly_chinese(text)


_SINGLE_BYTE = {"latin-1", "iso8859-1", "cp1252", "cp1250", "iso8859-15", "ascii", "mac-roman"}


def read_text(path: Path, declared: str | None = None) -> Decoded:
    """Read a file and decode it with decode_bytes."""
    return decode_bytes(Path(path).read_bytes(), declared)
