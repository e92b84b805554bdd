"""The grounding check and the refusal signals on CMRC trial's noise mode, without an LLM.

    .venv/bin/python -m bench.grounding_noise              # all 256 paragraphs + their near-misses, 1,000 questions
    .venv/bin/python -m bench.grounding_noise --passages 60

The knowledge base is the one of bench.retrieval_noise (every paragraph plus a near-miss copy without its answer
sentences; vectors cached). Each question is searched twice with the product's HybridSearcher:
  answerable    as is (its paragraph is there)
  unanswerable  its own paragraph's hits removed (the near-miss and the other paragraphs of the article stay)
and each result gets a stand-in answer:
  right answer   「<reference>。」 — what a model answering correctly says at the least
  noise answer   a number/date (or, for other references, a name) from the best remaining passage that is not the
                 reference: the near-miss a model picks when the answer is missing (another year, another name)
Printed: how often the grounding check (grounding.check_answer) fails the right answer (it would become a false
refusal) and fails the noise answer (a refusal that should happen), per failure kind; and for the retrieval
signals (best dense cosine, key-term coverage of the best passage, dense/BM25 agreement) the refusal rates each
threshold would give on both sides. The stand-in answers make this a measurement of the check and the signals,
not of a model: the end-to-end numbers come from bench.evaluate --noise.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from bench.retrieval_cmrc import build_kb, read_cmrc
from bench.retrieval_noise import _near_misses
from configs import load_settings
from grounding.check import check_answer
from grounding.claims import extract_claims, normalize
from grounding.evidence import key_term_coverage, key_terms, missing_names, term_in
from retrieval.retriever import HybridSearcher
from retrieval.sentences import split_sentences


def _noise_answer(reference: str, passage: str) -> str | None:
    """A claim of the reference's kind from `passage` that is not the reference (None when there is none)."""
    ref_claims = extract_claims(reference)
    kinds = {c.kind for c in ref_claims} or {"entity"}
    ref_norm = normalize(reference)
    for c in extract_claims(passage):
        if c.kind in kinds and c.text not in ref_norm and ref_norm not in c.text:
            return c.text + "。"
    return None


def window_key_term_coverage(question: str, passage: str, *, width: int = 3, title: bool = True) -> float:
    """The best share of the question's key terms written within `width` consecutive sentences of `passage` (plus its
    first line when `title`: the subject a passage is about is often named only there); 1.0 when the question has
    fewer than two key terms. A passage that mentions the asked things far apart, e.g. a near-miss copy with the
    answer sentence gone, scores lower here than in key_term_coverage."""
    terms = key_terms(question)
    if len(terms) < 2:
        return 1.0
    sents = split_sentences(passage) or [passage]
    head = normalize(passage.split("\n", 1)[0]) if title and "\n" in passage else ""
    best = 0
    for i in range(max(1, len(sents) - width + 1)):
        text = head + normalize("".join(sents[i:i + width]))
        best = max(best, sum(term_in(t, text) for t in terms))
    return best / len(terms)


def _signals(question: str, hits: Sequence) -> tuple:
    """(best dense, key-term coverage of the best passage, dense/BM25 agree on it, best coverage of any passage,
    best coverage within 3 sentences (+ the first line) of any passage, the same within 1 and 2 sentences, a name
    of the question written in none of the passages)."""
    covs = [key_term_coverage(question, h.text) for h in hits]
    bm = [h.bm25_score or 0.0 for h in hits]
    de = [h.dense_score or 0.0 for h in hits]
    win = [max(window_key_term_coverage(question, h.text, width=w) for h in hits) for w in (3, 1, 2)]
    names = bool(missing_names(question, [h.text for h in hits]))
    return (de[0], covs[0], bm[0] == max(bm) and de[0] == max(de) and bm[0] > 0, max(covs), *win, names)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=None)
    ap.add_argument("--k", type=int, default=5, help="passages given to the (stand-in) model (retrieval.top_k)")
    args = ap.parse_args(argv)
    settings = load_settings()
    passages, questions = read_cmrc(limit=args.passages)
    kb = build_kb(list(passages) + _near_misses(passages, questions), settings)
    searcher = HybridSearcher(settings.retrieval, kb.embedder)
    prepared = kb.prepared()
    right_fail, noise_fail = Counter(), Counter()
    sweep = (0.0, 0.2, 0.25, 0.34, 0.5)
    right_sweep, noise_sweep = Counter(), Counter()     # ungrounded per relevance threshold
    n_right = n_noise = 0
    sig_a, sig_u = [], []
    for q in questions:
        res = searcher.search_chunks(q.text, kb.chunks, kb.index, prepared=prepared, k=args.k + 5, threshold=-1.0)
        hits = res.hits
        own = [h for h in hits if h.source == q.passage_id]
        rest = [h for h in hits if h.source != q.passage_id][: args.k]
        given = hits[: args.k]
        if own and any(a in own[0].text for a in q.answers):
            n_right += 1
            docs = [h.source for h in given]
            r = check_answer(q.answers[0] + "。", q.text, [h.text for h in given], documents=docs)
            for t in sweep:
                right_sweep[t] += not check_answer(q.answers[0] + "。", q.text, [h.text for h in given],
                                                   min_relevance=t, documents=docs).ok
            for kind in {f.kind for f in r.failures} or {"ok"}:
                right_fail[kind] += 1
            right_fail["any"] += not r.ok
            sig_a.append(_signals(q.text, given))
        if rest:
            sig_u.append(_signals(q.text, rest))
            wrong = _noise_answer(q.answers[0], rest[0].text)
            if wrong is None:
                continue
            n_noise += 1
            docs = [h.source for h in rest]
            r = check_answer(wrong, q.text, [h.text for h in rest], documents=docs)
            for t in sweep:
                noise_sweep[t] += not check_answer(wrong, q.text, [h.text for h in rest], min_relevance=t,
                                                   documents=docs).ok
            for kind in {f.kind for f in r.failures} or {"ok"}:
                noise_fail[kind] += 1
            noise_fail["any"] += not r.ok
    kb.embedder.save()
    print(f"{len(questions)} questions; right answers checked {n_right}, noise answers checked {n_noise}")
    print("\n| failure kind | right answers failed (→ false refusal) | noise answers failed (→ refusal) |")
    print("|---|---|---|")
    for kind in ("any", "number", "date", "entity", "name", "constraint", "relevance", "wording", "empty", "citation"):
        rf, nf = right_fail[kind] / max(1, n_right), noise_fail[kind] / max(1, n_noise)
        print(f"| {kind} | {rf:.3f} | {nf:.3f} |")
    print("\n| relevance threshold (grounding.check.MIN_RELEVANCE) | right answers failed | noise answers failed |")
    print("|---|---|---|")
    for t in sweep:
        rs, ns = right_sweep[t] / max(1, n_right), noise_sweep[t] / max(1, n_noise)
        print(f"| {t} | {rs:.3f} | {ns:.3f} |")
    print("\nRetrieval signals: refuse below the threshold (agreement: when the two lists disagree).")
    print(f"| signal | threshold | false refusal (answerable, n={len(sig_a)}) | "
          f"refusal (gold removed, n={len(sig_u)}) |")
    print("|---|---|---|---|")
    for t in (0.86, 0.87, 0.88, 0.89, 0.90):
        print(f"| best dense | {t} | {sum(s[0] < t for s in sig_a) / len(sig_a):.3f} | "
              f"{sum(s[0] < t for s in sig_u) / len(sig_u):.3f} |")
    for t in (0.34, 0.5, 0.67, 0.8, 1.0):
        print(f"| key-term coverage | {t} | {sum(s[1] < t for s in sig_a) / len(sig_a):.3f} | "
              f"{sum(s[1] < t for s in sig_u) / len(sig_u):.3f} |")
    for t in (0.34, 0.5, 0.67):
        print(f"| key-term coverage, best of the {args.k} passages | {t} | "
              f"{sum(s[3] < t for s in sig_a) / len(sig_a):.3f} | "
              f"{sum(s[3] < t for s in sig_u) / len(sig_u):.3f} |")
    for col, width in ((4, 3), (6, 2), (5, 1)):
        for t in (0.34, 0.5, 0.67, 0.75, 1.0):
            print(f"| key-term coverage within {width} sentence(s) (+ first line), best of the {args.k} | {t} | "
                  f"{sum(s[col] < t for s in sig_a) / len(sig_a):.3f} | "
                  f"{sum(s[col] < t for s in sig_u) / len(sig_u):.3f} |")
        for t in (0.5, 0.67):
            both_a = sum(s[3] < 0.5 or s[col] < t for s in sig_a) / len(sig_a)
            both_u = sum(s[3] < 0.5 or s[col] < t for s in sig_u) / len(sig_u)
            print(f"| coverage (best of {args.k}) < 0.5 or within {width} < {t} | – | {both_a:.3f} | {both_u:.3f} |")
    for t in (0.5,):
        both_a = sum(s[3] < t or s[0] < 0.86 for s in sig_a) / len(sig_a)
        both_u = sum(s[3] < t or s[0] < 0.86 for s in sig_u) / len(sig_u)
        print(f"| best dense < 0.86 or coverage (best of {args.k}) < {t} | – | {both_a:.3f} | {both_u:.3f} |")
    print(f"| a name of the question (grounding.missing_names) in none of the {args.k} | – | "
          f"{sum(s[7] for s in sig_a) / len(sig_a):.3f} | {sum(s[7] for s in sig_u) / len(sig_u):.3f} |")
    both_a = sum(s[3] < 0.5 or s[0] < 0.86 or s[7] for s in sig_a) / len(sig_a)
    both_u = sum(s[3] < 0.5 or s[0] < 0.86 or s[7] for s in sig_u) / len(sig_u)
    print(f"| best dense < 0.86 or coverage (best of {args.k}) < 0.5 or a name missing | – | {both_a:.3f} | "
          f"{both_u:.3f} |")
    print(f"| dense/BM25 agree | – | {sum(not s[2] for s in sig_a) / len(sig_a):.3f} | "
          f"{sum(not s[2] for s in sig_u) / len(sig_u):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
