"""The shared surface of the llm room: the ChatModel interface, its plain data and its errors.

Every backend (transformers, openai, llamacpp) and the factory (llm.loader) import from here; this module imports
nothing of the llm room, so the arrows run factory -> backends -> types and never back. No torch here.

`messages` are OpenAI-style dicts ({"role": "system"|"user"|"assistant", "content": str}), as prompts/ builds them;
LangChain BaseMessage objects are accepted too (normalize_messages).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configs.settings import LLMSettings


# --- errors: every message says what went wrong, with which file/setting, and what to do -------------------------
class LLMError(RuntimeError):
    """Base of the llm room's errors. str(e) is a sentence a person can act on."""


class ModelNotFoundError(LLMError):
    """Neither the configured model folder nor the demo model folder exists."""


class RemoteCodeRequiredError(LLMError):
    """The folder ships its own modeling code (original chatglm3-6b) and llm.trust_remote_code is false."""


class ChatTemplateMissingError(LLMError):
    """The tokenizer of the folder has no chat template."""


class InsufficientMemoryError(LLMError):
    """The memory planner says the model will not fit; the message says what to change."""


class GenerationOOMError(LLMError):
    """CUDA ran out of memory during a generation; the cache was emptied and the model stays usable."""


class ContextTooLongError(LLMError):
    """The prompt alone fills llm.max_context_tokens."""


class BackendUnavailableError(LLMError):
    """The backend's package is not installed, or its server cannot be reached."""


# --- plain data ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one call. No field has a default of its own (the defaults are settings.llm's, in
    configs/default.yaml): take `model.default_params` or `GenerationParams.from_settings(settings.llm)` and override
    per call with `.merged(temperature=0)`.

    temperature 0 means greedy decoding (top_p is then unused).
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_settings(cls, llm: LLMSettings, **overrides: Any) -> GenerationParams:
        base = cls(max_new_tokens=llm.max_new_tokens, temperature=llm.temperature, top_p=llm.top_p,
                   repetition_penalty=llm.repetition_penalty)
        return base.merged(**overrides)

    def merged(self, **overrides: Any) -> GenerationParams:
        """A copy with the non-None overrides applied: params.merged(temperature=0)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ModelInfo:
    """What is running, for the UI's status line and the logs."""

    name: str                       # folder name, or the remote model id
    backend: str                    # "transformers" | "llamacpp" | "openai"
    device: str                     # "cuda" | "cpu" | "remote"
    quantization: str               # "nf4" | "int8" | "none" | "remote" | the GGUF file type ("Q4_K_M", ...)
    max_context_tokens: int         # settings.llm.max_context_tokens, or less when the model's window is smaller
    dtype: str = ""                 # "bfloat16", "float16", "float32", or "" when remote
    is_demo: bool = False           # True when settings.llm.demo_model stands in for a missing settings.llm.model
    weights_path: str = ""          # the folder actually loaded
    notes: tuple[str, ...] = field(default_factory=tuple)   # visible remarks (demo stand-in, quantization ignored)
    context_tokens: int = 0         # the engine's passage budget (llm.cpu_context_tokens on a CPU); 0 = the setting
    prefill: str = ""               # another engine that reads the prompts (llm.cpu_prefill), "" = the engine itself

    @property
    def engine(self) -> str:
        """Which engine answers, for the status line: llama.cpp, transformers, or the remote server."""
        name = {"llamacpp": "llama.cpp", "transformers": "transformers", "openai": "OpenAI 兼容服务"}.get(
            self.backend, self.backend)
        return f"{name}（{self.prefill} 读提示）" if self.prefill else name

    def context_budget(self, configured: int) -> int:
        """The 「已知信息」 token budget for this engine: prompt.context_tokens, capped by the engine's own."""
        return min(configured, self.context_tokens) if self.context_tokens > 0 else configured

    @property
    def notice(self) -> str:
        """One string for the UI/CLI banner ("" when there is nothing to say)."""
        return "\n".join(self.notes)


def demo_notice(configured: str, missing_path: Path, demo: str) -> str:
    """The bilingual banner shown while the demo model stands in for the configured one."""
    return (f"演示模式：未找到配置的模型 {configured}（{missing_path}），正在使用演示模型 {demo}，回答质量有限。"
            f"请把模型文件夹放到该位置，或修改 llm.model。 / Demo mode: model folder {missing_path} for "
            f"llm.model={configured!r} was not found, so the small demo model {demo!r} is answering; put the model "
            f"folder there or change llm.model.")


# --- the interface ------------------------------------------------------------------------------------------------
class ChatModel(ABC):
    """A chat model that streams text. Implementations: transformers (local folder), openai (remote server)."""

    info: ModelInfo
    default_params: GenerationParams

    @abstractmethod
    def stream(self, messages: Sequence[Any], params: GenerationParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated. Setting `stop_event` ends the generation early (no error);
        closing the iterator does the same."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` for this model (the prompt builder's budget unit)."""

    def generate(self, messages: Sequence[Any], params: GenerationParams | None = None) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(messages, params))


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """OpenAI-style dicts from dicts or LangChain messages; roles system/user/assistant only."""
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, dict):
            role, content = m.get("role"), m.get("content")
        else:  # langchain_core BaseMessage: .type is "system" | "human" | "ai"
            role = {"human": "user", "ai": "assistant"}.get(getattr(m, "type", ""), getattr(m, "type", None))
            content = getattr(m, "content", None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"each message needs role system/user/assistant and text content, got {m!r}")
        out.append({"role": role, "content": content})
    return out
