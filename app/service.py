"""The QA service shared by the Gradio page, the HTTP API and the terminal chat.

    service = QAService(settings)                 # stores settings; models load on first use (or warm_up())
    stream = service.answer("生命数耗完即算为什么？", "default", history=[], params={"top_k": 3})
    for piece in stream: print(piece, end="")
    stream.sources        # the hits the answer was built from (file, page, heading path, score, text)
    stream.refused        # True: no passage reached the threshold, the LLM was not called, the text is REFUSAL
    stream.low_relevance  # then: the closest passages, to show (never to answer from)
    stream.error          # "" or a sentence, when generation failed part-way (the text so far is kept)
    stream.grounding      # after the last piece: grounding.GroundingResult (ok, failures, citations, evidence)
    stream.ungrounded     # True: the answer states what its passages do not; show 「资料中没有找到可靠依据」

The data path: question → HybridSearcher (evidence threshold) → build_prompt (token budget) → ChatModel.stream.
Request problems (unknown knowledge base, empty question, bad parameter) raise QAError right away; failures while
generating end the stream and land in `.error`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from configs import Settings
from grounding import GroundingResult, check_answer
from llm import ChatModel, GenerationParams, LLMError, load_llm
from prompts import REFUSAL, build_prompt, load_template
from prompts.builder import PromptBudgetError
from retrieval.retriever import HybridSearcher, SearchResult
from retrieval.store import KBError, KBNotFoundError, KnowledgeBase, list_knowledge_bases
from retrieval.types import Hit

log = logging.getLogger(__name__)


class QAError(ValueError):
    """A request the service cannot serve; `.reason` (and str()) is the sentence to show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AnswerParams:
    """Per-question knobs from the page/API/CLI; None means "the setting's value"."""

    top_k: int | None = None               # retrieval.top_k
    threshold: float | None = None         # retrieval.score_threshold
    temperature: float | None = None       # llm.temperature (0 = greedy)
    max_new_tokens: int | None = None      # llm.max_new_tokens
    history_turns: int | None = None       # prompt.history_turns

    @classmethod
    def of(cls, params: AnswerParams | Mapping[str, Any] | None) -> AnswerParams:
        if params is None:
            return cls()
        if isinstance(params, AnswerParams):
            return params
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise QAError(f"unknown answer parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        p = cls(**params)
        for name, value, ok in (("top_k", p.top_k, lambda v: v > 0), ("max_new_tokens", p.max_new_tokens,
                                lambda v: v > 0), ("history_turns", p.history_turns, lambda v: v >= 0),
                                ("temperature", p.temperature, lambda v: v >= 0)):
            if value is not None and not ok(value):
                raise QAError(f"{name} must be {'>= 0' if name in ('history_turns', 'temperature') else '> 0'}, "
                              f"got {value}")
        return p


class AnswerStream:
    """Iterate for the answer's text pieces. Retrieval is done when this object exists; iterating runs the LLM."""

    def __init__(self, pieces: Iterable[str], *, sources: list[Hit], refused: bool, low_relevance: list[Hit],
                 prompt_tokens: int = 0, dropped: list[Hit] | None = None,
                 check: Callable[[str], GroundingResult | None] | None = None):
        self._pieces = pieces
        self._check = check                   # the grounding check, run once the whole answer is there
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
        try:
            for piece in self._pieces:
                self.text += piece
                yield piece
            if self._check is not None and self.text:
                self.grounding = self._check(self.text)
        except LLMError as e:                 # OOM, server down, context overflow: a sentence, partial text kept
            log.warning("generation failed: %s", e)
            self.error = str(e)
        finally:
            self.done = True
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()                       # a consumer that stops early stops the generation too

    @property
    def ungrounded(self) -> bool:
        """True when the finished answer failed the grounding check: show 「资料中没有找到可靠依据」, not the answer."""
        return self.grounding is not None and not self.grounding.ok


class QAService:
    """Holds one ChatModel and one Embedder; opens knowledge bases lazily and reopens them when they change."""

    def __init__(self, settings: Settings, *, llm: ChatModel | None = None, embedder: Any | None = None):
        self.settings = settings
        self._llm = llm
        self._embedder = embedder
        self._searcher: HybridSearcher | None = None
        self._kbs: dict[str, KnowledgeBase] = {}
        self._lock = threading.RLock()
        self._template = load_template(settings.prompt.template)   # a bad template fails at start, not mid-chat

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
            raise QAError("no knowledge base chosen: pick one, or create one with `python ingest.py FOLDER --kb NAME`")
        with self._lock:
            kb = self._kbs.get(name)
            if kb is None or kb.is_stale():
                try:
                    kb = KnowledgeBase.open(name, self.settings)
                except KBNotFoundError:
                    self._kbs.pop(name, None)
                    known = list_knowledge_bases(self.settings)
                    have = f"existing ones: {', '.join(known)}" if known else "there are none yet"
                    raise QAError(f"knowledge base {name!r} does not exist ({have}); create it with "
                                  f"`python ingest.py FOLDER --kb {name}` or upload files on the page") from None
                except KBError as e:
                    raise QAError(f"knowledge base {name!r} cannot be opened: {e}") from None
                self._kbs[name] = kb
            return kb

    # --- the two calls -------------------------------------------------------------------------------------------
    def search(self, question: str, kb_name: str, params: AnswerParams | Mapping[str, Any] | None = None,
               **overrides: Any) -> SearchResult:
        """Retrieval only (the retrieval-test tab): evidence hits, or the closest low-relevance passages."""
        p = AnswerParams.of({**_as_dict(params), **overrides})
        if not question or not question.strip():
            raise QAError("the question is empty: type a question")
        kb = self.knowledge_base(kb_name)
        try:
            return self.searcher.search(kb, question.strip(), k=p.top_k, threshold=p.threshold)
        except ValueError as e:
            raise QAError(str(e)) from None

    def answer(self, question: str, kb_name: str, history: Sequence[Any] | None = None,
               params: AnswerParams | Mapping[str, Any] | None = None, *,
               stop_event: threading.Event | None = None) -> AnswerStream:
        """Answer `question` from KB `kb_name`. `history`: earlier (question, answer) pairs or chat messages.

        No evidence above the threshold → the LLM is not called: the stream yields REFUSAL and offers the closest
        passages as `.low_relevance`. Setting `stop_event` ends the generation at the next token.
        """
        p = AnswerParams.of(params)
        result = self.search(question, kb_name, p)
        if not result.evidence:
            return AnswerStream([REFUSAL], sources=[], refused=True, low_relevance=result.low_relevance)

        llm = self.llm
        gen = GenerationParams.from_settings(self.settings.llm, temperature=p.temperature,
                                             max_new_tokens=p.max_new_tokens)
        try:
            built = build_prompt(
                question.strip(), result.hits, history or [], template=self._template,
                system=self.settings.prompt.system or None,
                count_tokens=llm.count_tokens, context_tokens=self.settings.prompt.context_tokens,
                history_turns=self.settings.prompt.history_turns if p.history_turns is None else p.history_turns,
                max_context_tokens=llm.info.max_context_tokens, max_new_tokens=gen.max_new_tokens,
            )
        except PromptBudgetError as e:
            raise QAError(str(e)) from None
        log.info("answering from %d passages (%d dropped for the budget), prompt %d tokens",
                 len(built.used_hits), len(built.dropped_hits), built.prompt_tokens)
        return AnswerStream(_lazy_stream(llm, built.messages, gen, stop_event), sources=built.used_hits,
                            refused=False, low_relevance=[], prompt_tokens=built.prompt_tokens,
                            dropped=built.dropped_hits, check=self._grounding_check(question, built.used_hits,
                                                                                     stop_event))

    def _grounding_check(self, question: str, hits: Sequence[Hit], stop_event: threading.Event | None,
                         ) -> Callable[[str], GroundingResult | None] | None:
        """grounding.check_answer over the passages the model was given (prompt.grounding_check); a stopped answer
        is not checked (it is marked 已停止生成 instead)."""
        if not self.settings.prompt.grounding_check:
            return None
        texts = [h.text for h in hits]
        cite = "[1]" in self._template

        def check(text: str) -> GroundingResult | None:
            if stop_event is not None and stop_event.is_set():
                return None
            return check_answer(text, question.strip(), texts, require_citations=cite)
        return check


def _lazy_stream(llm: ChatModel, messages: list[dict[str, str]], params: GenerationParams,
                 stop_event: threading.Event | None) -> Iterator[str]:
    """Start the generation on the first next(), not when answer() returns (the caller may hold a queue slot)."""
    yield from llm.stream(messages, params, stop_event=stop_event)


def _as_dict(params: AnswerParams | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, AnswerParams):
        return {f.name: getattr(params, f.name) for f in fields(params) if getattr(params, f.name) is not None}
    return dict(params)
