"""The one factory of the llm room: build the chat model that settings.llm.backend names.

    model = load_llm(settings)     # auto: a GGUF on CPU -> llama.cpp; a transformers folder -> transformers
                                   # (GPU nf4/int8 or CPU); openai: an intranet server
    for piece in model.stream(messages, model.default_params.merged(max_new_tokens=64), stop_event=evt):
        print(piece, end="")
    model.info.is_demo, model.info.notice           # the UI and CLI show the notice when a demo model stands in

The interface, data and errors live in llm.types; each backend's module is imported only in its case (torch only
when auto must ask whether a CUDA GPU is there), so the openai and llamacpp backends stay light.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from llm.locate import has_gguf, has_transformers_weights, resolve_model_path
from llm.types import BackendUnavailableError, ChatModel, LLMError

if TYPE_CHECKING:
    from configs.settings import Settings


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_backend(settings: Settings, path: Path | None = None) -> str:
    """The engine for llm.backend: auto (or the named one). auto: a .gguf file, or a folder with only GGUF weights ->
    llamacpp; a transformers folder -> transformers; a folder with both (the demo pack) -> transformers when it will
    run on a CUDA GPU (bitsandbytes nf4/int8), llamacpp on the CPU when llama-cpp-python is installed."""
    backend = settings.llm.backend
    if backend != "auto":
        return backend
    if path is None:
        path, _, _ = resolve_model_path(settings)
    gguf, hf = has_gguf(path), has_transformers_weights(path)
    if gguf and not hf:
        return "llamacpp"
    if hf and not gguf:
        return "transformers"
    if not (gguf or hf):
        raise LLMError(f"{path} holds neither a .gguf file nor a transformers model (config.json + weights); point "
                       f"llm.model at a model folder or a .gguf file")
    if settings.llm.adapter:  # LoRA / P-Tuning adapters are applied by the transformers backend (llm/adapters.py)
        return "transformers"
    device = settings.llm.device
    on_gpu = device == "cuda" or (device == "auto" and _cuda_available())
    if on_gpu or importlib.util.find_spec("llama_cpp") is None:
        return "transformers"
    return "llamacpp"


def load_llm(settings: Settings) -> ChatModel:
    """Build the chat model chosen by settings.llm.backend (one place; optional packages imported in their case)."""
    backend = choose_backend(settings)
    if settings.llm.adapter and backend != "transformers":
        from llm.adapters import AdapterError
        raise AdapterError(
            f"llm.adapter is set, but adapters (peft LoRA / prefix tuning, P-Tuning v2) are applied by the "
            f"transformers backend and llm.backend resolves to {backend!r} here; use a transformers model folder with "
            f"llm.backend: transformers or auto, or set llm.adapter: \"\"")
    match backend:
        case "transformers":
            try:
                from llm.transformers_backend import load_transformers_model
            except ImportError as e:
                raise BackendUnavailableError(
                    f"llm.backend is 'transformers' but a package is missing ({e}); install the pinned requirements "
                    f"with `pip install -r requirements.txt`."
                ) from e
            return load_transformers_model(settings)
        case "llamacpp":
            from llm.llamacpp_backend import load_llamacpp_model
            return load_llamacpp_model(settings)
        case "openai":
            from llm.openai_backend import OpenAIChatModel
            return OpenAIChatModel.from_settings(settings)
        case other:
            raise ValueError(f"llm.backend must be auto, transformers, llamacpp or openai, got {other!r}")
