"""llm room: load a chat model (GPU 4-bit/8-bit, CPU, or a remote OpenAI-compatible server) and stream tokens.

    from llm import load_llm, GenerationParams, plan_memory
Importing this package does not import torch; the transformers backend loads it when a model is loaded.
"""
from llm.loader import (
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
                        load_llm,
)
from llm.planner import MemoryPlan, plan_memory

__all__ = [
    "BackendUnavailableError", "ChatModel", "ChatTemplateMissingError", "ContextTooLongError", "GenerationOOMError",
    "GenerationParams", "InsufficientMemoryError", "LLMError", "MemoryPlan", "ModelInfo", "ModelNotFoundError",
    "RemoteCodeRequiredError", "load_llm", "plan_memory",
]
