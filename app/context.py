"""What the page and the API share in one process: settings, the QA service, the ingestion jobs, the login check,
and the gate that caps simultaneous generations across both faces.

The QA service (and its models) is built once, on first use or by `warm_up()` at start, and kept for the life
of the process.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from configs import Settings

from . import library
from .auth import Authenticator
from .jobs import JobManager

if TYPE_CHECKING:
    from retrieval.retriever import SearchResult

    from .service import AnswerParams, AnswerStream

log = logging.getLogger(__name__)


class AppContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        from retrieval.embeddings import Embedder

        # One embedding model in memory for questions and for ingestion jobs (it loads on first use).
        self.embedder = Embedder.from_settings(settings)
        self.jobs = JobManager(settings, embedder=lambda: self.embedder)
        # The page queues generations in Gradio (showing the position); API callers wait here. Both paths take
        # this gate, so page + API together never run more than app.concurrency_limit generations at once.
        self.gate = threading.BoundedSemaphore(settings.app.concurrency_limit)
        self._service: Any = None
        self.models_loaded = False  # the status line never triggers a model load (that takes a minute on CPU)
        self._service_lock = threading.Lock()

    # --- the QA service ------------------------------------------------------------------------
    @property
    def service(self) -> Any:
        if self._service is None:
            with self._service_lock:
                if self._service is None:
                    from .service import QAService

                    self._service = QAService(self.settings, embedder=self.embedder)
        return self._service

    def warm_up(self) -> None:
        """Load the models now, so the first question does not wait for them."""
        self.service.warm_up()
        self.models_loaded = True

    def answer(self, question: str, kb_name: str, history: list, params: AnswerParams | None = None, *,
               stop: threading.Event | None = None) -> GatedStream:
        """One streamed answer. The checks, the retrieval and the prompt happen now (a bad request raises QAError
        before any text); iterating holds a generation slot from the first token wait to the end."""
        stop = stop or threading.Event()
        return GatedStream(self, self.service.answer(question, kb_name, history, params, stop_event=stop), stop)

    def search(self, question: str, kb_name: str, params: AnswerParams | None = None) -> SearchResult:
        return self.service.search(question, kb_name, params)

    # --- page helpers --------------------------------------------------------------------------
    def model_info(self) -> Any:
        return self.service.info

    def status_line(self, kb_name: str | None) -> str:
        """模型 · 设备 · 量化 · 演示/正式 · 知识库大小, for the top of the page."""
        try:
            if not self.models_loaded:
                raise RuntimeError("模型尚未加载，第一次提问时加载（需要约一分钟）")
            info = self.model_info()
            kind = "演示模型" if info.is_demo else "正式模型"
            model = (f"模型 **{info.name}**（{kind}） · 引擎 {info.engine} · 设备 {info.device} · "
                     f"量化 {info.quantization}")
        except Exception as e:  # noqa: BLE001 - the page must still open so that people can read the reason
            model = f"模型未就绪：{getattr(e, 'reason', None) or e}"
        if not kb_name:
            return f"{model} · 尚无知识库"
        try:
            size = library.size(kb_name, self.settings)
            return f"{model} · 知识库「{kb_name}」：{size.files} 个文件 / {size.chunks} 段"
        except Exception as e:  # noqa: BLE001 - a broken KB is reported in the status line, not as a crash
            return f"{model} · 知识库「{kb_name}」无法打开：{e}"

    def upload_types(self) -> list[str]:
        from ingest.loaders import SUPPORTED_EXTENSIONS

        return sorted({*SUPPORTED_EXTENSIONS, ".zip"})


class GatedStream:
    """Iterate the service's AnswerStream while holding a generation slot; .sources/.refused/.error etc. are the
    AnswerStream's.

    Async servers use pull() from a worker thread and abandon() when the client goes away: a sync generator that
    Starlette stops iterating is never closed, so its slot would stay taken until garbage collection (after a few
    dropped streams every later question waited for ever)."""

    def __init__(self, ctx: AppContext, inner: AnswerStream, stop: threading.Event | None = None) -> None:
        self._ctx, self._inner, self._stop = ctx, inner, stop
        self._lock = threading.Lock()
        self._it: Iterator[str] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        with self._ctx.gate:
            for piece in self._inner:
                if not self._inner.refused:  # a refusal never touches the LLM
                    self._ctx.models_loaded = True
                yield piece

    def pull(self) -> str | None:
        """The next piece, or None at the end (or once abandoned). Blocking: call it from a worker thread."""
        with self._lock:
            if self._closed:
                return None
            if self._it is None:
                self._it = iter(self)
            return next(self._it, None)

    def abandon(self) -> None:
        """Stop the generation at its next token and give the slot back, without blocking the caller: the close
        waits (in its own thread) for a pull() still running in a worker."""
        if self._stop is not None:
            self._stop.set()
        threading.Thread(target=self._close, name="answer-abandon", daemon=True).start()

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._it is not None:
                self._it.close()          # leaves `with gate`: the slot is free again

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
