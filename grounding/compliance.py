"""Citation compliance of an answer written under a template that asks for `[n]` after every sentence: which
sentences carry no marker, and which markers name a passage that was not given.

    report = citation_report("年假十五天[1]。申请要提前三天。见[7]。", passages=2)
    report.uncited   -> ((9, 17),)               # 「申请要提前三天。」 has no marker
    report.invalid   -> (Citation(start=18, …, passage=7, …),)

Unlike grounding.check's `uncited` failure (a sentence with a claim and no marker, counted only once the model
cites somewhere), this counts every sentence that states something, so the page and the API can show how well a
model follows the citing template (`uncited_sentences`, `invalid_citations`). Refusal sentences need no marker.
Written by the app side for issue 14 (page/API); the sentence rule is grounding.check.citations'.
"""
from __future__ import annotations

from dataclasses import dataclass

from grounding.check import Citation, citations, looks_like_refusal
from grounding.claims import strip_markers
from retrieval.sentences import sentence_ends

# A piece with fewer letters/digits than this (「如下：」, a lone bullet) is not a sentence that needs a source.
MIN_CHARS = 4


@dataclass(frozen=True)
class CitationReport:
    sentences: int                            # sentences that state something (need a marker)
    uncited: tuple[tuple[int, int], ...]      # [start, end) of those without any marker
    invalid: tuple[Citation, ...]             # markers naming no passage (n outside 1..passages)
    passages: int

    @property
    def ok(self) -> bool:
        return not self.uncited and not self.invalid

    def summary(self) -> str:
        """「2 句没有标注出处；引用 [7] 不存在（只有 5 段资料）」, "" when every sentence is cited correctly."""
        parts = []
        if self.uncited:
            parts.append(f"{len(self.uncited)} 句没有标注出处")
        if self.invalid:
            marks = "".join(dict.fromkeys(f"[{c.passage}]" for c in self.invalid))
            parts.append(f"引用 {marks} 不存在（只有 {self.passages} 段资料）")
        return "；".join(parts)

    def to_dict(self, answer: str) -> dict:
        """The API's form: counts, then each uncited sentence and invalid marker with its offsets in `answer`."""
        return {"sentences": self.sentences, "cited_sentences": self.sentences - len(self.uncited),
                "uncited_sentences": [{"start": s, "end": e, "text": strip_markers(answer[s:e]).strip()}
                                      for s, e in self.uncited],
                "invalid_citations": [{"start": c.start, "end": c.end, "passage": c.passage} for c in self.invalid],
                "summary": self.summary()}


def sentence_spans(answer: str) -> list[tuple[int, int, bool]]:
    """(start, end, has a marker) of each sentence, markers right after a full stop belonging to the sentence they
    follow (the rule of grounding.check.citations)."""
    cites = citations(answer)
    cited = sorted({(c.sentence_start, c.sentence_end) for c in cites})
    out: list[tuple[int, int, bool]] = []
    pos = 0
    for end in sentence_ends(answer):
        if end <= pos:
            continue
        span = next(((s, e) for s, e in cited if s <= pos < e), None)
        if span is not None:
            out.append((pos, span[1], True))
            pos = span[1]
        else:
            # a sentence that ends inside a cited span's start (markers split off) stops where that span begins
            nxt = next((s for s, _ in cited if pos < s < end), end)
            out.append((pos, nxt, False))
            pos = nxt
    return out


def citation_report(answer: str, passages: int) -> CitationReport:
    """Check `answer` against a citing template's rule, with `passages` passages given to the model."""
    invalid = tuple(c for c in citations(answer) if not 1 <= c.passage <= passages)
    need, uncited = 0, []
    for s, e, marked in sentence_spans(answer):
        piece = strip_markers(answer[s:e])
        if sum(ch.isalnum() for ch in piece) < MIN_CHARS or looks_like_refusal(piece):
            continue
        need += 1
        if not marked:
            lead = len(answer[s:e]) - len(answer[s:e].lstrip())
            uncited.append((s + lead, e))
    return CitationReport(need, tuple(uncited), invalid, passages)
