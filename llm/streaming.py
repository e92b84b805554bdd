"""Streaming `model.generate` with a stop button.

transformers' `generate` blocks, so it runs in a worker thread and hands text to a TextIteratorStreamer that the
caller iterates. A StoppingCriteria reads a threading.Event at every step: the UI's stop button, a closed HTTP
connection or Ctrl-C set it and the generation ends at the next token, leaving the model free for the next call.
An exception in the worker (CUDA out of memory, say) is carried back and raised in the caller's thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llm.types import GenerationOOMError, LLMError


class StopOnEvent(StoppingCriteria):
    """Stops every sequence of the batch once any of `events` is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def stream_generate(
    generate: Callable[..., Any],
    tokenizer: Any,
    inputs: dict[str, torch.Tensor],
    generate_kwargs: dict[str, Any],
    stop_event: threading.Event | None = None,
    *,
    first_token_timeout_s: float | None = None,
) -> Iterator[str]:
    """Run `generate(**inputs, **generate_kwargs, streamer=..., stopping_criteria=...)` in a thread; yield text.

    Closing the returned iterator early (break, GeneratorExit) sets the stop event and waits for the worker, so a
    generation never outlives its consumer. CUDA OOM becomes GenerationOOMError after emptying the CUDA cache.
    """
    abandoned = threading.Event()   # set when the consumer stops iterating; the caller's event is left alone
    events = (abandoned, stop_event) if stop_event is not None else (abandoned,)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=first_token_timeout_s)
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            with torch.inference_mode():
                generate(**inputs, **generate_kwargs, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([StopOnEvent(*events)]))
        except BaseException as e:  # noqa: BLE001 - carried to the consumer thread and raised there
            # Drop the traceback: its frames hold the failed step's GPU tensors, which must be freed before
            # empty_cache() can hand the memory back (the model must stay usable after an OOM).
            failure.append(e.with_traceback(None))
            streamer.end()          # unblock the consumer; generate() did not reach its own end()

    thread = threading.Thread(target=worker, name="llm-generate", daemon=True)
    thread.start()
    try:
        for text in streamer:
            if text:
                yield text
    finally:
        abandoned.set()             # no-op after a normal end; stops the worker if the consumer left early
        thread.join()
    if failure:
        _raise_translated(failure[0])


def _raise_translated(e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        raise GenerationOOMError(
            "the GPU ran out of memory while generating this answer (the model is still loaded and usable): ask "
            "again with fewer retrieved passages (retrieval.top_k), a shorter prompt.context_tokens, or a smaller "
            "llm.max_context_tokens / llm.max_new_tokens; other programs on the GPU may also be using its memory."
        ) from e
    if isinstance(e, LLMError):
        raise e
    raise LLMError(f"the model failed while generating: {type(e).__name__}: {e}") from e
