"""Retrieval under topical noise: BM25 tokenisations and fusions on CMRC trial, with and without near-miss passages.

    .venv/bin/python -m bench.retrieval_noise                 # all 256 paragraphs + one near-miss per paragraph
    .venv/bin/python -m bench.retrieval_noise --passages 60

The near-miss of a paragraph is the paragraph without the sentences holding an answer to any of its questions
(bench/eval/noise.py): same title, topic, names and numbers, no answer. Hit = a hit of the question's own paragraph
that contains a reference answer (bench.retrieval_cmrc.first_hit_rank), threshold off. Prints hit@1/5 and MRR@10
per BM25 tokenisation (jieba words, CJK character bigrams, both) for BM25 alone and for hybrid with each fusion, and
the same split by whether dense and BM25 agree on their first result.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.eval.datasets import Passage as EvalPassage
from bench.eval.datasets import Question as EvalQuestion
from bench.eval.noise import near_miss_passages
from bench.retrieval_cmrc import Passage, build_kb, first_hit_rank, read_cmrc, summarise
from configs import load_settings
from retrieval.bm25 import BM25Index, char_bigrams, tokenize, word_tokens
from retrieval.hits import position_map
from retrieval.retriever import HybridSearcher, _Prepared

TOKENIZERS = {"words": word_tokens, "bigrams": char_bigrams, "words+bigrams": tokenize}
FUSIONS = ("weighted", "rrf", "adaptive")


def _near_misses(passages: Sequence[Passage], questions: Sequence) -> list[Passage]:
    from bench.eval.datasets import EvalSet

    ds = EvalSet("cmrc", {p.id: EvalPassage(p.id, p.text) for p in passages},
                 [EvalQuestion(f"q{i}", q.text, (q.answers,), (q.passage_id,)) for i, q in enumerate(questions)])
    return [Passage(p.id + ".txt", p.text) for p in near_miss_passages(ds, ds.questions)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=None, help="first N paragraphs (default all 256)")
    ap.add_argument("--no-noise", action="store_true", help="without the near-miss passages")
    ap.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="subset of " + ",".join(TOKENIZERS))
    ap.add_argument("--fusions", default=",".join(FUSIONS), help="subset of " + ",".join(FUSIONS))
    args = ap.parse_args(argv)
    settings = load_settings()
    passages, questions = read_cmrc(limit=args.passages)
    noise = [] if args.no_noise else _near_misses(passages, questions)
    kb = build_kb(list(passages) + noise, settings)
    print(f"{len(passages)} paragraphs + {len(noise)} near-miss passages -> {len(kb.chunks)} chunks; "
          f"{len(questions)} questions")
    searcher = HybridSearcher(settings.retrieval, kb.embedder)
    by_pos = position_map(kb.chunks)
    rows: dict[str, list] = {}
    tokenizers = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
    for tok_name in tokenizers:
        prepared = _Prepared(bm25=BM25Index(kb.chunks, tokenizer=TOKENIZERS[tok_name]), by_position=by_pos)
        configs = [("bm25", None)] + [("hybrid", f) for f in fusions]
        if tok_name == tokenizers[0]:
            configs = [("dense", None)] + configs
        for q in questions:
            for mode, fusion in configs:
                res = searcher.search_chunks(q.text, kb.chunks, kb.index, prepared=prepared, k=10, mode=mode,
                                             threshold=-1.0, fusion_method=fusion)
                name = mode if mode == "dense" else f"{mode}:{tok_name}" + (f":{fusion}" if fusion else "")
                rows.setdefault(name, []).append(first_hit_rank(res.hits, kb.chunks, q))
    # agree: dense and BM25 (words + bigrams) put the same file first
    dense_first = []
    for q in questions:
        res = searcher.search_chunks(q.text, kb.chunks, kb.index, k=1, mode="dense", threshold=-1.0)
        dense_first.append(res.hits[0].source if res.hits else None)
    prepared = _Prepared(bm25=BM25Index(kb.chunks, tokenizer=tokenize), by_position=by_pos)
    bm25_first = []
    for q in questions:
        res = searcher.search_chunks(q.text, kb.chunks, kb.index, prepared=prepared, k=1, mode="bm25", threshold=-1.0)
        bm25_first.append(res.hits[0].source if res.hits else None)
    agree = [d == b for d, b in zip(dense_first, bm25_first, strict=True)]
    kb.embedder.save()
    cols = ("hit@1", "hit@5", "mrr@10")
    n_agree = sum(agree)
    print(f"\n| config | {' | '.join(cols)} | hit@1 agree (n={n_agree}) | hit@1 disagree (n={len(agree) - n_agree}) |")
    print("|---|" + "---|" * (len(cols) + 2))
    for name, ranks in rows.items():
        s = summarise(ranks)
        a = summarise([r for r, g in zip(ranks, agree, strict=True) if g])
        d = summarise([r for r, g in zip(ranks, agree, strict=True) if not g])
        print(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + f" | {a['hit@1']:.3f} | {d['hit@1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
