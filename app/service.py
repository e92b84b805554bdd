"""The QA service shared by the Gradio page, the HTTP API and the terminal chat.

    service = QAService(settings)                 # stores settings; models load on first use (or warm_up())
    stream = service.answer("生命数耗完即算为什么？", "default", history=[], params=AnswerParams(top_k=3))
    for piece in stream: print(piece, end="")
    stream.sources        # the hits the answer was built from (file, page, heading path, score, text)
    stream.refused        # True: no passage reached the threshold, the LLM was not called, the text is REFUSAL
    stream.low_relevance  # then: the closest passages, to show (never to answer from)
    stream.error          # "" or a sentence, when generation failed part-way (the text so far is kept)
    stream.grounding      # after the last piece: grounding.GroundingResult (ok, failures, citations, evidence)
    stream.ungrounded     # True: the answer states what its passages do not; show 「资料中没有找到可靠依据」
    stream.refusal        # None, or Refusal(reason, message, detail): which rule refused (REFUSAL_REASONS)
    stream.question_evidence   # {passage number: its sentence closest to the question} (before/without an answer)
    stream.citation_report     # citing template only, after the last piece: uncited sentences, invalid [n]
    stream.second_pass    # None, or {"first", "passage", "context"}: the model refused although a passage seemed to
                          # hold the answer, and a stricter extraction (prompt.second_pass) answered instead

The data path: question → HybridSearcher (evidence threshold) → build_prompt (token budget) → ChatModel.stream.
Request problems (unknown knowledge base, empty or too long question, bad parameter, empty knowledge base) raise
QAError right away, with a Chinese sentence; failures while generating end the stream and land in `.error`.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from configs import Settings
from grounding import GroundingResult, check_answer, key_term_coverage, missing_names, template_checks
from grounding.compliance import CitationReport, citation_report
from grounding.retry import refusal_gate, second_pass_context
from llm import ChatModel, GenerationParams, LLMError, load_llm
from prompts import REFUSAL, build_prompt_from_settings, is_refusal, load_template
from prompts.builder import PromptBudgetError, hit_label
from retrieval.retriever import HybridSearcher, SearchResult
from retrieval.store import KBError, KBNameError, KBNotFoundError, KnowledgeBase, list_knowledge_bases
from retrieval.types import Hit

from .highlight import QuestionHighlighter
from .refusals import MODEL_REFUSAL_NOTE, Refusal, coverage_refusal, names_refusal, threshold_refusal

log = logging.getLogger(__name__)


class QAError(ValueError):
    """A request the service cannot serve; `.reason` (and str()) is the sentence (Chinese) to show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownKBError(QAError):
    """The knowledge base named in the request does not exist (the API answers 404)."""


class QuestionTooLongError(QAError):
    """The question is longer than app.max_question_chars (the API answers 413)."""


@dataclass(frozen=True)
class AnswerParams:
    """Per-question knobs, built once by each face (page, API, CLI) and passed down unchanged.

    None means "the setting's value", filled in where the setting is used (retrieval.top_k and
    retrieval.score_threshold by the searcher, llm.* by GenerationParams, prompt.history_turns by the prompt builder).
    The values are checked here, once, for every face: AnswerParams(top_k=0) raises QAError("top_k 必须大于 0，收到 0").
    """

    top_k: int | None = None               # retrieval.top_k
    threshold: float | None = None         # retrieval.score_threshold
    temperature: float | None = None       # llm.temperature (0 = greedy)
    top_p: float | None = None             # llm.top_p
    max_new_tokens: int | None = None      # llm.max_new_tokens (at most llm.max_context_tokens; the service checks)
    history_turns: int | None = None       # prompt.history_turns

    def __post_init__(self) -> None:
        for name, kind, ok, rule in (
            ("top_k", int, lambda v: v > 0, "大于 0 的整数"),
            ("max_new_tokens", int, lambda v: v > 0, "大于 0 的整数"),
            ("history_turns", int, lambda v: v >= 0, "不小于 0 的整数"),
            ("temperature", float, lambda v: math.isfinite(v) and v >= 0, "不小于 0 的数"),
            ("threshold", float, lambda v: math.isfinite(v) and -1 <= v <= 1, "-1 到 1 之间的数"),
            ("top_p", float, lambda v: math.isfinite(v) and 0 < v <= 1, "大于 0、不大于 1 的数"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            typed = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not typed or not ok(value):
                raise QAError(f"参数 {name} 必须是{rule}，收到 {value!r}")


class AnswerStream:
    """Iterate for the answer's text pieces. Retrieval is done when this object exists; iterating runs the LLM."""

    def __init__(self, pieces: Iterable[str], *, sources: list[Hit], refused: bool, low_relevance: list[Hit],
                 prompt_tokens: int = 0, dropped: list[Hit] | None = None,
                 check: Callable[[str], GroundingResult | None] | None = None,
                 retry: Callable[[str], tuple[Iterable[str], dict] | None] | None = None,
                 refusal: Refusal | None = None, highlight: Callable[[], dict[int, str]] | None = None,
                 cites: bool = False):
        self._pieces = pieces
        self._check = check                   # the grounding check, run once the whole answer is there
        self._retry = retry                   # the second pass after a likely false refusal (grounding.retry)
        self.second_pass: dict | None = None
        self._retrieval_refusal = refusal     # set when retrieval refused (the LLM is not called)
        self._highlight = highlight
        self._question_evidence: dict[int, str] | None = None
        self.cites = cites                    # the template asks for [n] citations
        self.citation_report: CitationReport | None = None
        self.grounding: GroundingResult | None = None
        self.sources = sources
        self.refused = refused
        self.low_relevance = low_relevance
        self.dropped = dropped or []          # evidence that did not fit the prompt budget
        self.prompt_tokens = prompt_tokens
        self.error = ""
        self.text = ""                        # everything yielded so far
        self.done = False

    def __iter__(self) -> Iterator[str]:
        pieces = self._pieces if self._retry is None else refusal_gate(self._pieces, self._run_retry)
        try:
            for piece in pieces:
                self.text += piece
                yield piece
            if self._check is not None and self.text:
                self.grounding = self._check(self.text)
            if self.cites and self.text and not self.refused:
                self.citation_report = citation_report(self.text, len(self.sources))
        except LLMError as e:                 # OOM, server down, context overflow: a sentence, partial text kept
            log.warning("generation failed: %s", e)
            self.error = str(e)
        finally:
            self.done = True
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()                       # a consumer that stops early stops the generation too

    def _run_retry(self, first: str) -> Iterable[str] | None:
        got = self._retry(first) if self._retry is not None else None
        if got is None:
            return None
        second, info = got
        self.second_pass = {"first": first, **info}
        return second

    @property
    def ungrounded(self) -> bool:
        """True when the finished answer failed the grounding check: show 「资料中没有找到可靠依据」, not the answer."""
        return self.grounding is not None and not self.grounding.ok

    @property
    def model_refused(self) -> bool:
        """The model read the passages and answered with a refusal sentence (once the stream is done)."""
        if self.refused or self.error or not self.done or not self.text.strip():
            return False
        if self.grounding is not None:
            return self.grounding.status == "refusal"
        return is_refusal(self.text)

    @property
    def refusal(self) -> Refusal | None:
        """Which rule refused (None while an answer stands): retrieval's rules at once, the model's refusal and the
        grounding check once the stream is done."""
        if self._retrieval_refusal is not None:
            return self._retrieval_refusal
        if self.ungrounded:
            return Refusal("ungrounded", self.grounding.summary(),
                           {"failures": [f.kind for f in self.grounding.failures]})
        if self.model_refused:
            return Refusal("model", MODEL_REFUSAL_NOTE, {})
        return None

    @property
    def question_evidence(self) -> dict[int, str]:
        """{passage number (1-based, in the order shown: `low_relevance` when refused, else `sources`): the sentence
        closest in meaning to the question} — what to highlight before an answer exists and for a refusal."""
        if self._question_evidence is None:
            self._question_evidence = self._highlight() if self._highlight is not None else {}
        return self._question_evidence


class QAService:
    """Holds one ChatModel and one Embedder; opens knowledge bases lazily and reopens them when they change."""

    def __init__(self, settings: Settings, *, llm: ChatModel | None = None, embedder: Any | None = None):
        self.settings = settings
        self._llm = llm
        self._embedder = embedder
        self._searcher: HybridSearcher | None = None
        self._highlight: QuestionHighlighter | None = None
        self._kbs: dict[str, KnowledgeBase] = {}
        self._lock = threading.RLock()
        self._template = load_template(settings.prompt.template)   # a bad template fails at start, not mid-chat
        self._extract_template = load_template("extract_answer")     # prompt.second_pass's stricter extraction

    # --- components (lazy, thread-safe) ---------------------------------------------------------------------------
    @property
    def llm(self) -> ChatModel:
        if self._llm is None:
            with self._lock:
                if self._llm is None:
                    self._llm = load_llm(self.settings)
                    if self._llm.info.notice:
                        log.warning("%s", self._llm.info.notice)
        return self._llm

    @property
    def info(self) -> Any:
        """The loaded model's ModelInfo (name, device, quantization, is_demo, notice)."""
        return self.llm.info

    @property
    def searcher(self) -> HybridSearcher:
        if self._searcher is None:
            with self._lock:
                if self._searcher is None:
                    self._searcher = HybridSearcher.from_settings(self.settings, self._embedder)
                    self._embedder = self._searcher.embedder
        return self._searcher

    def warm_up(self) -> None:
        """Load the LLM and the embedding model now, so the first question does not wait for them."""
        _ = self.llm
        embedder = self.searcher.embedder
        if embedder is not None and hasattr(embedder, "warm_up"):
            embedder.warm_up()

    def knowledge_base(self, name: str) -> KnowledgeBase:
        """The opened KB `name`, reopened when ingestion has committed a new generation since."""
        if not name:
            raise QAError("没有选择知识库：请选择一个知识库，或用 `python ingest.py 文件夹 --kb 名称` 新建一个。")
        with self._lock:
            kb = self._kbs.get(name)
            if kb is None or kb.is_stale():
                try:
                    kb = KnowledgeBase.open(name, self.settings)
                except KBNameError as e:
                    raise QAError(str(e)) from None
                except KBNotFoundError:
                    self._kbs.pop(name, None)
                    known = list_knowledge_bases(self.settings)
                    have = f"现有的知识库：{'、'.join(known)}" if known else "目前还没有任何知识库"
                    raise UnknownKBError(f"知识库「{name}」不存在（{have}）；请用 "
                                         f"`python ingest.py 文件夹 --kb {name}` 新建，"
                                         "或在页面上新建后上传文件。") from None
                except KBError as e:
                    raise QAError(f"知识库「{name}」无法打开：{e}") from None
                self._kbs[name] = kb
            return kb

    def check_question(self, question: str) -> str:
        """The question, stripped, or QAError: empty, longer than app.max_question_chars, or not valid Unicode text."""
        if not isinstance(question, str) or not question.strip():
            raise QAError("问题为空：请输入问题。")
        question = question.strip()
        limit = self.settings.app.max_question_chars
        if len(question) > limit:
            raise QuestionTooLongError(f"问题太长：{len(question)} 个字符，上限 {limit}"
                                       "（配置项 app.max_question_chars）。请缩短问题，只保留要问的内容。")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as \ud800 from a JSON body
            raise QAError("问题中含有无效的字符（不成对的 UTF-16 代理项），请重新输入。") from None
        return question

    # --- the two calls -------------------------------------------------------------------------------------------
    def search(self, question: str, kb_name: str, params: AnswerParams | None = None) -> SearchResult:
        """Retrieval only (the retrieval-test tab): evidence hits, or the closest low-relevance passages."""
        p = params or AnswerParams()
        question = self.check_question(question)
        kb = self.knowledge_base(kb_name)
        if not kb.chunks:
            raise QAError(f"知识库「{kb_name}」还没有可检索的内容：请先上传或导入文件（导入失败的文件见文件列表）。")
        try:
            return self.searcher.search(kb, question, k=p.top_k, threshold=p.threshold)
        except ValueError as e:
            raise QAError(str(e)) from None

    def answer(self, question: str, kb_name: str, history: Sequence[Any] | None = None,
               params: AnswerParams | None = None, *, stop_event: threading.Event | None = None) -> AnswerStream:
        """Answer `question` from KB `kb_name`. `history`: earlier (question, answer) pairs or chat messages.

        Every check, the retrieval and the prompt happen here (a bad request raises QAError before any text);
        iterating the returned stream runs the LLM. No evidence above the threshold → the LLM is not called: the
        stream yields REFUSAL and offers the closest passages as `.low_relevance`. Setting `stop_event` ends the
        generation at the next token.
        """
        p = params or AnswerParams()
        limit = self.settings.llm.max_context_tokens
        if p.max_new_tokens is not None and p.max_new_tokens >= limit:
            raise QAError(f"参数 max_new_tokens 为 {p.max_new_tokens}，必须小于模型的上下文长度 {limit}"
                          "（配置项 llm.max_context_tokens）。")
        result = self.search(question, kb_name, p)
        question = question.strip()
        refused = self._retrieval_refusal(question, result, p)
        if refused is not None:
            return refused

        llm = self.llm
        gen = GenerationParams.from_settings(self.settings.llm, temperature=p.temperature,
                                             max_new_tokens=p.max_new_tokens, top_p=p.top_p)
        try:
            built = build_prompt_from_settings(
                question.strip(), result.hits, history or [], self.settings, llm.count_tokens,
                template=self._template, history_turns=p.history_turns, max_new_tokens=gen.max_new_tokens,
                max_context_tokens=llm.info.max_context_tokens,
                context_tokens=llm.info.context_budget(self.settings.prompt.context_tokens),   # llm.cpu_context_tokens
            )
        except PromptBudgetError as e:
            raise QAError(str(e)) from None
        log.info("answering from %d passages (%d dropped for the budget), prompt %d tokens",
                 len(built.used_hits), len(built.dropped_hits), built.prompt_tokens)
        return AnswerStream(_lazy_stream(llm, built.messages, gen, stop_event), sources=built.used_hits,
                            refused=False, low_relevance=[], prompt_tokens=built.prompt_tokens,
                            dropped=built.dropped_hits, check=self._grounding_check(question, built.used_hits,
                                                                                     stop_event),
                            highlight=self._highlighter(question, built.used_hits), cites=self.cites,
                            retry=(lambda _first: self.second_pass(question, built.used_hits, gen, stop_event))
                            if self.settings.prompt.second_pass else None)

    def refusal_before_llm(self, question: str, kb_name: str, params: AnswerParams | None = None,
                           ) -> AnswerStream | None:
        """The refusal stream `answer` would return without calling the LLM (retrieval threshold, key-term coverage,
        the question's names), else None. Never loads the model: the evaluation uses it to re-decide cached answers
        under the current rules."""
        p = params or AnswerParams()
        return self._retrieval_refusal(question.strip(), self.search(question, kb_name, p), p)

    def _retrieval_refusal(self, question: str, result: Any, p: AnswerParams) -> AnswerStream | None:
        def refuse(closest: list[Hit], refusal: Refusal) -> AnswerStream:
            return AnswerStream([REFUSAL], sources=[], refused=True, low_relevance=closest, refusal=refusal,
                                highlight=self._highlighter(question, closest))

        if not result.evidence:
            threshold = self.settings.retrieval.score_threshold if p.threshold is None else p.threshold
            return refuse(result.low_relevance, threshold_refusal(result.best_dense, threshold))
        # each passage as the model is told it, its file name and headings included (「[1] 来源：星河科技员工手册.docx
        # · 第三章 > 年假」): a handbook's chunks rarely repeat the company's name or the section's subject
        seen = [f"{hit_label(i, h)}\n{h.text}" for i, h in enumerate(result.hits, 1)]
        coverage = max(key_term_coverage(question, text) for text in seen)
        required = self.settings.retrieval.min_key_term_coverage
        if coverage < required:
            # the passages are about the topic but not about what is asked (a near miss): no LLM call either
            log.info("refused: no passage holds %.0f%% of the question's key terms", 100 * coverage)
            return refuse(result.hits, coverage_refusal(question, seen, required))
        names = missing_names(question, seen) if self.settings.retrieval.require_names else []
        if names:
            # the passages are about someone/something else (another company's figures): no LLM call
            log.info("refused: the question's names %s are in none of the passages", names)
            return refuse(result.hits, names_refusal(names))
        return None

    @property
    def cites(self) -> bool:
        """The prompt template asks the model to cite passages as [1], [2] (grounding.template_checks)."""
        return template_checks(self._template)["require_citations"]

    @property
    def highlighter(self) -> QuestionHighlighter:
        if self._highlight is None:
            with self._lock:
                if self._highlight is None:
                    self._highlight = QuestionHighlighter(self.searcher.embedder)
        return self._highlight

    def _highlighter(self, question: str, hits: Sequence[Hit]) -> Callable[[], dict[int, str]]:
        """The closest-sentence computation for `hits`, run when first asked for (the page asks at once, to
        highlight while the answer streams; an API client only pays for it when the done line is built)."""
        texts = [h.text for h in hits]

        def closest() -> dict[int, str]:
            try:
                return self.highlighter.closest(question, texts)
            except Exception:       # noqa: BLE001 - a highlight is a convenience: never fail an answer for it
                log.exception("question highlight failed")
                return {}
        return closest

    def second_pass(self, question: str, hits: Sequence[Hit], params: GenerationParams | None = None,
                    stop_event: threading.Event | None = None) -> tuple[Iterator[str], dict] | None:
        """The stricter extraction after a model refusal (prompt.second_pass): when the first passage holds a sentence
        that scores as an answer (grounding.retry.second_pass_context), ask again greedily with only that sentence and
        its neighbours as the 「已知信息」 (template extract_answer). Returns (pieces, info) or None."""
        found = second_pass_context(question.strip(), [h.text for h in hits],
                                    top=self.settings.prompt.second_pass_passages,
                                    closest=lambda q, passage: self.highlighter.closest(q, [passage]).get(1))
        if found is None:
            return None
        n, context = found
        llm = self.llm
        gen = (params or GenerationParams.from_settings(self.settings.llm)).merged(temperature=0)
        built = build_prompt_from_settings(question.strip(), [replace(hits[n - 1], text=context)], [], self.settings,
                                           llm.count_tokens, template=self._extract_template, history_turns=0,
                                           max_new_tokens=gen.max_new_tokens,
                                           max_context_tokens=llm.info.max_context_tokens)
        log.info("the model refused while passage [%d] seems to hold the answer: second pass", n)
        return _lazy_stream(llm, built.messages, gen, stop_event), {"passage": n, "context": context}

    def _grounding_check(self, question: str, hits: Sequence[Hit], stop_event: threading.Event | None,
                         ) -> Callable[[str], GroundingResult | None] | None:
        """grounding.check_answer over the passages the model was given (prompt.grounding_check); a stopped answer
        is not checked (it is marked 已停止生成 instead)."""
        if not self.settings.prompt.grounding_check:
            return None
        texts, files = [h.text for h in hits], [h.source for h in hits]
        labels = [hit_label(i, h) for i, h in enumerate(hits, 1)]
        asks = template_checks(self._template)     # citations / a 「原文：」 quote, when the template asks for them

        def check(text: str) -> GroundingResult | None:
            if stop_event is not None and stop_event.is_set():
                return None
            return check_answer(text, question.strip(), texts, documents=files, labels=labels, **asks)
        return check


def _lazy_stream(llm: ChatModel, messages: list[dict[str, str]], params: GenerationParams,
                 stop_event: threading.Event | None) -> Iterator[str]:
    """Start the generation on the first next(), not when answer() returns (the caller may hold a queue slot)."""
    yield from llm.stream(messages, params, stop_event=stop_event)
