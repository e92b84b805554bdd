"""Turn the bytes of a text file into str, the way a Chinese office needs it.

Order (first that applies wins):
  1. a byte-order mark: UTF-8, UTF-16 LE/BE, UTF-32 LE/BE (UTF-32 is checked first: its LE mark starts like UTF-16's);
  2. strict UTF-8 (most files today; cheap and never wrong when it succeeds on non-ASCII bytes);
  3. a charset the file declares itself (HTML <meta>, XML prolog), when the bytes decode cleanly with it;
  4. charset-normalizer's best guess (near-ties between Western code pages go to cp1252) — but when that guess
     is not a Chinese codec and the bytes also read cleanly as GB18030 or Big5, the Chinese reading wins if
     charset-normalizer, limited to Chinese codecs, finds it no messier. Short GBK text is otherwise often
     taken for Korean (cp949) and Chinese in single-byte codecs for Latin-1 mojibake; this product ingests
     Chinese documents first.
  5. nothing fits: GB18030 with replacement characters (never Latin-1, which "succeeds" on any bytes).

Every reading from a legacy codec (3-5) must then look like text (plausibility()): Chinese text uses its most
common characters (的 一 是 不 了 在 人 有 ...) for a fifth to a half of its ideographs, while bytes decoded with
the wrong CJK codec give ideographs spread evenly over the whole character set (under 5 % common ones), often
with private-use, unassigned or replacement characters. A reading that fails is replaced by the most plausible
strict reading among the Chinese codecs, EUC-TW included (CNS 11643, which Python has no codec for: decoded by
the C library's iconv, see _iconv_decode); when none is plausible, decode_bytes raises EncodingError with a
reason for the user instead of returning mojibake.

GB2312/GBK/CP936 labels are decoded as GB18030 (a strict superset: files labelled GB2312 routinely contain
GBK-only characters); Big5 as CP950 (Microsoft's Big5, what Traditional-Chinese Windows actually writes).

>>> decode_bytes("中文".encode("gbk")).encoding
'gb18030'
"""
from __future__ import annotations

import codecs
import functools
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import charset_normalizer
from charset_normalizer.constant import FREQUENCIES

from common.text import CJK

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
    return sum(1 for c in non_ascii if CJK.match(c)) >= 0.9 * len(non_ascii)


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


class EncodingError(ValueError):
    """No reading of the bytes looks like text: `reason` says so in a sentence for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_bytes(data: bytes, declared: str | None = None) -> Decoded:
    """Decode `data` following the order in the module docstring. `declared` is a charset the file states.

    Raises EncodingError when the bytes are in a legacy encoding and no reading of them is plausible text.
    """
    decoded = _decode(data, declared)
    if decoded.method in ("bom", "utf-8") or decoded.encoding.startswith("utf-"):
        return decoded
    return _plausible_or_alternative(data, decoded, declared)


def _decode(data: bytes, declared: str | None) -> Decoded:
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


# --------------------------------------------------------------------------------------------------------------
# Plausibility of a legacy-codec reading, and EUC-TW
# --------------------------------------------------------------------------------------------------------------
# Below this share of common characters among its ideographs a Chinese reading is taken for mojibake. Measured
# (tests/test_loaders.py, messy_docs): real Chinese text 0.11-0.45 (simplified and traditional, prose, blog feeds,
# technical notes); EUC-TW read as GB18030 0.03, as EUC-JP 0.05, as Big5 0.01; GBK read as Big5 or EUC-KR 0.00.
MIN_COMMON_SHARE = 0.07
MIN_IDEOGRAPHS = 30            # fewer ideographs than this: too little to judge, accepted as decoded
MAX_JUNK_SHARE = 0.05          # private-use, unassigned and replacement characters among the non-ASCII ones
# Readings tried when the first one is implausible: Chinese first (the most common characters' share decides
# among them), then Japanese and Korean (taken when no Chinese reading is plausible).
_CANDIDATES = ("gb18030", "cp950", "euc-tw", "big5hkscs", "shift_jis", "euc_jp", "cp949")


@functools.cache
def _common_chinese() -> frozenset[str]:
    """charset-normalizer's list of the most frequent Chinese characters, kept where the character is the same in
    traditional Chinese (encodable in Big5): 的 一 是 不 了 在 人 有 我 他 中 ..., common to both scripts."""
    out = set()
    for c in FREQUENCIES["Chinese"]:
        try:
            c.encode("big5")
        except UnicodeEncodeError:
            continue
        out.add(c)
    return frozenset(out)


def _is_ideograph(c: str) -> bool:
    return "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" or "\U00020000" <= c <= "\U0003ffff"


@dataclass(frozen=True)
class Plausibility:
    ideographs: int
    common_share: float    # share of _common_chinese() among the ideographs
    junk_share: float      # private-use / unassigned / U+FFFD among the non-ASCII characters
    script: str            # "chinese" | "japanese" | "korean" | "other" (the non-ASCII letters' majority)
    hanja_share: float = 0.0   # ideographs among the letters (Korean: real text has few; GBK read as EUC-KR many)

    @property
    def ok(self) -> bool:
        if self.junk_share > MAX_JUNK_SHARE:
            return False
        if self.script == "korean":
            return self.hanja_share < 0.2
        if self.script != "chinese" or self.ideographs < MIN_IDEOGRAPHS:
            return True
        return self.common_share >= MIN_COMMON_SHARE


PLAUSIBILITY_SAMPLE = 200_000   # characters looked at: a wrong codec shows from the start, a big file stays fast


def plausibility(text: str) -> Plausibility:
    """How much a decoded text looks like real text (see MIN_COMMON_SHARE); judged on its first
    PLAUSIBILITY_SAMPLE characters."""
    common = _common_chinese()
    ideographs = n_common = non_ascii = junk = kana = hangul = 0
    for c in text[:PLAUSIBILITY_SAMPLE]:
        if c < "\x80":
            continue
        non_ascii += 1
        if _is_ideograph(c):
            ideographs += 1
            n_common += c in common
        elif "\u3040" <= c <= "\u30ff":
            kana += 1
        elif "\uac00" <= c <= "\ud7a3":
            hangul += 1
        elif c == "\ufffd" or unicodedata.category(c) in ("Co", "Cn"):
            junk += 1
    letters = ideographs + kana + hangul
    if not letters:
        script = "other"
    elif hangul >= 0.5 * letters:
        script = "korean"
    elif kana >= 0.2 * letters:
        script = "japanese"
    else:
        script = "chinese" if ideographs >= 0.5 * letters else "other"
    return Plausibility(ideographs, n_common / ideographs if ideographs else 0.0,
                        junk / non_ascii if non_ascii else 0.0, script, ideographs / letters if letters else 0.0)


def _plausible_or_alternative(data: bytes, decoded: Decoded, declared: str | None) -> Decoded:
    first = plausibility(decoded.text)
    if first.ok:
        return decoded
    best: tuple[float, Decoded] | None = None
    other: Decoded | None = None
    for enc in _CANDIDATES:
        if enc == decoded.encoding:
            continue
        text = _iconv_decode(data, enc.upper()) if enc == "euc-tw" else _strict(data, enc)
        if text is None:
            continue
        p = plausibility(text)
        if not p.ok:
            continue
        if p.script == "chinese" and (best is None or p.common_share > best[0]):
            best = (p.common_share, Decoded(text, enc, "detected"))
        elif p.script in ("japanese", "korean") and other is None:
            other = Decoded(text, enc, "detected")
    if best is not None or other is not None:
        return best[1] if best is not None else other
    what = (f"文件声明的编码 {declared} " if declared and decoded.method == "declared"
            else f"推测的编码 {decoded.encoding} ")
    detail = (f"{first.junk_share:.0%} 的字符是无效或未分配字符" if first.junk_share > MAX_JUNK_SHARE
              else f"常用字只占 {first.common_share:.0%}，正常中文在 10% 以上")
    euc_tw = "" if _iconv_available() else "；本机没有 iconv，无法尝试 EUC-TW（CNS 11643）"
    raise EncodingError(f"无法可靠识别文件的文字编码：按{what}解码得到的是乱码（{detail}），"
                        f"GB18030、Big5、EUC-TW 也都不像正常文字{euc_tw}。请用文本编辑器另存为 UTF-8 后重新导入。")


@functools.cache
def _iconv_available() -> bool:
    return shutil.which("iconv") is not None


def _iconv_decode(data: bytes, encoding: str) -> str | None:
    """Decode with the C library's iconv (glibc's gconv modules cover EUC-TW / CNS 11643, which Python's codecs do
    not); None when the bytes are not valid in `encoding` or no iconv is installed."""
    if not _iconv_available():
        return None
    try:
        res = subprocess.run(["iconv", "-f", encoding, "-t", "UTF-8"], input=data, capture_output=True, timeout=60,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.decode("utf-8", errors="strict")
