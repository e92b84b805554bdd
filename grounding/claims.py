"""What an answer claims that can be checked against text: numbers, dates and named entities.

Normalisation makes one fact look the same however it is written: full-width and half-width characters (NFKC:
「２０２２」 = 「2022」), thousands separators (35,000 = 35000), Chinese numerals and the units 万/亿
(「3.5万」 = 「三万五千」 = 35000, cn2an does the conversion) and date formats (「2022年3月5日」 = 「2022-03-05」 =
「2022/3/5」 = 「二〇二二年三月五日」).

    >>> [c.key for c in extract_claims("2021年营收3.5万元，比华为高12%。")]
    ['date:2021', 'num:35000/money', 'ent:华为', 'num:12/pct']

A number written with a unit of measure (length, weight, area, volume, money, percent, time spans, centuries, age,
temperature) is that quantity: 「直径约1厘米」 is not supported by a passage whose only 1 is 「每室1个」, nor
「公元前10世纪」 by 「十数万人」. A passage writing the value with no unit at all (a table cell) still
supports it; classifiers (个、名、条…) are not checked — 「3名」 and 「3位」 say the same.

The passage side is read more generously than the answer side (`passage_facts`): a single Chinese numeral such as
「三个」 counts as 3 in a passage, so an answer saying 「3个」 is supported, while a lone 「一」 in an answer
(「一些」「一起」) is never taken for a number claim.
"""
from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import cn2an

from retrieval.sentences import split_sentences

# Named-entity tags of jieba's part-of-speech model: person, place, organisation, other proper noun, Latin word.
ENTITY_FLAGS = frozenset({"nr", "nrfg", "nrt", "ns", "nsf", "nt", "nz", "eng"})
PLACE_FLAGS = frozenset({"ns", "nsf"})

_CN_DIGIT = "零〇一二两三四五六七八九"
_CN_NUM = rf"[{_CN_DIGIT}十百千万亿]+(?:点[{_CN_DIGIT}]+)?"
_AR_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?(?:万亿|千万|百万|[万亿])?"
_NUMBER = re.compile(rf"({_AR_NUM})|({_CN_NUM})")
_UNITS = {"万亿": 1e12, "千万": 1e7, "百万": 1e6, "万": 1e4, "亿": 1e8}
_UNIT_NUMBER = re.compile(r"^(\d+(?:\.\d+)?)(万亿|千万|百万|万|亿)?$")
_PERCENT_CN = re.compile(rf"百分之({_CN_NUM}|{_AR_NUM})")
_MARKER = re.compile(r"\[(\d{1,2})\]|【(\d{1,2})】")
# A list number at the start of a line or after a colon/semicolon (「1. 」「2、」「(3)」, 「原因包括：1. …；2. …」)
# numbers the answer's own items, it claims nothing.
_LIST_NUMBER = re.compile(r"(?m)(?:^|(?<=[：:；;]))\s*[(（]?\d{1,2}[.、)）](?!\d)")

_Y = r"(\d{4}|\d{2})\s*年"
_M = r"(\d{1,2})\s*月"
_D = r"(\d{1,2})\s*[日号]"
_DATE_PATTERNS = [
    re.compile(rf"{_Y}\s*{_M}\s*{_D}"),
    re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)"),
    re.compile(rf"{_Y}\s*{_M}"),
    re.compile(r"(?<!\d)(\d{4})[-/](\d{1,2})(?![\d/-])"),
    re.compile(rf"(?<!\d)()(?:){_M}\s*{_D}"),
    re.compile(rf"(?<!\d){_Y}"),
]


# Units of measure, longest first within the text they are read from; a number followed by one of them (after an
# optional range: 「2-4厘米」) is that quantity.
_MEASURES = {
    "length": ("毫米", "厘米", "公分", "分米", "千米", "公里", "公尺", "英里", "英尺", "英寸", "海里", "光年", "米",
               "mm", "cm", "km", "m"),
    "area": ("平方千米", "平方公里", "平方米", "平方英里", "平米", "公顷", "亩", "km²", "m²"),
    "weight": ("毫克", "千克", "公斤", "公克", "克", "斤", "吨", "磅", "mg", "kg", "g"),
    "volume": ("毫升", "公升", "立方米", "升", "ml"),
    "money": ("人民币", "美元", "港元", "港币", "日元", "欧元", "英镑", "台币", "韩元", "卢布", "元", "块钱"),
    "pct": ("%", "个百分点", "百分点"),
    "century": ("世纪",),
    "decade": ("年代",),
    "age": ("周岁", "岁"),
    "hour": ("小时", "钟头"),
    "minute": ("分钟",),
    "second": ("秒钟", "秒"),
    "temperature": ("摄氏度", "华氏度", "°c", "℃"),
}
_MEASURE_OF = {w: k for k, words in _MEASURES.items() for w in words}
_MEASURE = re.compile("|".join(re.escape(w) for w in sorted(_MEASURE_OF, key=len, reverse=True)))
_RANGE_REST = re.compile(rf"\s*(?:[-~～至到—–]|或)\s*(?:{_AR_NUM}|{_CN_NUM})\s*")
# What may follow a number without naming another quantity: punctuation, the end, Latin text that is no unit
_NO_UNIT = re.compile(r"(?:$|[\W_a-z]|[的左上以])")


# Two numbers joined by x/×/*: a relay (4x100米), a size (1920×1080) — one figure.
_COMPOUND = re.compile(r"(?<![\d.])\d+(?:\.\d+)?\s*[x×*]\s*\d+(?:\.\d+)?(?![\d.])")


def _compound_key(span: str) -> str:
    return "x".join(re.split(r"\s*[x×*]\s*", span))


def _compound_keys(text: str) -> set[str]:
    return {_compound_key(m.group()) for m in _COMPOUND.finditer(text)}


def _unit_after(text: str, end: int) -> str:
    """The measure a number ending at `end` is written with ("length", "pct", …), "" for none, "?" for a word
    that is no unit of measure (「1个」, 「十数万人」)."""
    m = _RANGE_REST.match(text, end)
    at = m.end() if m else end
    while at < len(text) and text[at] in "余多":       # 「20余米」
        at += 1
    u = _MEASURE.match(text, at)
    if u and not (u.group().isascii() and u.group()[-1].isalpha() and re.match(r"[a-z]", text[u.end():u.end() + 1])):
        return _MEASURE_OF[u.group()]
    return "" if _NO_UNIT.match(text, at) else "?"


@dataclass(frozen=True)
class Claim:
    """One checkable piece of an answer. `key` is what must match ("num:35000", "num:1/length" for a number with a
    unit of measure, "num:4x100" for a compound figure, "date:2022-3", "ent:华为")."""

    kind: str          # "number" | "date" | "entity"
    text: str          # as written in the (normalised) answer
    key: str
    start: int = 0     # offsets in the normalised text
    end: int = 0
    unit: str = ""     # a number's unit of measure (_MEASURES), "" when it has none


@dataclass
class Facts:
    """What a passage states, normalised: number values, dates (y, m, d with None for unknown parts), text."""

    text: str
    numbers: set[float] = field(default_factory=set)
    units: dict[float, set[str]] = field(default_factory=dict)   # value -> the measures it is written with
    dates: list[tuple[int | None, int | None, int | None]] = field(default_factory=list)


def normalize(text: str) -> str:
    """NFKC (full width → half width), lower case, whitespace removed.

    >>> normalize("ＧＰＵ　２０２２ 年")
    'gpu2022年'
    """
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def strip_markers(text: str) -> str:
    """The text without citation markers: strip_markers("是3个[1]。") -> "是3个。"."""
    return _MARKER.sub("", text)


def number_value(span: str) -> float | None:
    """number_value("3.5万") -> 35000.0; number_value("三千五百万") -> 35000000.0; None when it is no number."""
    span = span.replace(",", "")
    m = _UNIT_NUMBER.match(span)
    if m:
        return float(m.group(1)) * _UNITS.get(m.group(2) or "", 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(cn2an.cn2an(span, "smart"))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _cn_dates_to_digits(text: str) -> str:
    """「二〇二二年三月五日」 → 「2022年3月5日」 (only numerals directly before 年/月/日/号)."""
    def conv(m: re.Match) -> str:
        v = number_value(m.group(1))
        return (str(int(v)) if v is not None and v == int(v) else m.group(1)) + m.group(2)
    return re.sub(rf"([{_CN_DIGIT}十]+)([年月日号])", conv, text)


def _year(raw: str) -> int:
    y = int(raw)
    return y + (1900 if y >= 30 else 2000) if len(raw) == 2 else y


def _dates(text: str) -> list[tuple[tuple[int | None, int | None, int | None], int, int]]:
    """(y, m, d) with the span of each date in `text`; longer forms win over the partial ones inside them."""
    found: list[tuple[tuple[int | None, int | None, int | None], int, int]] = []
    taken: list[tuple[int, int]] = []
    for pat in _DATE_PATTERNS:
        for m in pat.finditer(text):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            g = [x for x in m.groups()]
            y = _year(g[0]) if g and g[0] else None
            mo = int(g[1]) if len(g) > 1 and g[1] else None
            d = int(g[2]) if len(g) > 2 and g[2] else None
            if (mo is not None and not 1 <= mo <= 12) or (d is not None and not 1 <= d <= 31):
                continue
            found.append(((y, mo, d), m.start(), m.end()))
            taken.append((m.start(), m.end()))
    found.sort(key=lambda x: x[1])
    return found


def _date_key(date: tuple[int | None, int | None, int | None]) -> str:
    return "date:" + "-".join("?" if x is None else str(x) for x in date).rstrip("-?")


def _numbers(text: str, *, generous: bool) -> list[tuple[float, int, int]]:
    out = []
    for m in _PERCENT_CN.finditer(text):
        v = number_value(m.group(1))
        if v is not None:
            out.append((v, m.start(), m.end()))
    for m in _NUMBER.finditer(text):
        if any(s <= m.start() < e for _, s, e in out):
            continue
        arabic, chinese = m.group(1), m.group(2)
        if chinese and not generous:
            # an answer's Chinese numeral counts only when it is clearly a number: two characters or more with a
            # digit in it (「十五」「三千」), never 「一」 alone or 「千万」 (= by all means)
            if len(chinese) < 2 or not any(c in _CN_DIGIT for c in chinese):
                continue
        v = number_value(arabic or chinese)
        if v is not None:
            out.append((v, m.start(), m.end()))
    return out


@lru_cache(maxsize=4096)
def _entities(text: str) -> tuple[tuple[str, str, int], ...]:
    """(entity, jieba flag, offset) for named entities and 《titles》 in `text` (normalised text expected)."""
    import jieba.posseg as pseg  # imported late: the tagger's model loads in about a second

    out, pos = [], 0
    for w in pseg.cut(text):
        word, flag = w.word, w.flag
        at = text.find(word, pos)
        pos = at + len(word) if at >= 0 else pos
        if flag in ENTITY_FLAGS and len(word) >= 2 and not word.isdigit():
            out.append((word, flag, max(at, 0)))
    for m in re.finditer(r"《([^》]{1,40})》", text):
        out.append((m.group(1), "title", m.start(1)))
    return tuple(out)


def extract_claims(answer: str, *, ignore: str = "") -> list[Claim]:
    """Numbers, dates and entities the answer states, in order; those also written in `ignore` (the question:
    repeating it is no claim) are left out. Citation markers and list numbers are not claims."""
    text = normalize(_cn_dates_to_digits(_LIST_NUMBER.sub("", strip_markers(answer))))
    asked = normalize(_cn_dates_to_digits(ignore)) if ignore else ""
    asked_numbers = {v for v, _, _ in _numbers(asked, generous=True)} if asked else set()
    claims: list[Claim] = []
    date_spans = []
    for date, s, e in _dates(text):
        date_spans.append((s, e))
        if asked and any(_date_covers(d, date) for d, _, _ in _dates(asked)):
            continue
        claims.append(Claim("date", text[s:e], _date_key(date), s, e))
    compound, asked_compounds = [], _compound_keys(asked)
    for m in _COMPOUND.finditer(text):      # 4x100米, 1920×1080: one figure, not two numbers
        compound.append((m.start(), m.end()))
        if _compound_key(m.group()) not in asked_compounds:
            claims.append(Claim("number", m.group(), "num:" + _compound_key(m.group()), m.start(), m.end()))
    for v, s, e in _numbers(text, generous=False):
        if any(ds <= s < de for ds, de in date_spans + compound) or v in asked_numbers:
            continue
        unit = "pct" if text.startswith("百分之", s) else _unit_after(text, e)
        unit = "" if unit == "?" else unit
        claims.append(Claim("number", text[s:e], f"num:{v:g}" + (f"/{unit}" if unit else ""), s, e, unit))
    for word, _flag, at in _entities(text):
        if word in asked or any(ch.isdigit() for ch in word):
            continue
        claims.append(Claim("entity", word, f"ent:{word}", at, at + len(word)))
    claims.sort(key=lambda c: c.start)
    unique: dict[str, Claim] = {}
    for c in claims:
        unique.setdefault(c.key, c)
    return list(unique.values())


@lru_cache(maxsize=1024)
def passage_facts(passage: str) -> Facts:
    """The passage's numbers (Chinese numerals of one character included) and dates, normalised."""
    text = normalize(_cn_dates_to_digits(passage))
    dates = [d for d, _, _ in _dates(text)]
    units: dict[float, set[str]] = {}
    for v, s, e in _numbers(text, generous=True):
        units.setdefault(v, set()).add("pct" if text.startswith("百分之", s) else _unit_after(text, e))
    return Facts(text=text, numbers=set(units), units=units, dates=dates)


def _date_covers(have: tuple[int | None, int | None, int | None],
                 want: tuple[int | None, int | None, int | None]) -> bool:
    """True when `have` states every part of `want` the same way (2022-3-5 covers 3-5 and 2022-3)."""
    return all(w is None or h == w for h, w in zip(have, want, strict=True))


def _parse_date_key(key: str) -> tuple[int | None, int | None, int | None]:
    parts = key.removeprefix("date:").split("-")
    vals = [None if p in ("?", "") else int(p) for p in parts] + [None, None, None]
    return vals[0], vals[1], vals[2]


def supports(passage: str, claim: Claim) -> bool:
    """Does `passage` state `claim`? Numbers by value (3.5万 = 35000), dates by parts, entities by text.

    >>> supports("收入为35,000元。", extract_claims("收入3.5万元")[0])
    True
    """
    facts = passage_facts(passage)
    if claim.kind == "number" and "x" in claim.key:
        return claim.key.removeprefix("num:") in _compound_keys(facts.text)
    if claim.kind == "number":
        v = float(claim.key.removeprefix("num:").split("/")[0])
        same = [x for x in facts.numbers if abs(v - x) <= 1e-9 * max(1.0, abs(v))]
        # a quantity needs its measure (or a bare value): 「1厘米」 is not 「1个」
        return any(not claim.unit or facts.units[x] & {claim.unit, ""} for x in same)
    if claim.kind == "date":
        want = _parse_date_key(claim.key)
        if any(_date_covers(d, want) for d in facts.dates):
            return True
        # a year alone may be written without 年 in the passage (「1990-1995」, a table cell)
        return want[1] is None and want[2] is None and want[0] is not None and float(want[0]) in facts.numbers
    name = normalize(claim.text)
    return name in facts.text or any(alias in facts.text for alias in PLACE_ALIASES.get(name, ()))


# Places written in more than one way (mainland / Hong Kong / Taiwan usage, short forms): one name, any of its forms.
_PLACE_FORMS = ("澳大利亚 澳洲 澳大利亞", "新西兰 纽西兰 紐西蘭", "新加坡 星加坡", "韩国 南韩 大韩民国", "朝鲜 北韩",
                "美国 美利坚 美利坚合众国", "英国 英伦 大不列颠", "意大利 义大利", "沙特阿拉伯 沙特 沙地阿拉伯",
                "泰国 暹罗", "越南 越南社会主义共和国", "荷兰 尼德兰", "印度尼西亚 印尼",
                "柬埔寨 高棉", "缅甸 缅甸联邦", "苏联 苏维埃联盟", "捷克 捷克共和国")
PLACE_ALIASES = {w: tuple(x for x in forms.split() if x != w) for forms in _PLACE_FORMS for w in forms.split()}


@dataclass(frozen=True)
class Constraint:
    """Something the question pins down that the answer's passage must state: a year/date, a part of a year (a
    quarter, a half year) or a place."""

    kind: str          # "date" | "period" | "place"
    text: str
    key: str


# Parts of a year as reports name them: 第三季度 = 三季度 = Q3 = 7-9月; 上半年 = H1 = 1-6月; 前三季度 = 1-9月.
# (「第三季」 alone is left out: it is as often a TV series' third season.)
_QUARTER_NUM = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "1": 1, "2": 2, "3": 3, "4": 4}
_PERIOD = re.compile(r"前\s*(?P<first>[二两三23])\s*(?:个)?季度"
                     r"|(?:第\s*)?(?P<quarter>[一二三四1-4])\s*季度"
                     r"|(?<![a-z])q(?P<q>[1-4])(?![a-z0-9])"
                     r"|(?P<half>上半年|下半年|(?<![a-z])h[12](?![a-z0-9]))"
                     r"|(?<!\d)(?P<m1>1[0-2]|[1-9])\s*(?:月份?)?\s*[-—–~至到]\s*(?P<m2>1[0-2]|[1-9])\s*月")
_MONTH_RANGES = {(1, 3): "q1", (4, 6): "q2", (7, 9): "q3", (10, 12): "q4", (1, 6): "h1", (7, 12): "h2",
                 (1, 9): "q1-3", (1, 12): "year"}


def _periods(text: str) -> list[tuple[str, int, int]]:
    """(key, start, end) of each part of a year named in `text` (normalised text expected).

    >>> [k for k, _, _ in _periods(normalize("2022年第三季度、Q4、上半年、1-9月与前三季度"))]
    ['q3', 'q4', 'h1', 'q1-3', 'q1-3']
    """
    out = []
    for m in _PERIOD.finditer(text):
        if m.group("first"):
            key = f"q1-{_QUARTER_NUM[m.group('first')]}"
        elif m.group("quarter") or m.group("q"):
            key = f"q{_QUARTER_NUM[m.group('quarter') or m.group('q')]}"
        elif m.group("half"):
            key = "h1" if m.group("half") in ("上半年", "h1") else "h2"
        else:
            a, b = int(m.group("m1")), int(m.group("m2"))
            key = _MONTH_RANGES.get((a, b), f"m{a}-{b}")
        if key == "year":        # 1-12月: the whole year, no part of it
            continue
        out.append((key, m.start(), m.end()))
    return out


def question_constraints(question: str) -> list[Constraint]:
    """The question's time and place constraints.

    >>> [c.text for c in question_constraints("2022年上海的GDP是多少？")]
    ['2022年', '上海']
    >>> [c.key for c in question_constraints("2023年第三季度营收多少？")]
    ['date:2023', 'period:q3']
    """
    text = normalize(_cn_dates_to_digits(question))
    out = [Constraint("date", text[s:e], _date_key(d)) for d, s, e in _dates(text)]
    out += [Constraint("period", text[s:e], f"period:{k}") for k, s, e in _periods(text)]
    out += [Constraint("place", w, f"ent:{w}") for w, flag, _ in _entities(text) if flag in PLACE_FLAGS]
    return out


def meets(passage: str, constraint: Constraint) -> bool:
    """Does `passage` state the constraint (the same year/date, part of the year, the place's name)?"""
    if constraint.kind == "period":
        want = constraint.key.removeprefix("period:")
        return any(k == want for k, _, _ in _periods(passage_facts(passage).text))
    return supports(passage, Claim(constraint.kind if constraint.kind == "date" else "entity", constraint.text,
                                   constraint.key))


# A year or quarter right after these words is the base of a comparison, not the time a figure belongs to:
# 「较2021年增长20%」「与上季度相比」「比2021年的83亿元」.
_BASE = re.compile(r"(?:较之?|相较于?|比|相比|同比|环比|对比|与|同|从|自|由|高于|低于|超过|不及)\s*$")
# Clause ends inside a sentence (normalised text: ，；：→ , ; :); a comma between digits is a thousands separator.
_CLAUSE = re.compile(r"(?<!\d),|,(?!\d)|[;:]")


def _times(text: str, kind: str) -> set[str]:
    """The years (kind "date") or parts of a year ("period") that `text` names, comparison bases left out."""
    found = ([(str(d[0]), s) for d, s, _ in _dates(text) if d[0] is not None] if kind == "date"
             else [(k, s) for k, s, _ in _periods(text)])
    return {key for key, s in found if not _BASE.search(text[max(0, s - 4):s])}


_RANGE_BEFORE = re.compile(r"(?:自|从|至|到|截至|截止)\s*$")
_RANGE_AFTER = re.compile(r"^(?:以来|之前|之后|以前|以后|前|后|起|开始|至|到|间|期间|之间|-|~)")


def is_range(question: str, constraint: Constraint) -> bool:
    """Is the question's time one end of a span (「2010年以来」「自1981年起」「截至2022年」) rather than a point?"""
    text = normalize(_cn_dates_to_digits(question))
    at = text.find(constraint.text)
    if at < 0:
        return False
    return bool(_RANGE_BEFORE.search(text[:at]) or _RANGE_AFTER.match(text[at + len(constraint.text):]))


def bound_elsewhere(passage: str, claim: Claim, constraint: Constraint) -> str | None:
    """The year/part of the year that `passage` ties `claim` to, when every statement of the claim is tied to
    another one than the question's `constraint` asks for (else None): a 2021 figure given for a 2022 question
    although the passage names both years.

    A statement is tied to the times named in its clause, else in its sentence, else — a sentence naming none
    continues the story — in the last sentence before it that named one (a comparison's base year does not count);
    one with no time before it at all is tied to nothing, and then the claim passes.

    >>> c = extract_claims("83亿元")[0]
    >>> bound_elsewhere("2022年营收100亿元，2021年为83亿元。", c, question_constraints("2022年营收多少？")[0])
    '2021年'
    >>> bound_elsewhere("营收83亿元，较2021年增长20%。", c, question_constraints("2022年营收多少？")[0]) is None
    True
    """
    if claim.kind not in ("number", "entity") or constraint.kind not in ("date", "period"):
        return None
    if constraint.kind == "date":
        want = _parse_date_key(constraint.key)[0]
        if want is None:
            return None
        want_key = str(want)
    else:
        want_key = constraint.key.removeprefix("period:")
    text = passage_facts(passage).text
    tied: list[str] = []
    context: set[str] = set()      # the times of the last sentence that named one: a sentence naming none continues it
    for sentence in split_sentences(text):
        context = _times(sentence, constraint.kind) or context
        if not supports(sentence, claim):
            continue
        in_clause = False
        for clause in _CLAUSE.split(sentence):
            if not supports(clause, claim):
                continue
            in_clause = True
            times = _times(clause, constraint.kind) or context
            if not times or want_key in times:
                return None
            tied.extend(sorted(times))
        if not in_clause:        # the claim spans clauses: the sentence decides
            times = context
            if not times or want_key in times:
                return None
            tied.extend(sorted(times))
    if not tied:
        return None
    first = tied[0]
    return f"{first}年" if constraint.kind == "date" else _PERIOD_NAMES.get(first, first)


_PERIOD_NAMES = {"q1": "第一季度", "q2": "第二季度", "q3": "第三季度", "q4": "第四季度", "h1": "上半年",
                 "h2": "下半年", "q1-2": "前两季度", "q1-3": "前三季度"}
