"""llm room: load a chat model (GPU 4-bit/8-bit, CPU, or a remote OpenAI-compatible server) and stream tokens.

    types.py      ChatModel, GenerationParams, ModelInfo, the LLMError family, normalize_messages (imports nothing here)
    locate.py     which folder: llm.model or the demo stand-in
    loader.py     load_llm, the one factory -> the backends (transformers_backend, openai_backend)
    planner.py    memory estimate; streaming.py: generate() in a thread with a stop event
    langchain_chat.py  the LangChain wrapper (ZhiwenChatModel)
The model pack that assembles the demo weights is its own room: modelpack/.

    from llm import load_llm, GenerationParams, plan_memory
Importing this package does not import torch; the transformers backend loads it when a model is loaded. It sets the
OpenMP wait policy for the process (llm/openmp.py) before torch or llama.cpp load their OpenMP runtime.
"""
from llm.openmp import configure_openmp_waits

configure_openmp_waits()

from llm.loader import load_llm  # noqa: E402
from llm.planner import MemoryPlan, plan_memory  # noqa: E402
from llm.types import (  # noqa: E402
    BackendUnavailableError,
    ChatModel,
    ChatTemplateMissingError,
    ContextTooLongError,
    GenerationOOMError,
    GenerationParams,
    InsufficientMemoryError,
    LLMError,
    ModelInfo,
    ModelNotFoundError,
    RemoteCodeRequiredError,
)

__all__ = [
    "BackendUnavailableError", "ChatModel", "ChatTemplateMissingError", "ContextTooLongError", "GenerationOOMError",
    "GenerationParams", "InsufficientMemoryError", "LLMError", "MemoryPlan", "ModelInfo", "ModelNotFoundError",
    "RemoteCodeRequiredError", "load_llm", "plan_memory",
]
