"""Answers cached per question and configuration, so a long LLM evaluation runs in batches and resumes.

    cache = AnswerCache(Path("artifacts/eval/answers.jsonl"))
    key = cache.key(fingerprint, question)          # the configuration's fingerprint + the question's id and text
    raw = cache.get(key)                             # None → ask the model, then cache.put(key, raw)

One JSON object per line ({"key", "raw"}), appended and flushed after every answer: an interrupted run loses at most
the answer in flight, and `bench.evaluate --answer-cache FILE --answer-batch 25` answers 25 more questions per call
(each call short enough to run under `flock /tmp/zhiwen-heavy.lock` between other people's jobs). What is cached
is the model's raw output and what the service gave it (the passages, their scores); every metric and the grounding
check are recomputed from it, so a change to the check needs no new generation.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (settings dumps, the template's text, the answer length)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class AnswerCache:
    """A JSONL file of raw answers; a line that does not parse (a run killed mid-write) is skipped."""

    def __init__(self, path: Path | None):
        self.path = path
        self._rows: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self._rows[item["key"]] = item["raw"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(config_fingerprint: str, question_id: str, query: str) -> str:
        return f"{config_fingerprint}:{question_id}:{fingerprint(query)}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def put(self, key: str, raw: dict[str, Any]) -> None:
        self._rows[key] = raw
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "raw": raw}, ensure_ascii=False) + "\n")
            f.flush()

    def __len__(self) -> int:
        return len(self._rows)


class Budget:
    """How many more questions may go through the LLM in this call (None = no limit)."""

    def __init__(self, n: int | None):
        self.left = n

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True
