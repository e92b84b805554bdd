"""Is the highlighted evidence sentence the one holding the answer? Measured on CMRC 2018 trial.

    .venv/bin/python -m bench.highlight_cmrc                    # by answer and by question wording
    .venv/bin/python -m bench.highlight_cmrc --semantic         # also by question meaning (loads the embedder)
    .venv/bin/python -m bench.highlight_cmrc --answers artifacts/eval/report.json   # real model answers

For each question, the sentences of its own paragraph are ranked and the first is "the highlighted sentence"; it
counts when it contains a reference answer. Methods:
  answer: bigrams     the old page rule: most character pairs shared with the answer (length-normalised)
  answer: content     grounding.best_sentence_index: the sentence stating the answer's numbers/dates/names, then
                      the one sharing most of its wording (what the page uses after an answer)
  question: bigrams   the old rule with the question as reference (before an answer exists)
  question: key terms most of the question's key words (grounding.evidence.key_terms) in the sentence
  question: semantic  e5 similarity between the question and each sentence (--semantic; app.highlight)
  question: semantic + key terms (w)   the cosine plus w × the share of the question's key words in the sentence
                      (--semantic; the page's rule before an answer is app.highlight.KEY_TERM_WEIGHT)
With --answers, the answer methods use the answers an evaluation run's report recorded (answerable questions whose
answer contains the reference, i.e. "when the answer is right"); otherwise the reference answer itself stands in.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from app.highlight import QuestionHighlighter, pick
from app.render import _bigram_sentences
from bench.eval.datasets import read_eval_set
from bench.eval.metrics import contains_any_answer, normalize_for_match
from bench.retrieval_cmrc import CMRC_TRIAL
from grounding.evidence import best_sentence_index, key_terms
from retrieval.sentences import split_sentences


def _first_bigram(sentences: Sequence[str], reference: str) -> int | None:
    text = "".join(sentences)
    got = _bigram_sentences(text, reference, 1)
    return next(iter(got)) if got else None


def _by_terms(sentences: Sequence[str], question: str) -> int | None:
    terms = key_terms(question)
    if not terms:
        return None
    scores = [sum(t in normalize_for_match(s) for t in terms) / len(terms) for s in sentences]
    best = max(scores)
    return scores.index(best) if best > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=CMRC_TRIAL)
    ap.add_argument("--semantic", action="store_true", help="also rank by e5 similarity (loads the embedding model)")
    ap.add_argument("--answers", type=Path, help="an evaluation report (.json) whose recorded answers to use")
    ap.add_argument("--weights", default="0.02,0.05,0.1,0.2",
                    help="key-term weights tried on top of the semantic score (--semantic)")
    args = ap.parse_args(argv)
    ds = read_eval_set(args.data)
    model_answers: dict[str, str] = {}
    if args.answers:
        rep = json.loads(args.answers.read_text(encoding="utf-8"))
        for q in rep.get("questions", []):
            for a in (q.get("answers") or {}).values():
                if q.get("answerable") and a.get("contains") and not a.get("refused"):
                    model_answers[q["id"]] = a["prediction"]
                    break
    highlighter = None
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    if args.semantic:
        from configs import load_settings
        from retrieval.embeddings import Embedder

        highlighter = QuestionHighlighter(Embedder.from_settings(load_settings()), cache_size=1_000_000)
    methods = ["answer: bigrams", "answer: content", "question: bigrams", "question: key terms"]
    if highlighter is not None:
        methods += ["question: semantic"] + [f"question: semantic + key terms ({w:g})" for w in weights]
    hits = {m: 0 for m in methods}
    single = {m: 0 for m in methods}      # among questions whose answer lies inside one sentence
    n = n_single = 0
    for q in ds.questions:
        if args.answers and q.id not in model_answers:
            continue
        passage = ds.passages[q.positives[0]].text
        sentences = split_sentences(passage)
        if not sentences:
            continue
        answer = model_answers.get(q.id) or q.answer[0][0]
        n += 1
        picks = {"answer: bigrams": _first_bigram(sentences, answer),
                 "answer: content": best_sentence_index(sentences, answer),
                 "question: bigrams": _first_bigram(sentences, q.query),
                 "question: key terms": _by_terms(sentences, q.query)}
        if highlighter is not None:
            sem = highlighter.scores(q.query, sentences, terms=False)
            words = highlighter.scores(q.query, sentences, semantic=False)
            picks["question: semantic"] = pick(sentences, sem)
            for w in weights:
                picks[f"question: semantic + key terms ({w:g})"] = pick(sentences, sem + w * words)
        one = any(contains_any_answer(s, q.answer) for s in sentences)
        n_single += one
        for m, i in picks.items():
            ok = i is not None and contains_any_answer(sentences[i], q.answer)
            hits[m] += ok
            single[m] += ok and one
    src = f"model answers from {args.answers}" if args.answers else "reference answers"
    print(f"{n} questions ({src}), {n_single} with the answer inside one sentence; share whose highlighted "
          "sentence contains a reference answer")
    print(f"| method | all {n} | answer inside one sentence ({n_single}) |")
    print("|---|---|---|")
    for m in methods:
        print(f"| {m} | {hits[m] / max(1, n):.3f} | {single[m] / max(1, n_single):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
