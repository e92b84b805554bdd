"""HTML for the page: source cards with highlighted sentences, job progress, status line.

Everything that came from a document or a person goes through html.escape: a document can never inject markup or
script into the page. Pure functions of plain data, so they are tested without a browser.
"""
from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from common.text import char_bigrams
from grounding import UNGROUNDED, best_sentence_index
from ingest.report import STATUS_NAMES as INGEST_STATUS_NAMES
from prompts import REFUSAL, is_refusal  # REFUSAL is re-exported for app.web
from retrieval.sentences import split_sentences
from retrieval.types import Hit

from .refusals import MODEL_REFUSAL_NOTE

# Clicking a citation marker [n] in an answer outlines source card [n] and scrolls to it (a delegated listener: the
# chat and the sources panel are re-rendered by Gradio, so nothing is bound to their elements).
CITATION_JS = """<script>
document.addEventListener("click", (e) => {
  const cite = e.target.closest && e.target.closest(".zw-cite");
  if (!cite) return;
  setTimeout(() => {
    // the chat's HTML sanitizer drops data attributes: the number is read from the marker's text "[n]"
    const n = cite.dataset.passage || (cite.textContent.match(/[0-9]+/) || [""])[0];
    document.querySelectorAll(".zw-hit").forEach((h) => h.classList.toggle("zw-cited", h.dataset.rank === n));
    const card = document.querySelector(`.zw-hit[data-rank="${n}"]`);
    if (card) card.scrollIntoView({behavior: "smooth", block: "nearest"});
  }, 300);
});
</script>"""
_MARKER = re.compile(r"\[(\d{1,2})\]")


def _alnum(text: str) -> str:
    """Lower-cased letters and digits only: what bigrams are compared on."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def supporting_sentences(passage: str, reference: str, top: int = 2) -> set[int]:
    """Indices of the passage's sentences a reader should check first: the one stating the answer's numbers, dates
    and names (grounding.best_sentence_index), then those sharing the most character bigrams with `reference` (the
    answer, or the question when there is no answer). Empty when nothing overlaps.

    >>> sorted(supporting_sentences("天气很好。上传文件请点击上传按钮。", "点击上传按钮"))
    [1]
    """
    first = best_sentence_index(split_sentences(passage), reference) if reference.strip() else None
    if first is None:
        return _bigram_sentences(passage, reference, top)
    rest = sorted(_bigram_sentences(passage, reference, top) - {first})
    return {first, *rest[: top - 1]}


def _bigram_sentences(passage: str, reference: str, top: int) -> set[int]:
    ref = char_bigrams(_alnum(reference))
    if not ref:
        return set()
    scored = []
    for i, s in enumerate(split_sentences(passage)):
        grams = char_bigrams(_alnum(s))
        shared = len(grams & ref)
        if shared:
            # shared bigrams, normalised a little by length so one long sentence does not always win
            scored.append((shared / (len(grams) ** 0.5), i))
    scored.sort(reverse=True)
    return {i for _, i in scored[:top]}


QUESTION_MARK_TITLE = "与问题意思最接近的句子"


def marked_sentences(passage: str, reference: str, top: int = 2, *, evidence: str = "", answer_only: bool = False,
                     closest: str = "") -> tuple[set[int], bool]:
    """(indexes of the passage's sentences to mark, whether they are marked as closest to the question): the rule
    of the page's highlight, also used for the API's `spans`. `evidence`: the sentence the grounding check found for
    the answer, marked alone; `answer_only`: `reference` is a checked answer, so only a sentence that supports it is
    marked, never one that merely shares a word; `closest`: no answer to go by, mark this sentence — the one closest
    in meaning to the question (app.highlight)."""
    sentences = split_sentences(passage)
    if evidence and evidence in sentences:
        return {sentences.index(evidence)}, False
    if closest and not answer_only:
        return ({sentences.index(closest)} if closest in sentences else set()), True
    if answer_only:
        best = best_sentence_index(sentences, reference)
        return (set() if best is None else {best}), False
    return supporting_sentences(passage, reference, top), False


def passage_spans(passage: str, reference: str, **how: Any) -> list[list[int]]:
    """[start, end) offsets in `passage` of the sentences marked_sentences marks (in text order).

    >>> passage_spans("天气很好。上传文件请点击上传按钮。", "点击上传按钮")
    [[5, 17]]
    """
    marks, _ = marked_sentences(passage, reference, **how)
    spans, pos = [], 0
    for i, s in enumerate(split_sentences(passage)):
        at = passage.find(s, pos)
        if at < 0:
            break                                   # the splitter normalised this sentence: no exact offsets
        pos = at + len(s)
        if i in marks:
            spans.append([at, pos])
    return spans


def highlighted_passage(passage: str, reference: str, top: int = 2, *, evidence: str = "",
                        answer_only: bool = False, closest: str = "") -> str:
    """The passage as escaped HTML with the sentences marked_sentences picks wrapped in <mark> (a sentence closest
    to the question, when there is no answer to go by, as <mark class="zw-q">)."""
    marks, question_mark = marked_sentences(passage, reference, top, evidence=evidence, answer_only=answer_only,
                                            closest=closest)

    def esc(text: str) -> str:
        return html.escape(text).replace("\n", "<br>")

    parts, pos, exact = [], 0, True
    for i, s in enumerate(split_sentences(passage)):
        at = passage.find(s, pos) if exact else -1
        if at < 0:  # the splitter normalised this sentence: from here on show sentences as they came
            exact = False
        else:
            parts.append(esc(passage[pos:at]))  # line breaks and spaces between sentences (list items, paragraphs)
            pos = at + len(s)
        if i not in marks:
            parts.append(esc(s))
        elif question_mark:
            parts.append(f'<mark class="zw-q" title="{QUESTION_MARK_TITLE}">{esc(s)}</mark>')
        else:
            parts.append(f"<mark>{esc(s)}</mark>")
    if exact:
        parts.append(esc(passage[pos:]))
    return "".join(parts)


def _how(rank: int, grounding: Any, closest: dict[int, str] | None) -> dict[str, Any]:
    """How passage `rank` of an answer's panel is highlighted (hits_html and hit_spans share it): given `closest`
    sentences win (the caller has no answer to go by: closest_for), else a checked answer's content decides."""
    checked = grounding is not None and grounding.status != "refusal" and not closest
    evidence = getattr(grounding, "evidence", None) or {}
    return {"evidence": evidence.get(rank, ""), "answer_only": checked,
            "closest": "" if checked or not closest else closest.get(rank, "")}


def hit_spans(hits: Sequence[Hit], reference: str, *, grounding: Any = None,
              closest: dict[int, str] | None = None) -> list[list[list[int]]]:
    """Per hit, the offsets of the sentences the page highlights with the same arguments (the API's `spans`)."""
    return [passage_spans(h.text, reference, **_how(rank, grounding, closest)) for rank, h in enumerate(hits, 1)]


def closest_for(stream: Any) -> dict[int, str] | None:
    """The question-closest sentences to highlight in a finished answer's panel — when there is no answer to go by:
    a refusal by retrieval or by the model, no text, or only [n] markers — else None (the answer's content decides).
    """
    refusal = getattr(stream, "refusal", None)
    # an answer of markers only (「[1] [2]」: the 0.5B demo model under the citing template) says nothing to go by
    says_nothing = not any(ch.isalnum() for ch in _MARKER.sub("", stream.text))
    if stream.refused or (refusal is not None and refusal.reason == "model") or says_nothing:
        return stream.question_evidence
    return None


def _where(hit: Hit) -> str:
    bits = [html.escape(hit.source)]
    if hit.page is not None:
        bits.append(f"第 {hit.page} 页")
    if hit.heading_path:
        bits.append(html.escape(" > ".join(hit.heading_path)))
    return " · ".join(bits)


def _scores(hit: Hit) -> str:
    s = [f"得分 {hit.score:.3f}"]
    if hit.dense_score is not None:
        s.append(f"相似度 {hit.dense_score:.3f}")
    if hit.bm25_score is not None:
        s.append(f"BM25 {hit.bm25_score:.2f}")
    return " · ".join(s)


def hits_html(hits: Sequence[Hit], reference: str, *, title: str, note: str = "", weak: bool = False,
              grounding: Any = None, closest: dict[int, str] | None = None, state: str = "done",
              reason: str = "") -> str:
    """Cards for ranked hits: where (file, page, heading), scores, passage with highlighted sentences. `grounding`
    (the answer's grounding.GroundingResult) marks the passages it cites and the sentence that supports the answer;
    without an answer to go by, `closest` ({rank: sentence}, app.highlight) marks each passage's sentence closest
    to the question. `state` ("streaming" while the answer is written, else "done") and `reason` (the refusal's
    reason, AnswerStream.refusal) are data attributes for scripts and tests."""
    cited = {c.passage for c in getattr(grounding, "citations", ())}
    closest = closest or {}
    cls = "zw-sources zw-weak" if weak else "zw-sources"
    attrs = f' data-state="{html.escape(state)}"' + (f' data-reason="{html.escape(reason)}"' if reason else "")
    out = [f'<div class="{cls}"{attrs}><div class="zw-sources-title">{html.escape(title)}</div>']
    if note:
        out.append(f'<div class="zw-note">{html.escape(note)}</div>')
    if closest and hits:
        out.append(f'<div class="zw-note zw-legend"><mark class="zw-q">高亮</mark>：每段中{QUESTION_MARK_TITLE}'
                   "（还没有答案可以对照）。</div>")
    if not hits:
        out.append('<div class="zw-empty">没有找到相关段落。</div>')
    for rank, hit in enumerate(hits, 1):
        cls = "zw-hit zw-cited" if rank in cited else "zw-hit"
        marked = highlighted_passage(hit.text, reference, **_how(rank, grounding, closest))
        out.append(
            f'<div class="{cls}" id="zw-src-{rank}" data-rank="{rank}"><div class="zw-hit-head">'
            f'<span class="zw-rank">[{rank}]</span> {_where(hit)}'
            f'<span class="zw-score">{_scores(hit)}</span></div>'
            f'<div class="zw-passage">{marked}'
            '</div></div>'
        )
    out.append("</div>")
    return "".join(out)


def _linked_markers(body: str, passages: int | None = None) -> str:
    """[n] in escaped answer text → a clickable marker that outlines source card [n] (CITATION_JS); with
    `passages` known, a marker naming no passage is shown struck through instead of as a link."""
    def one(m: re.Match) -> str:
        n = m.group(1)
        if passages is not None and not 1 <= int(n) <= passages:
            return f'<span class="zw-cite-bad" title="资料中没有第 {n} 段（只有 {passages} 段）">[{n}]</span>'
        return (f'<span class="zw-cite" data-passage="{n}" role="link" tabindex="0" '
                f'title="查看来源 [{n}]">[{n}]</span>')
    return _MARKER.sub(one, body)


def _esc(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _cited_body(text: str, report: Any) -> str:
    """The answer with each sentence that has no [n] (grounding.compliance) in a subtly underlined span."""
    parts, pos = [], 0
    for start, end in report.uncited:
        parts.append(_linked_markers(_esc(text[pos:start]), report.passages))
        parts.append(f'<span class="zw-uncited" title="这句话没有标注出处">'
                     f"{_linked_markers(_esc(text[start:end]), report.passages)}</span>")
        pos = end
    parts.append(_linked_markers(_esc(text[pos:]), report.passages))
    return "".join(parts)


def reason_note(reason: str, message: str, hint: str = "") -> str:
    """The one note that says which rule refused: class zw-reason-<AnswerStream.refusal.reason> (a class, not a data
    attribute: the chat's HTML sanitizer keeps classes only)."""
    return (f'<div class="zw-note zw-after zw-reason zw-reason-{html.escape(reason)}">{html.escape(message)}'
            f"{html.escape(hint)}</div>")


def answer_markdown(text: str, *, refused: bool = False, error: str = "", stopped: bool = False,
                    grounding: Any = None, refusal: Any = None, citations: Any = None) -> str:
    """Chat bubble content. The answer is escaped (the model may repeat markup from a document); a refusal and an
    error get their own styles so nobody mistakes them for an answer, and an answer cut off with 停止 says so.
    `refusal` (AnswerStream.refusal) adds the note saying which rule refused. An answer that failed the grounding
    check (`grounding.ok` False) is shown as 「资料中没有找到可靠依据」 with the parts that failed; the model's text
    stays folded underneath, marked as unverified. `citations` (grounding.compliance.CitationReport, citing
    template only) underlines sentences without [n] and strikes out markers that name no passage."""
    body = _esc(text)
    if grounding is not None and not grounding.ok and not error:
        failed = "".join(f"<li>{html.escape(f.message)}</li>" for f in grounding.failures)
        return (f'<div class="zw-refusal zw-ungrounded">⊘ {UNGROUNDED}'
                f'<div class="zw-note zw-after zw-reason zw-reason-ungrounded">核对未通过（依据见右侧段落）：'
                f"<ul>{failed}</ul></div>"
                f'<details><summary>模型的原始回答（未经核实，请勿当作事实）</summary>{body}</details></div>')
    if citations is not None and not error:
        body = _cited_body(text, citations)
    else:
        body = _linked_markers(body)
    if error:
        return f'<div class="zw-error">⚠ {html.escape(error)}</div>' + (f"<div>{body}</div>" if text else "")
    if refused:
        note = reason_note(refusal.reason, refusal.message, "右侧是最接近的段落，高亮的是与问题意思最接近的句子。") \
            if refusal is not None else ""
        return f'<div class="zw-refusal">⊘ {body or html.escape(REFUSAL)}{note}</div>'
    if (refusal is not None and refusal.reason == "model") or (refusal is None and is_refusal(text)):
        # the model itself found no answer in the passages it was given
        return (f'<div class="zw-refusal zw-model-refusal">⊘ {body}'
                + reason_note("model", MODEL_REFUSAL_NOTE, "（段落见右侧，高亮的是与问题意思最接近的句子）") + "</div>")
    if stopped:
        return body + '<div class="zw-stopped">■ 已停止生成</div>'
    if citations is not None and not citations.ok:
        body += (f'<div class="zw-cite-note" title="提示词要求每句话标注出处">引用提示：'
                 f"{html.escape(citations.summary())}</div>")
    return body


def job_html(job: Any | None) -> str:
    """Progress of an ingestion job (app.jobs.Job) with its per-file results."""
    if job is None:
        return '<div class="zw-job zw-idle">暂无导入任务。</div>'
    state = {"queued": "排队中", "running": "进行中", "done": "已完成", "failed": "失败"}.get(job.state, job.state)
    pct = ""
    if job.total:
        pct = f"（{job.done}/{job.total}）"
    out = [(f'<div class="zw-job zw-{job.state}" data-job-id="{html.escape(job.id)}" data-state="{job.state}">'
            f'<b>导入任务 {html.escape(job.id)}</b>：{state}{pct} — {html.escape(job.message)}')]
    if job.total and job.active:
        out.append(f'<progress max="{job.total}" value="{job.done}"></progress>')
    if job.error:
        out.append(f'<div class="zw-error">{html.escape(job.error)}</div>')
    if job.files:
        out.append("<table><tr><th>文件</th><th>状态</th><th>段落数</th><th>原因</th></tr>")
        for f in job.files:
            out.append(f'<tr class="zw-status-{html.escape(f.status)}"><td>{html.escape(f.name)}</td>'
                       f"<td>{html.escape(STATUS_NAMES.get(f.status, f.status))}</td><td>{f.chunks}</td>"
                       f"<td>{html.escape(f.reason)}</td></tr>")
        out.append("</table>")
    out.append("</div>")
    return "".join(out)


# The ingest report's words (the CLI shows the same), plus the upload layer's own: refused before ingest.
STATUS_NAMES = {**INGEST_STATUS_NAMES, "rejected": "已拒绝"}


def human_size(n: int) -> str:
    """human_size(2048) -> "2.0 KB"."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def escape_user(text: str) -> str:
    """What a person typed, shown in a chat bubble as text (never as markup)."""
    return html.escape(text).replace("\n", "<br>")
