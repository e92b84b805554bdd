"""Shared by the CPU and GPU stop-event tests: stream a chat and set the stop event after a few pieces."""
from __future__ import annotations

import threading
from typing import Any


def stream_then_stop(model: Any, chat: list[dict[str, str]], params: Any, *, stop_after: int) -> tuple[str, str]:
    """(text streamed before the stop took effect, the full greedy answer for the same chat and params)."""
    full = model.generate(chat, params)
    event = threading.Event()
    got: list[str] = []
    for piece in model.stream(chat, params, stop_event=event):
        got.append(piece)
        if len(got) >= stop_after:
            event.set()
    return "".join(got), full
