"""Why an answer was not given: one reason per refusal rule, a Chinese note for the page and the API, and the
numbers behind it. The API's `refusal_reason` values are the keys of REFUSAL_REASONS and stay stable.

    threshold_refusal(0.826, 0.86).message
    -> "检索拒答：最接近的段落与问题的相似度为 0.826，低于相关度阈值 0.86（retrieval.score_threshold），没有调用模型。"
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grounding import key_terms
from grounding.claims import normalize

# Why an answer was not given, as the API's `refusal_reason` (stable values) — one per rule:
REFUSAL_REASONS = {
    "score_threshold": "retrieval: no passage's dense similarity reached retrieval.score_threshold (LLM not called)",
    "key_term_coverage": "retrieval: no passage holds retrieval.min_key_term_coverage of the question's key words "
                         "(LLM not called)",
    "missing_name": "retrieval: a name the question asks about (person, organisation, product, 《title》) is "
                    "written in none of the passages (retrieval.require_names; LLM not called)",
    "model": "the model answered with the template's refusal sentence",
    "ungrounded": "the finished answer failed the grounding check (prompt.grounding_check)",
}
MODEL_REFUSAL_NOTE = "模型判断：提供给它的段落中没有答案。"


@dataclass(frozen=True)
class Refusal:
    """Which rule refused: `reason` (a key of REFUSAL_REASONS), `message` (the Chinese note shown on the page and
    sent by the API), `detail` (the numbers behind it, e.g. best_dense and threshold)."""

    reason: str
    message: str
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"refusal_reason": self.reason, "refusal_message": self.message, "refusal_detail": self.detail}


def threshold_refusal(best_dense: float | None, threshold: float) -> Refusal:
    if best_dense is None:
        return Refusal("score_threshold", "检索拒答：没有段落与问题相关，没有调用模型。",
                       {"best_dense": None, "threshold": threshold})
    shown = f"{best_dense:.3f}" if round(best_dense, 3) < threshold else f"{best_dense:.4f}"   # never "0.860 < 0.86"
    return Refusal("score_threshold",
                   f"检索拒答：最接近的段落与问题的相似度为 {shown}，低于相关度阈值 {threshold:g}"
                   "（retrieval.score_threshold），没有调用模型。",
                   {"best_dense": round(float(best_dense), 4), "threshold": threshold})


def coverage_refusal(question: str, texts: Sequence[str], required: float) -> Refusal:
    """`texts`: what the model would be told of each passage (its label and text)."""
    terms = key_terms(question)
    present = [[t for t in terms if t in normalize(text)] for text in texts]
    best = max(range(len(texts)), key=lambda i: (len(present[i]), -i))
    missing = [t for t in terms if t not in present[best]]
    coverage = len(present[best]) / len(terms) if terms else 1.0
    return Refusal("key_term_coverage",
                   f"检索拒答：找到的段落与主题相关，但没有一段写到问题的大部分关键词（最多 {len(present[best])}/"
                   f"{len(terms)} 个，缺少{'、'.join(f'「{t}」' for t in missing)}；要求至少 {required:.0%}，"
                   "retrieval.min_key_term_coverage），没有调用模型。",
                   {"key_terms": terms, "missing": missing, "coverage": round(coverage, 4), "required": required,
                    "passage": best + 1})


def names_refusal(names: Sequence[str]) -> Refusal:
    shown = "、".join(f"「{n}」" for n in names)
    return Refusal("missing_name",
                   f"检索拒答：找到的段落都没有提到问题中的{shown}，资料里没有关于它的内容（retrieval.require_names），"
                   "没有调用模型。", {"missing": list(names)})
