"""A chat model served by any OpenAI-compatible server on the intranet (vLLM, llama.cpp server, FastChat, TGI...).

POST {llm.openai_base_url}/chat/completions with "stream": true and read the server-sent events
("data: {json}" lines, ended by "data: [DONE]"). Standard library only (urllib): no extra package to install.
"""
from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from llm.types import BackendUnavailableError, ChatModel, GenerationParams, LLMError, ModelInfo, normalize_messages

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text: str) -> int:
    """A deliberately generous token count when no tokenizer is at hand: 1 per CJK character/punctuation mark,
    1 per 3 other characters (BPE vocabularies of Qwen/GLM average 3–4 Latin characters a token)."""
    cjk = len(_CJK.findall(text))
    return cjk + -(-(len(text) - cjk) // 3)


class OpenAIChatModel(ChatModel):
    def __init__(self, base_url: str, model: str, api_key: str = "", *, default_params: GenerationParams,
                 max_context_tokens: int, timeout_s: float = 120.0):
        if not base_url:
            raise LLMError("llm.backend is 'openai' but llm.openai_base_url is empty; set it to the server's "
                           "/v1 address, e.g. http://10.0.0.5:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.default_params = default_params
        self.model = model or self._first_served_model()
        self.info = ModelInfo(name=self.model, backend="openai", device="remote", quantization="remote",
                              weights_path=self.base_url, max_context_tokens=max_context_tokens)

    @classmethod
    def from_settings(cls, settings: Any) -> OpenAIChatModel:
        llm = settings.llm
        return cls(llm.openai_base_url, llm.openai_model, llm.openai_api_key,
                   default_params=GenerationParams.from_settings(llm), max_context_tokens=llm.max_context_tokens)

    # -- HTTP --
    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            detail = e.read(500).decode("utf-8", "replace").strip()
            raise BackendUnavailableError(
                f"the OpenAI-compatible server at {self.base_url} answered HTTP {e.code} to {path}: {detail}; "
                f"check llm.openai_model and llm.openai_api_key") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise BackendUnavailableError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} ({reason}); check llm.openai_base_url "
                f"and that the server is running") from None

    def _first_served_model(self) -> str:
        with self._request("/models") as resp:
            payload = json.load(resp)
        models = [m.get("id") for m in payload.get("data", []) if m.get("id")]
        if not models:
            raise LLMError(f"the server at {self.base_url} lists no models at /models; set llm.openai_model")
        return models[0]

    # -- ChatModel --
    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def stream(self, messages: Sequence[Any], params: GenerationParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        params = params or self.default_params
        body: dict[str, Any] = {
            "model": self.model, "messages": normalize_messages(messages), "stream": True,
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
        }
        if params.temperature > 0:
            body["top_p"] = params.top_p
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty   # vLLM / llama.cpp / FastChat extension
        return self._stream_events(body, stop_event)

    def _stream_events(self, body: dict[str, Any], stop_event: threading.Event | None) -> Iterator[str]:
        with self._request("/chat/completions", body) as resp:
            for raw in resp:
                if stop_event is not None and stop_event.is_set():
                    return                     # leaving the with-block closes the connection: the server stops
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue                   # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    raise LLMError(f"the server at {self.base_url} sent a malformed stream event: {data[:200]!r}") \
                        from None
                if "error" in event:
                    raise LLMError(f"the server at {self.base_url} reported an error: {event['error']}")
                for choice in event.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
