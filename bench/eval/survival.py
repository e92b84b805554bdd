"""Do gold answers survive parsing and chunking? Per file format, on the files `writers` wrote.

For every (question, gold passage) pair whose passage text contains the answer, look for the answer in
  - the product loader's text of that passage's file (`ingest.loaders.load_file`), and
  - the knowledge base's chunks of that file (each part of the answer inside one chunk).
Matching ignores whitespace and character widths (metrics.normalize_for_match): a PDF line break inside an
answer is the loader's business only if it turns into something other than whitespace.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.eval.datasets import Passage, Question
from bench.eval.metrics import contains_answer
from configs.settings import Settings
from retrieval.types import Chunk


def parsed_text(path: Path, settings: Settings) -> str:
    """The text the product's loader gets out of a file (raises the loader's LoadError on failure)."""
    from ingest.loaders import load_file  # the ingest room; imported here so metrics tests need no parser

    return "\n".join(d.page_content for d in load_file(path, settings.ingest))


def survival_by_format(folder: Path, files: Mapping[str, tuple[str, str]], passages: Mapping[str, Passage],
                       questions: Iterable[Question], chunks: Iterable[Chunk], settings: Settings,
                       failed: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{format: {files, failed, answers, survived_parse, survived_chunks, lost: [examples]}}.

    files     {file name: (passage id, format)} as returned by writers.write_corpus
    chunks    the knowledge base's chunks (their `source` ends with the file name)
    failed    file names the ingest reported as failed
    """
    by_pid = {pid: name for name, (pid, _) in files.items()}
    chunks_of: dict[str, list[str]] = defaultdict(list)
    for c in chunks:
        chunks_of[Path(c.source).name].append(c.text)
    failed = set(failed)
    stats: dict[str, dict[str, Any]] = {}
    for name, (_, fmt) in files.items():
        s = stats.setdefault(fmt, {"files": 0, "failed": 0, "answers": 0, "survived_parse": 0,
                                   "survived_chunks": 0, "lost": []})
        s["files"] += 1
        s["failed"] += name in failed

    texts: dict[str, str] = {}
    for q in questions:
        for pid in q.positives:
            name = by_pid.get(pid)
            if name is None or not contains_answer(passages[pid].text, q.answer):
                continue            # not in the knowledge base, or a positive that never held the answer
            s = stats[files[name][1]]
            s["answers"] += 1
            if name not in texts:
                try:
                    texts[name] = parsed_text(folder / name, settings)
                except Exception as e:  # noqa: BLE001 - a failed parse is a finding to report, not a crash
                    texts[name] = ""
                    s["lost"].append(f"{name}: loader failed: {e}")
            in_parse = contains_answer(texts[name], q.answer)
            in_chunk = all(any(contains_answer(t, (part,)) for t in chunks_of.get(name, [])) for part in q.answer)
            s["survived_parse"] += in_parse
            s["survived_chunks"] += in_chunk
            if not (in_parse and in_chunk) and len(s["lost"]) < 5:
                s["lost"].append(f"{name}: {q.id} answer {q.answer[0][0]!r} "
                                 f"{'missing from parsed text' if not in_parse else 'not inside any one chunk'}")
    return dict(sorted(stats.items()))
