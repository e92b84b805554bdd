"""Evaluation sets: read SQuAD/CMRC JSON or RAG-style JSONL into passages + questions, then split.

Formats
  (a) SQuAD / CMRC 2018 JSON: data → paragraphs → context + qas[question, answers[text]]. Each paragraph is a
      passage; its questions have it as their only gold ("positive") passage. Several answers of one question
      are alternatives. SQuAD 2.0 questions marked is_impossible are skipped (we make our own unanswerables).
  (b) JSONL, one object per question (the RGB benchmark's layout):
      {"id": ..., "query": "...", "answer": [...], "positive": ["passage", ...], "negative": ["noise", ...]}
      `answer` is a list of parts that are all needed; an inner list lists alternatives of one part.
      Passages are de-duplicated by text, so a passage shared by several questions is written once.

Unanswerable questions: `split_for_eval` chooses a share of the questions and leaves only their gold passages out
of the knowledge base; answerable questions keep every gold passage they have (`gold_kept` reports how many).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from bench.eval.metrics import Answer


class DatasetError(ValueError):
    """The evaluation file cannot be read; the message names the file, the record and what is wrong."""


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Question:
    id: str
    query: str
    answer: Answer
    positives: tuple[str, ...]          # ids of passages that contain the answer


@dataclass
class EvalSet:
    name: str
    passages: dict[str, Passage]        # every passage: gold and noise
    questions: list[Question]
    skipped: int = 0                    # records dropped (no answer, empty question); reported, never silent


@dataclass
class EvalSplit:
    """What one run evaluates: the passages that go into the knowledge base and the two kinds of question."""
    kb_passages: list[Passage]
    answerable: list[Question]
    unanswerable: list[Question]        # their positives are not in the knowledge base
    held_out: list[str] = field(default_factory=list)   # passage ids left out

    @property
    def questions(self) -> list[Question]:
        return self.answerable + self.unanswerable


def _pid(text: str) -> str:
    return "p" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _parse_answer(raw: object, where: str) -> Answer:
    """JSONL `answer`: "x" | ["x", "y"] (both needed) | [["x", "x2"], "y"] (alternatives inside)."""
    items = raw if isinstance(raw, list) else [raw]
    parts: list[tuple[str, ...]] = []
    for item in items:
        alts = item if isinstance(item, list) else [item]
        alts = tuple(str(a).strip() for a in alts if str(a).strip())
        if alts:
            parts.append(alts)
    if not parts:
        raise DatasetError(f"{where}: `answer` is empty; give a list of answer strings, e.g. \"answer\": [\"北京\"]")
    return tuple(parts)


def read_squad(path: Path) -> EvalSet:
    """Read a SQuAD/CMRC-style JSON file (e.g. squad-style-data_cmrc2018_trial.json)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        articles = data["data"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a SQuAD/CMRC JSON file with a top-level \"data\" list ({e})") from None
    passages: dict[str, Passage] = {}
    questions: list[Question] = []
    skipped = 0
    for a_i, article in enumerate(articles):
        title = str(article.get("title", "")).strip()
        for p_i, para in enumerate(article.get("paragraphs", [])):
            context = str(para.get("context", "")).strip()
            if not context:
                skipped += len(para.get("qas", []))
                continue
            pid = str(para.get("id") or f"{a_i}-{p_i}")
            passages[pid] = Passage(pid, context, title)
            for q_i, qa in enumerate(para.get("qas", [])):
                alts = tuple(dict.fromkeys(str(x.get("text", "")).strip() for x in qa.get("answers", [])))
                alts = tuple(a for a in alts if a)
                query = str(qa.get("question", "")).strip()
                if qa.get("is_impossible") or not alts or not query:
                    skipped += 1
                    continue
                questions.append(Question(str(qa.get("id") or f"{pid}-{q_i}"), query, (alts,), (pid,)))
    if not questions:
        raise DatasetError(f"{path}: found no questions with answers under data → paragraphs → qas")
    return EvalSet(Path(path).stem, passages, questions, skipped)


def read_jsonl(path: Path) -> EvalSet:
    """Read one question per line: query, answer, positive, negative (see the module doc)."""
    passages: dict[str, Passage] = {}
    questions: list[Question] = []
    skipped = 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read as UTF-8 text ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "query" not in rec or "answer" not in rec:
            raise DatasetError(f"{where}: each line needs an object with \"query\" and \"answer\"")
        pos_ids: list[str] = []
        for key in ("positive", "negative"):
            texts = rec.get(key) or []
            if isinstance(texts, str):
                texts = [texts]
            for t in texts:
                t = str(t).strip()
                if not t:
                    continue
                pid = _pid(t)
                passages.setdefault(pid, Passage(pid, t))
                if key == "positive":
                    pos_ids.append(pid)
        query = str(rec["query"]).strip()
        if not query or not pos_ids:
            skipped += 1            # without a gold passage nothing about retrieval can be measured
            continue
        qid = str(rec.get("id", n))
        questions.append(Question(qid, query, _parse_answer(rec["answer"], where), tuple(dict.fromkeys(pos_ids))))
    if not questions:
        raise DatasetError(f"{path}: no usable question (each needs a query, an answer and a positive passage)")
    return EvalSet(Path(path).stem, passages, questions, skipped)


def read_eval_set(path: Path) -> EvalSet:
    """Pick the reader by extension: .json → SQuAD/CMRC, .jsonl → one question per line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"evaluation file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path)
    if path.suffix.lower() == ".json":
        return read_squad(path)
    raise DatasetError(f"{path}: unknown evaluation format; use a SQuAD/CMRC .json or a .jsonl file")


def split_for_eval(ds: EvalSet, *, unanswerable_share: float = 0.2, max_passages: int | None = None,
                   seed: int = 0) -> EvalSplit:
    """Choose the knowledge base's passages and which questions become unanswerable.

    max_passages   keep at most this many passages (a random subset); questions whose positives all fell
                   out are dropped entirely (they were never part of this run)
    unanswerable_share   about this share of the questions is made unanswerable. The questions are chosen first
                   (in random order) and only their gold passages are left out. A question is passed over when
                   leaving its passages out would take a gold passage from a question that stays answerable (on
                   multi-positive data a passage is often shared); questions that lose every positive together
                   with it (CMRC: the other questions of the same paragraph) become unanswerable with it.
    """
    if not 0 <= unanswerable_share < 1:
        raise ValueError(f"unanswerable_share must be within [0, 1), got {unanswerable_share}")
    rng = random.Random(seed)
    pids = sorted(ds.passages)
    if max_passages is not None and max_passages < len(pids):
        if max_passages <= 0:
            raise ValueError(f"max_passages must be > 0, got {max_passages}")
        pids = sorted(rng.sample(pids, max_passages))
    kept = set(pids)
    questions = [q for q in ds.questions if any(p in kept for p in q.positives)]
    gold_of = {q.id: {p for p in q.positives if p in kept} for q in questions}
    needed_by: dict[str, list[Question]] = {}
    for q in questions:
        for p in gold_of[q.id]:
            needed_by.setdefault(p, []).append(q)

    target = round(unanswerable_share * len(questions))
    order = list(questions)
    rng.shuffle(order)
    held: set[str] = set()
    una_ids: set[str] = set()
    for q in order:
        if len(una_ids) >= target:
            break
        if q.id in una_ids:
            continue
        trial = held | gold_of[q.id]
        touched = {o.id: o for p in gold_of[q.id] for o in needed_by[p]}
        lost_all = {oid for oid in touched if gold_of[oid] <= trial}
        if len(lost_all) < len(touched):     # someone who stays answerable would lose a gold passage
            continue
        if len(una_ids | lost_all) > target and una_ids:   # overshooting: a smaller group may still fit
            continue
        held, una_ids = trial, una_ids | lost_all
    unanswerable = [q for q in questions if q.id in una_ids]
    answerable = [q for q in questions if q.id not in una_ids]
    kb = [ds.passages[p] for p in pids if p not in held]
    return EvalSplit(kb, answerable, unanswerable, sorted(held))


def gold_kept(split: EvalSplit) -> dict[int, int]:
    """How many gold passages each answerable question keeps in the knowledge base: {passages kept: questions}.

    With the question-first split every answerable question keeps all of its positives; this says how many that is.
    """
    kb = {p.id for p in split.kb_passages}
    counts: dict[int, int] = {}
    for q in split.answerable:
        n = sum(p in kb for p in q.positives)
        counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def gold_lost(split: EvalSplit) -> int:
    """Answerable questions that lost at least one gold passage to the split (0 by construction; reported)."""
    held = set(split.held_out)
    return sum(bool(held & set(q.positives)) for q in split.answerable)


def sample_questions(split: EvalSplit, limit: int | None, seed: int = 0) -> list[Question]:
    """Up to `limit` questions, answerable and unanswerable in the split's proportions (stratified), in a
    reproducible order; None → all."""
    rng = random.Random(seed)
    ans, una = list(split.answerable), list(split.unanswerable)
    rng.shuffle(ans)
    rng.shuffle(una)
    if limit is None or limit >= len(ans) + len(una):
        return ans + una
    n_una = round(limit * len(una) / max(1, len(ans) + len(una)))
    return ans[: limit - n_una] + una[:n_una]


def stratified_head(questions: list[Question], unanswerable_ids: set[str], n: int | None) -> list[Question]:
    """The first `n` questions of a sampled list, keeping its share of unanswerable ones (for the slow LLM part),
    answerable and unanswerable alternating."""
    una = [q for q in questions if q.id in unanswerable_ids]
    ans = [q for q in questions if q.id not in unanswerable_ids]
    if n is not None and n < len(questions):
        n_una = round(n * len(una) / max(1, len(questions)))
        ans, una = ans[: n - n_una], una[:n_una]
    # alternate the two kinds (in proportion), so a run cut short (--answer-batch) still has both
    out, i, j = [], 0, 0
    while i < len(ans) or j < len(una):
        if j >= len(una) or (i < len(ans) and i * len(una) <= j * len(ans)):
            out.append(ans[i])
            i += 1
        else:
            out.append(una[j])
            j += 1
    return out
