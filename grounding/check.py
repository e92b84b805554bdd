"""The grounding check after generation: is what the answer states written in the passages it was given?

    result = check_answer("2021年营收增长12%[1]。", "2022年营收增长多少？", ["2021年营收增长12%。"])
    result.ok        -> False
    result.failures  -> (Failure("constraint", "2022年", "问题中的「2022年」在答案所依据的段落[1]中没有出现"),)

Checks, each a kind of Failure:
  number / date / entity  a number, date or named entity of the answer is in none of the passages (normalised:
                          full/half width, 万/亿, Chinese numerals, date formats — grounding.claims)
  constraint              the question's year/date, quarter/half year or place is not in the passage the answer
                          came from (a 2021 figure for a 2022 question), or it is, but every sentence stating the
                          answer's figure ties it to another year or quarter (「2022年营收100亿元，2021年为83亿元」)
  name                    a name the question asks about (person, organisation, product, 《title》) is not written in
                          the answer's passage or another passage of its file: the answer is about someone else
                          (「1842年，潘仕成做了什么？」 answered from a passage about 怡良)
  relevance               the sentence the answer came from shares too few of the question's key terms (a number
                          that is in the passages, but about something else; an answer without numbers/names too,
                          its sentence found by its wording; a key term written in another given passage of the
                          answer's file counts: a chunk that leaves its subject implicit)
  wording                 most of the answer's own wording (its character pairs not taken from the question) is in
                          none of the passages: the model's commentary, not the documents' (「它反映了日本政治的稳定
                          性和人民对政府的信任度」)
  empty                   the answer only repeats the question (「首钢是什么的简称？」 → 「首钢的简称是“首钢”」)
  citation                a marker [n] points at no passage, or at a passage without the sentence's claims
  uncited                 (templates that ask for citations, when the model cites elsewhere) a sentence with claims
                          and no marker
  quote                   (template knowledge_qa_quoted: the answer ends with 「原文：<the sentence it came from>」)
                          the quote is in no passage, or does not hold the answer's numbers/dates/names
  unquoted                (when a quote is required) an answer with claims and no quote
A refusal is not checked. The passage the answer came from is the quoted one, else the one it cites most, else the
one holding most of its claims, else the one sharing most of its wording. With a quote, the relevance and the
question's constraints are checked on the quoted sentence.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from common.text import char_bigrams
from grounding.claims import (
    Claim,
    bound_elsewhere,
    extract_claims,
    is_range,
    meets,
    normalize,
    question_constraints,
    strip_markers,
    supports,
)
from grounding.evidence import _alnum, best_sentence, key_terms, missing_names, term_coverage
from grounding.quote import QuoteMatch, find_quote, is_cut, split_quote
from retrieval.sentences import sentence_ends

UNGROUNDED = "资料中没有找到可靠依据"
# Below this share of the question's key terms in the answer's evidence sentence (and its neighbours) the answer
# is about something else. Chosen with bench.grounding_noise (docs/benchmarks.md, "Grounding"): 0.25 fails few
# right answers and most near-miss answers; 0.34 fails three times as many right answers.
MIN_RELEVANCE = 0.25
# Below this share of the answer's own character pairs (those not in the question) written in the passages, an answer
# with WORDING_MIN_PAIRS of them or more is mostly the model's own words: on the demo model's answers to 100
# answerable noise-mode questions the lowest right answer of that length was at 0.70 (docs/benchmarks.md §10.8).
MIN_WORDING = 0.5
WORDING_MIN_PAIRS = 15
_ASKS = re.compile(r"什么|谁|哪|多少|几|何|怎么|怎样|如何|为什么|啥")
_MARKER = re.compile(r"\[(\d{1,2})\]|【(\d{1,2})】")
# A short sentence that only says where the previous one came from: 「根据已知信息编号 [1]。」, 「（来源：[2]）」,
# 「参见[1]和[3]。」 (the demo model writes its citations so: measured in docs/benchmarks.md §10.5).
_CITATION_CUE = re.compile(r"^[\s（(【\[]*(?:根据|依据|来源|出处|参见|参考|见|引自|资料来源|以上|source)",
                           re.IGNORECASE)
CITATION_SENTENCE_CHARS = 24
# The templates' two refusal sentences (「根据已知信息无法回答该问题」「没有提供足够的相关信息」) and close
# variants: the one list that the grounding check, the refusal gate (grounding.retry) and bench.eval all use.
REFUSAL_MARKERS: tuple[str, ...] = ("无法回答", "不能回答", "无法根据已知信息", "没有提供足够的相关信息",
                                   "没有提供相关信息", "没有足够的相关信息", "没有相关信息", "未提及", "没有提及",
                                   "无法从", "无法确定")


@dataclass(frozen=True)
class Failure:
    kind: str          # number | date | entity | constraint | relevance | citation | uncited
    text: str          # the claim, constraint or marker concerned
    message: str       # a Chinese sentence for the page and the API


@dataclass(frozen=True)
class Citation:
    """A citation marker in the answer: its offsets, the passage it names (1-based) and the sentence it ends."""

    start: int
    end: int
    passage: int
    sentence_start: int
    sentence_end: int


@dataclass(frozen=True)
class GroundingResult:
    status: str                                   # grounded | ungrounded | refusal
    failures: tuple[Failure, ...] = ()
    claims: int = 0
    source: int | None = None                     # 1-based passage the answer came from
    citations: tuple[Citation, ...] = ()
    evidence: dict[int, str] = field(default_factory=dict)   # passage (1-based) → the sentence supporting the answer
    cited: bool = False                           # the model wrote at least one citation marker
    quote: QuoteMatch | None = None               # where the answer's 「原文：」 quote is in the passages
    quoted: bool = False                          # the model wrote a 「原文：」 quote (found or not)

    @property
    def ok(self) -> bool:
        return self.status != "ungrounded"

    def summary(self) -> str:
        """「资料中没有找到可靠依据：…」 for an ungrounded answer, "" otherwise."""
        if self.ok:
            return ""
        return UNGROUNDED + "：" + "；".join(f.message for f in self.failures[:3]) + "。"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["evidence"] = {str(k): v for k, v in self.evidence.items()}
        d["message"] = self.summary()
        return d


def template_checks(template: str) -> dict[str, bool]:
    """What a prompt template asks of the model, as check_answer's keyword arguments: citations when it shows [1],
    a quote when it asks for 「原文：」 (templates knowledge_qa_cited / knowledge_qa_quoted). The service and the
    evaluation both use this, so they check answers the same way.

    >>> template_checks("…用方括号写出…例如 [1]。…{question}")
    {'require_citations': True, 'require_quote': False}
    """
    return {"require_citations": "[1]" in template, "require_quote": "原文：" in template}


def looks_like_refusal(answer: str) -> bool:
    """The template's refusal sentences and close variants.

    >>> looks_like_refusal("根据已知信息无法回答该问题。")
    True
    """
    text = "".join(answer.split())
    return any(m in text for m in REFUSAL_MARKERS)


def citations(answer: str) -> list[Citation]:
    """Markers [n] / 【n】 in the answer with the sentence each belongs to (a marker right after a sentence's
    full stop belongs to that sentence, and so do the markers of a short source sentence after it: 「…。根据已知信息
    编号 [1]。」).

    >>> [(c.passage, c.sentence_start, c.sentence_end) for c in citations("甲是3个。[1]乙是4个[2]。")]
    [(1, 0, 8), (2, 8, 16)]
    """
    ends = sentence_ends(answer)
    bounds, start = [], 0
    for end in ends:
        piece = answer[start:end]
        if bounds and not strip_markers(piece).strip():      # only markers (and spaces): the previous sentence's
            bounds[-1] = (bounds[-1][0], end)
        elif bounds and _citation_sentence(piece):            # 「…。根据已知信息编号 [1]。」: cites the one before
            bounds[-1] = (bounds[-1][0], end)
        elif bounds and _MARKER.match(piece.lstrip()):        # 「。[1]乙…」: the leading markers end the last sentence
            lead = len(piece) - len(piece.lstrip())
            m = re.match(r"(?:\s*(?:\[\d{1,2}\]|【\d{1,2}】))+", piece)
            cut = start + (m.end() if m else lead)
            bounds[-1] = (bounds[-1][0], cut)
            bounds.append((cut, end))
        else:
            bounds.append((start, end))
        start = end
    out = []
    for m in _MARKER.finditer(answer):
        n = int(m.group(1) or m.group(2))
        s, e = next(((s, e) for s, e in bounds if s <= m.start() < e), (0, len(answer)))
        out.append(Citation(m.start(), m.end(), n, s, e))
    return out


def _citation_sentence(piece: str) -> bool:
    """A sentence that carries markers and, without them, is a short source statement with no claim of its own,
    starting with a source word (根据, 来源, 参见, 见 …): 「根据已知信息编号 [1]。」 but not 「加班另算[2]。」."""
    if not _MARKER.search(piece):
        return False
    text = strip_markers(piece).strip()
    return len(text) <= CITATION_SENTENCE_CHARS and bool(_CITATION_CUE.search(text)) and not extract_claims(text)


def _sentences_with_markers(answer: str) -> list[tuple[str, list[int]]]:
    cites = citations(answer)
    spans = sorted({(c.sentence_start, c.sentence_end) for c in cites})
    out, pos = [], 0
    ends = sentence_ends(answer)
    # every sentence: those with markers use the citation bounds, the rest the plain sentence ends
    for end in ends:
        if end <= pos:
            continue
        span = next(((s, e) for s, e in spans if s <= pos < e), None)
        if span is not None:
            s, e = span
            out.append((answer[s:e], [c.passage for c in cites if c.sentence_start == s]))
            pos = e
        else:
            out.append((answer[pos:end], []))
            pos = end
    return out


def check_answer(answer: str, question: str, passages: Sequence[str], *, require_citations: bool = False,
                 require_quote: bool = False, min_relevance: float = MIN_RELEVANCE,
                 documents: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> GroundingResult:
    """Check `answer` against the `passages` the model was given (in prompt order: [1] is passages[0]).
    A 「原文：」 quote at the end (grounding.quote) is verified and then stands for the answer's source sentence.
    `documents`: the file each passage came from; the question's names must be written in the answer's passage or
    another passage of its file (without `documents`, in the answer's passage itself). `labels`: what the model was
    told about each passage besides its text (its file name and heading path, prompts.builder.hit_label): a name or
    key term there counts for the name and relevance rules (a handbook's chunks rarely repeat the company's name),
    not for the answer's numbers, dates and names."""
    answer, quote_text = split_quote(answer)
    if looks_like_refusal(answer) or not answer.strip():
        return GroundingResult("refusal", quoted=quote_text is not None)
    n = len(passages)
    failures: list[Failure] = []
    cites = citations(answer)
    for c in cites:
        if not 1 <= c.passage <= n:
            failures.append(Failure("citation", f"[{c.passage}]", f"引用[{c.passage}]不存在（只有 {n} 段资料）"))

    all_claims: list[Claim] = []
    support: dict[str, list[int]] = {}
    dated: set[str] = set()     # claims of an answer sentence that names its own date: the model says when
    for sentence, marks in _sentences_with_markers(answer):
        claims = extract_claims(sentence, ignore=question)
        if any(c.kind == "date" for c in claims):
            dated.update(c.key for c in claims)
        for claim in claims:
            if claim.key in support:
                continue
            where = [i + 1 for i, p in enumerate(passages) if supports(p, claim)]
            support[claim.key] = where
            all_claims.append(claim)
            if not where:
                what = {"number": "数字", "date": "日期", "entity": "名称"}[claim.kind]
                failures.append(Failure(claim.kind, claim.text, f"{what}「{claim.text}」在资料中没有出现"))
                continue
            valid = [m for m in marks if 1 <= m <= n]
            if valid and not set(valid) & set(where):
                failures.append(Failure("citation", claim.text, f"「{claim.text}」不在所引用的段落"
                                        f"{''.join(f'[{m}]' for m in valid)}中"))
        if require_citations and cites and claims and not marks:
            failures.append(Failure("uncited", strip_markers(sentence).strip()[:20],
                                    f"「{strip_markers(sentence).strip()[:20]}」没有标注出处"))

    wording = _own_wording(answer, question)
    if _ASKS.search(question) and not all_claims and set(_letters(answer)) <= set(_letters(question)):
        failures.append(Failure("empty", strip_markers(answer).strip()[:20],
                                "答案只是重复了问题，没有给出资料中的内容"))
    elif len(wording) >= WORDING_MIN_PAIRS and quote_text is None:
        written = set().union(*(char_bigrams(_letters(p)) for p in passages)) if passages else set()
        share = len(wording & written) / len(wording)
        if share < MIN_WORDING:
            failures.append(Failure("wording", strip_markers(answer).strip()[:20],
                                    f"答案的措辞大多不在资料中（只有 {share:.0%} 出自资料）"))

    quote = find_quote(quote_text, passages) if quote_text else None
    if quote_text and quote is None:
        failures.append(Failure("quote", quote_text[:20], f"答案引用的原文「{quote_text[:20]}」在资料中找不到"))
    elif quote is not None:
        copied = quote.text if is_cut(quote, passages) else quote.stretch   # a quote cut mid-clause: its sentence
        for claim in all_claims:
            if support.get(claim.key) and not supports(copied, claim):
                failures.append(Failure("quote", claim.text, f"「{claim.text}」不在答案引用的原文中"))
    elif require_quote and all_claims:
        failures.append(Failure("unquoted", strip_markers(answer).strip()[:20], "答案没有给出所依据的原文"))

    source = quote.passage if quote is not None else _source(answer, passages, cites, support)
    evidence: dict[int, str] = {}
    if source is not None:
        text = passages[source - 1]
        sentence = quote.text if quote is not None else best_sentence(text, answer, claims=all_claims)
        if sentence:
            evidence[source] = sentence
        def file_of(i: int) -> list[str]:      # passage i's text, the other given passages of its file, their labels
            group = ([j for j in range(n) if documents[j] == documents[i - 1]]
                     if documents is not None and len(documents) == n else [i - 1])
            extra = [labels[j] for j in group] if labels is not None and len(labels) == n else []
            return [passages[j] for j in group] + extra

        lost_in: dict[object, tuple[str, ...]] = {}

        def names_lost(i: int) -> tuple[str, ...]:    # the names passage i's file does not write, once a file
            key = documents[i - 1] if documents is not None and len(documents) == n else i
            if key not in lost_in:
                lost_in[key] = tuple(missing_names(question, file_of(i)))
            return lost_in[key]

        missing = names_lost(source)
        for name in missing:
            failures.append(Failure("name", name, f"问题中的「{name}」在答案所依据的资料（段落[{source}]所在的文件）中"
                                    "没有出现"))
        # every claim, not only the main source's: 「华为营收7042亿元，净利润300亿元」 may take its second figure
        # from a passage about another company
        for claim in all_claims:
            where = support.get(claim.key) or []
            lost = [set(names_lost(i)) - set(missing) for i in where]
            if where and all(lost):
                name = sorted(lost[0])[0]
                failures.append(Failure("name", claim.text, f"「{claim.text}」出自的段落[{where[0]}]所在的文件没有提到"
                                        f"问题中的「{name}」"))
        cons = question_constraints(question)
        for con in cons:
            if not meets(text, con):
                failures.append(Failure("constraint", con.text,
                                        f"问题中的「{con.text}」在答案所依据的段落[{source}]中没有出现"))
                continue
            if sum(c.kind == con.kind for c in cons) > 1 or is_range(question, con):
                continue                # 「1992年至1999年间」「2010年以来」: a span, the figure may be of any year
            for claim in all_claims:    # the year is there, but the answer's figure belongs to another one
                where = [] if claim.key in dated else support.get(claim.key) or []
                tied = [bound_elsewhere(passages[i - 1], claim, con) for i in where]
                if where and all(tied):
                    failures.append(Failure("constraint", claim.text, f"「{claim.text}」在资料中说的是{tied[0]}，"
                                            f"不是问题问的「{con.text}」"))
        terms = key_terms(question, exclude=[c.text for c in all_claims])
        # an answer without numbers/dates/names is checked too: its sentence is found by its wording
        # (「不同的分值代表着不同的人生类型和宇宙观」 from a sentence about something else: 0 of the key terms)
        if terms and sentence:
            cov = term_coverage(terms, text, sentence)
            if cov < min_relevance and documents is not None and len(documents) == n:
                # the passage leaves its subject implicit (「花为聚繖花序顶生…」 in the file about 黄蝉): a key term
                # written in another given passage of its file counts
                elsewhere = normalize("\n".join(p for p in file_of(source) if p != text))
                if elsewhere:
                    cov = max(cov, term_coverage(terms, text, sentence, also=elsewhere))
            if cov < min_relevance:
                failures.append(Failure("relevance", sentence[:30],
                                        f"答案所依据的句子与问题关系不大（问题的关键词只出现了 {cov:.0%}）"))
    status = "ungrounded" if failures else "grounded"
    return GroundingResult(status, tuple(failures), len(all_claims), source, tuple(cites), evidence, bool(cites),
                           quote, quote_text is not None)


def _source(answer: str, passages: Sequence[str], cites: Sequence[Citation],
            support: dict[str, list[int]]) -> int | None:
    if not passages:
        return None
    valid = [c.passage for c in cites if 1 <= c.passage <= len(passages)]
    if valid:
        return Counter(valid).most_common(1)[0][0]
    votes = Counter(i for where in support.values() for i in where)
    if votes:
        best = max(votes.values())
        return min(i for i, v in votes.items() if v == best)
    grams = char_bigrams(normalize(strip_markers(answer)))
    if not grams:
        return 1
    overlap = [len(grams & char_bigrams(normalize(p))) for p in passages]
    return overlap.index(max(overlap)) + 1


def _letters(text: str) -> str:
    return _alnum(strip_markers(text))


def _own_wording(answer: str, question: str) -> set[str]:
    """The answer's character pairs that are not the question's (what the answer adds), on letters and digits."""
    return char_bigrams(_letters(answer)) - char_bigrams(_letters(question))
