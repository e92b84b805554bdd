"""The key-term refusal rule on paraphrased questions: how often would it refuse a question that does not reuse the
document's words?

    .venv/bin/python -m bench.paraphrase_coverage

bench/data/cmrc_paraphrased.jsonl holds 24 CMRC trial questions (a random sample, seed 7) with a paraphrase written
by hand for each (same meaning, the names kept, other words: 「耶律留哥死后，谁统治辽东？」 →
「耶律留哥去世以后，辽东由谁掌管？」). Both are scored against the question's own gold paragraph — the best case
for the rule: a question refused here is refused whatever retrieval finds. Prints the share refused by
`retrieval.min_key_term_coverage` and by `retrieval.require_names` (no LLM, no embedding model).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.corpus import CMRC_TRIAL
from bench.eval.datasets import read_eval_set
from configs import load_settings
from grounding.evidence import key_term_coverage, key_terms, missing_names

DATA = Path(__file__).parent / "data" / "cmrc_paraphrased.jsonl"


def main() -> int:
    threshold = load_settings().retrieval.min_key_term_coverage
    ds = read_eval_set(CMRC_TRIAL)
    by_id = {q.id: q for q in ds.questions}
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    refused = {"original": 0, "paraphrase": 0}
    named = {"original": 0, "paraphrase": 0}
    for r in rows:
        q = by_id[r["id"]]
        gold = ds.passages[q.positives[0]].text
        for kind, text in (("original", q.query), ("paraphrase", r["paraphrase"])):
            cov = key_term_coverage(text, gold)
            if cov < threshold:
                refused[kind] += 1
                print(f"refused ({kind}, coverage {cov:.2f}): {text}  key terms {key_terms(text)}")
            missing = missing_names(text, [gold])
            if missing:
                named[kind] += 1
                print(f"refused ({kind}, names not in the paragraph {missing}): {text}")
    n = len(rows)
    print(f"\n{n} questions, min_key_term_coverage {threshold}: refused against their own gold paragraph — "
          f"original {refused['original']}/{n} ({refused['original'] / n:.3f}), "
          f"paraphrased {refused['paraphrase']}/{n} ({refused['paraphrase'] / n:.3f})")
    print(f"retrieval.require_names: refused original {named['original']}/{n}, paraphrased {named['paraphrase']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
