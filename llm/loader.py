"""The one factory of the llm room: build the chat model that settings.llm.backend names.

    model = load_llm(settings)                      # transformers (local folder) or openai (intranet server)
    for piece in model.stream(messages, model.default_params.merged(max_new_tokens=64), stop_event=evt):
        print(piece, end="")
    model.info.is_demo, model.info.notice           # the UI and CLI show the notice when a demo model stands in

The interface, data and errors live in llm.types; each backend's module is imported only in its case, so this
module imports no torch (the openai backend stays light).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from llm.types import BackendUnavailableError, ChatModel

if TYPE_CHECKING:
    from configs.settings import Settings


def load_llm(settings: Settings) -> ChatModel:
    """Build the chat model chosen by settings.llm.backend (one place; optional packages imported in their case)."""
    match settings.llm.backend:
        case "transformers":
            try:
                from llm.transformers_backend import load_transformers_model
            except ImportError as e:
                raise BackendUnavailableError(
                    f"llm.backend is 'transformers' but a package is missing ({e}); install the pinned requirements "
                    f"with `pip install -r requirements.txt`."
                ) from e
            return load_transformers_model(settings)
        case "openai":
            from llm.openai_backend import OpenAIChatModel
            return OpenAIChatModel.from_settings(settings)
        case other:
            raise ValueError(f"llm.backend must be 'transformers' or 'openai', got {other!r}")
