"""A chat model served by any OpenAI-compatible server on the intranet (vLLM, llama.cpp's server, Xinference,
FastChat...), spoken to with the official `openai` client library: it does the HTTP, the server-sent events, the
timeouts and the error classes; this module turns each failure into one sentence that names the setting to check.

    llm:
      backend: openai
      openai_base_url: http://10.0.0.5:8000/v1
      openai_model: glm-4-9b-chat          # "" = the first model the server lists
      openai_api_key: ""                   # if the server wants one

At start the server's model list is read once (GET /models): a server that is down, a wrong key or a model name the
server does not serve fails here, before the first question, with the names it does serve. (llama.cpp's Python server
answers any model name with its one model, so without this check a typo would go unnoticed.)
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from common.text import CJK
from llm.types import BackendUnavailableError, ChatModel, GenerationParams, LLMError, ModelInfo, normalize_messages


def estimate_tokens(text: str) -> int:
    """A deliberately generous token count when no tokenizer is at hand: 1 per CJK character/punctuation mark,
    1 per 3 other characters (BPE vocabularies of Qwen/GLM average 3–4 Latin characters a token)."""
    cjk = len(CJK.findall(text))
    return cjk + -(-(len(text) - cjk) // 3)


class OpenAIChatModel(ChatModel):
    def __init__(self, base_url: str, model: str, api_key: str = "", *, default_params: GenerationParams,
                 max_context_tokens: int, timeout_s: float = 120.0):
        if not base_url:
            raise LLMError("llm.backend is 'openai' but llm.openai_base_url is empty; set it to the server's "
                           "/v1 address, e.g. http://10.0.0.5:8000/v1")
        try:
            import openai
        except ImportError:
            raise BackendUnavailableError("llm.backend is 'openai' but the openai package is not installed; run "
                                          "`pip install openai==3.51.0` (pinned in requirements.txt)") from None
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.default_params = default_params
        # max_retries=0: a retry would re-send a question whose answer is already half shown; the person retries.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout_s,
                                    max_retries=0)
        self.model = self._check_model(model)
        self.info = ModelInfo(name=self.model, backend="openai", device="remote", quantization="remote",
                              weights_path=self.base_url, max_context_tokens=max_context_tokens)

    @classmethod
    def from_settings(cls, settings: Any) -> OpenAIChatModel:
        llm = settings.llm
        return cls(llm.openai_base_url, llm.openai_model, llm.openai_api_key,
                   default_params=GenerationParams.from_settings(llm), max_context_tokens=llm.max_context_tokens)

    def _check_model(self, wanted: str) -> str:
        """The model to ask for: `wanted` if the server serves it, else the first served one when `wanted` is ""."""
        try:
            served = [m.id for m in self.client.models.list()]
        except self._openai.APIError as e:
            raise self._translate(e, "/models") from None
        if not served:
            raise LLMError(f"the server at {self.base_url} lists no models at /models; set llm.openai_model")
        if not wanted:
            return served[0]
        if wanted not in served:
            raise BackendUnavailableError(
                f"the server at {self.base_url} does not serve llm.openai_model={wanted!r}; it serves "
                f"{', '.join(repr(s) for s in served)}; set llm.openai_model to one of these")
        return wanted

    # -- ChatModel --
    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def stream(self, messages: Sequence[Any], params: GenerationParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        params = params or self.default_params
        request: dict[str, Any] = {
            "model": self.model, "messages": normalize_messages(messages), "stream": True,
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
        }
        if params.temperature > 0:
            request["top_p"] = params.top_p
        if params.repetition_penalty != 1.0:
            # not in the OpenAI API: vLLM / FastChat read repetition_penalty, llama.cpp's servers repeat_penalty
            request["extra_body"] = {"repetition_penalty": params.repetition_penalty,
                                     "repeat_penalty": params.repetition_penalty}
        return self._pieces(request, stop_event)

    def _pieces(self, request: dict[str, Any], stop_event: threading.Event | None) -> Iterator[str]:
        try:
            stream = self.client.chat.completions.create(**request)
        except self._openai.APIError as e:
            raise self._translate(e, "/chat/completions") from None
        got_any = False
        try:
            for chunk in stream:
                if stop_event is not None and stop_event.is_set():
                    return                        # the finally closes the connection: the server stops generating
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        got_any = True
                        yield text
        except self._openai.APIConnectionError as e:   # the connection broke while reading: the server went away
            raise self._gone(e) if got_any else self._translate(e, "/chat/completions") from None
        except self._openai.APIError as e:              # an error event in the stream
            raise self._translate(e, "/chat/completions", mid_answer=got_any) from None
        except Exception as e:  # noqa: BLE001 - a transport error the client did not wrap
            if not _is_transport_error(e):
                raise
            raise self._gone(e) from None
        finally:
            stream.close()

    # -- errors --
    def _gone(self, e: Exception) -> LLMError:
        cause = e.__cause__ or e.__context__ or e
        return BackendUnavailableError(
            f"the OpenAI-compatible server at {self.base_url} stopped answering in the middle of the answer "
            f"({type(cause).__name__}); the text so far is kept. Check that the server is still running and ask "
            f"again")

    def _translate(self, e: Exception, path: str, *, mid_answer: bool = False) -> LLMError:
        """One sentence for each way an OpenAI-compatible call fails."""
        o = self._openai
        where = f"the OpenAI-compatible server at {self.base_url}"
        if isinstance(e, o.APITimeoutError):
            return BackendUnavailableError(f"{where} did not answer {path} in time; check that it is not overloaded, "
                                           f"and llm.openai_base_url")
        if isinstance(e, o.APIConnectionError):
            return BackendUnavailableError(f"cannot reach {where} ({_cause(e)}); check llm.openai_base_url and that "
                                           f"the server is running")
        if isinstance(e, o.AuthenticationError):
            return BackendUnavailableError(f"{where} refused the API key (HTTP 401); check llm.openai_api_key")
        if isinstance(e, o.NotFoundError):
            return BackendUnavailableError(f"{where} answered HTTP 404 to {path} ({_detail(e)}); check "
                                           f"llm.openai_model and that llm.openai_base_url ends in /v1")
        if isinstance(e, o.APIStatusError):
            return BackendUnavailableError(f"{where} answered HTTP {e.status_code} to {path}: {_detail(e)}")
        prefix = "failed in the middle of the answer" if mid_answer else "reported an error"
        return LLMError(f"{where} {prefix}: {_detail(e)}")


def _detail(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    return (getattr(e, "message", None) or str(e) or type(e).__name__)[:300]


def _cause(e: Exception) -> str:
    cause = e.__cause__ or e.__context__
    return f"{type(cause).__name__}: {cause}"[:200] if cause else str(e)


def _is_transport_error(e: Exception) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - openai depends on httpx
        return False
    return isinstance(e, (httpx.TransportError, httpx.StreamError, ConnectionError))
