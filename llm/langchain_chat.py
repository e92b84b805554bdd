"""Zhiwen's loaded chat model as a LangChain chat model, for people who build their own chains.

    from llm import load_llm
    from llm.langchain_chat import ZhiwenChatModel
    from prompts import as_chat_prompt_template, load_template
    from retrieval import KnowledgeBaseRetriever

    chat = ZhiwenChatModel(llm=load_llm(settings))             # quantized ChatGLM, CPU model or OpenAI-compatible
    chain = as_chat_prompt_template(load_template("knowledge_qa")) | chat | StrOutputParser()
    chain.invoke({"context": "...", "question": "年假有几天？"})

`invoke`/`stream`/`batch` go through the same ChatModel.stream the web app uses (chat template, token streaming,
stop on demand); `stop=[...]` sequences end the answer at the first match (the match is not returned).
Per-call `max_new_tokens` / `temperature` keyword arguments override the model's defaults.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from llm.types import ChatModel, GenerationParams, normalize_messages


class ZhiwenChatModel(BaseChatModel):
    """A LangChain BaseChatModel around a loaded `llm.ChatModel` (see `llm.load_llm`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: ChatModel
    max_new_tokens: int | None = None
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return "zhiwen-" + self.llm.info.backend

    @property
    def _identifying_params(self) -> dict[str, Any]:
        info = self.llm.info
        return {"model": info.name, "device": info.device, "quantization": info.quantization, "demo": info.is_demo}

    def _params(self, kwargs: dict[str, Any]) -> GenerationParams:
        return self.llm.default_params.merged(
            max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
            temperature=kwargs.get("temperature", self.temperature))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        event = threading.Event()
        pieces = self.llm.stream(normalize_messages(messages), self._params(kwargs), stop_event=event)
        pending = ""   # text held back because it might be the start of a stop sequence
        hold = max((len(s) for s in stop or ()), default=1) - 1
        try:
            for piece in pieces:
                pending += piece
                cut = min((i for i in (pending.find(s) for s in stop or ()) if i >= 0), default=-1)
                if cut >= 0:
                    pending = pending[:cut]
                    event.set()
                    break
                ready = pending[: len(pending) - hold] if hold else pending
                if ready:
                    pending = pending[len(ready):]
                    yield self._chunk(ready, run_manager)
            if pending:
                yield self._chunk(pending, run_manager)
        finally:
            event.set()
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _chunk(text: str, run_manager: CallbackManagerForLLMRun | None) -> ChatGenerationChunk:
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
        if run_manager is not None:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text = "".join(c.text for c in self._stream(messages, stop, run_manager, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])
