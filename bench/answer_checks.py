"""Candidate checks after the grounding check, scored on the answers of a finished `bench.evaluate --noise` run.

    .venv/bin/python -m bench.answer_checks REPORT.json                       # the e5 evidence similarity only
    .venv/bin/python -m bench.answer_checks REPORT.json --config greedy --self-check   # + the model asked to verify

An end-to-end run (bench.evaluate --noise, docs/benchmarks.md §10.5) stores, per question, the answer and the passages
the model was given. This script takes the answers that passed grounding.check_answer and asks what a further check
would do to both refusal rates, before it is built into the product:
  evidence similarity  the e5 cosine between the question (query encoding) and the sentence the check found as the
                       answer's support (passage encoding): a near-miss answer's support is about the topic, not the
                       asked fact. Printed: the values on answerable and unanswerable questions, and for each
                       threshold how many answers of each side it would turn into refusals.
  self-check           (--self-check) the configured LLM is asked, greedily, whether its support sentence (with its
                       neighbours and the passage title) states what the question asks: 「…只回答“是”或“否”」; an answer
                       judged 否 would become a refusal. Costs one short prompt per answer.
  re-extraction        (--re-extract) the configured LLM is asked the question again with only the support window as
                       the 「已知信息」 (the second pass's strict extraction template, extract_answer): a refusal there,
                       or an extraction that shares little with the answer (character F1 < 0.3), would turn the answer
                       into a refusal. A near miss holds the topic's words but not the asked fact, so the strict
                       prompt on that one sentence may refuse where the long prompt answered. One short prompt each.
  refusal probability  (--refusal-prob, llama.cpp engine) the model's own log-probability of the template's
                       refusal sentence 「根据已知信息无法回答该问题」 after the prompt that produced the answer, and
                       of the answer it gave (mean per token): a model that almost refused may be less sure of a
                       near miss than of a read-off fact. Costs the prompt's prefill again plus ~30 decoding steps
                       per answer; in the product only the steps (the prompt's cache is live when the answer ends).
A check is worth adopting only where it turns many more unanswerable answers than answerable ones into refusals.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SELF_CHECK = ("资料：\n{window}\n\n问题：{question}\n回答：{answer}\n\n"
              "请判断：上面的资料是否明确写出了这个问题所问的内容，并且回答与资料一致？只回答“是”或“否”。")


def support_window(passage: str, sentence: str) -> str:
    """The support sentence with its neighbours (grounding.retry.candidate_window, as the second pass sees them), and
    the passage's title line when it is short and not in them."""
    from grounding.retry import candidate_window

    window = candidate_window(passage, sentence)
    title = passage.split("\n", 1)[0].strip() if "\n" in passage else ""
    return f"{title}\n{window}" if title and len(title) <= 30 and title not in window else window


def passed_answers(report: dict, config: str) -> list[dict]:
    """Answers (not refusals) of `config` that pass grounding.check_answer, with their support sentence."""
    from grounding.check import check_answer

    out = []
    for q in report["questions"]:
        a = (q.get("answers") or {}).get(config)
        if not a or a.get("prediction") is None or a["refused"]:
            continue
        verdict = check_answer(a["prediction"], q["query"], a["source_texts"])
        if not verdict.ok or verdict.source is None:
            continue
        passage = a["source_texts"][verdict.source - 1]
        sentence = verdict.evidence.get(verdict.source) or passage[:200]
        out.append({"answerable": q["answerable"], "question": q["query"], "answer": a["prediction"],
                    "sentence": sentence, "window": support_window(passage, sentence),
                    "sources": list(a["source_texts"])})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the JSON report of a bench.evaluate --noise run")
    ap.add_argument("--config", default=None, help="which configuration's answers (default: the first)")
    ap.add_argument("--self-check", action="store_true", help="also ask the configured LLM to verify each answer")
    ap.add_argument("--refusal-prob", action="store_true",
                    help="also score the refusal sentence's and the answer's log-probability (llama.cpp engine)")
    ap.add_argument("--re-extract", action="store_true",
                    help="also ask the configured LLM the question again on the support window alone")
    args = ap.parse_args(argv)

    import numpy as np

    from configs import load_settings
    from retrieval.embeddings import Embedder

    report = json.loads(args.report.read_text(encoding="utf-8"))
    config = args.config or report["configs"][0]["name"]
    rows = passed_answers(report, config)
    n_a = sum(r["answerable"] for r in rows)
    print(f"{args.report.name} [{config}]: {len(rows)} answers passed the grounding check "
          f"({n_a} answerable, {len(rows) - n_a} unanswerable)")
    settings = load_settings()
    emb = Embedder.from_settings(settings)
    sentences = np.asarray(emb.encode_passages([r["sentence"] for r in rows]), dtype=np.float32).reshape(len(rows), -1)
    for r, vec in zip(rows, sentences, strict=True):
        r["similarity"] = float(vec @ np.asarray(emb.encode_query(r["question"]), dtype=np.float32).reshape(-1))
    for side, flag in (("answerable", True), ("unanswerable", False)):
        vals = sorted(round(r["similarity"], 3) for r in rows if r["answerable"] == flag)
        print(f"evidence similarity, {side}: {vals}")
    print("| threshold | answerable answers refused | unanswerable answers refused |\n|---|---|---|")
    for t in (0.85, 0.86, 0.87, 0.88, 0.89, 0.90):
        a = sum(r["similarity"] < t for r in rows if r["answerable"])
        u = sum(r["similarity"] < t for r in rows if not r["answerable"])
        print(f"| {t:.2f} | {a} of {n_a} | {u} of {len(rows) - n_a} |")

    if args.self_check:
        from llm.loader import load_llm
        from llm.types import GenerationParams

        llm = load_llm(settings)
        gen = GenerationParams.from_settings(settings.llm, max_new_tokens=3, temperature=0)
        for r in rows:
            prompt = SELF_CHECK.format(window=r["window"], question=r["question"], answer=r["answer"])
            r["self_check"] = "".join(llm.stream([{"role": "user", "content": prompt}], gen)).strip()
        a = sum(not r["self_check"].startswith("是") for r in rows if r["answerable"])
        u = sum(not r["self_check"].startswith("是") for r in rows if not r["answerable"])
        print(f"self-check ({llm.info.name}): judged 否 on {a} of {n_a} "
              f"answerable and {u} of {len(rows) - n_a} unanswerable answers")
    if args.refusal_prob:
        refusal_probability(rows, settings, n_a)
    if args.re_extract:
        from bench.eval.metrics import char_f1
        from grounding.check import looks_like_refusal
        from llm.loader import load_llm
        from llm.types import GenerationParams
        from prompts.builder import build_prompt_from_settings
        from prompts.template_files import load_template
        from retrieval.types import Hit

        llm = load_llm(settings)
        gen = GenerationParams.from_settings(settings.llm, max_new_tokens=48, temperature=0)
        template = load_template("extract_answer")
        for r in rows:      # the prompt the service's second pass builds (app.service.QAService.second_pass)
            hit = Hit(text=r["window"], score=1.0, source="passage.txt", chunk_ids=(0,))
            built = build_prompt_from_settings(r["question"], [hit], [], settings, llm.count_tokens,
                                               template=template, history_turns=0, max_new_tokens=gen.max_new_tokens,
                                               max_context_tokens=llm.info.max_context_tokens)
            r["re_extract"] = "".join(llm.stream(built.messages, gen)).strip()
            r["re_refused"] = looks_like_refusal(r["re_extract"])
            r["re_f1"] = 0.0 if r["re_refused"] else char_f1(r["re_extract"], ((r["answer"],),))
            print(json.dumps({k: r[k] for k in ("answerable", "question", "answer", "re_extract", "re_f1")},
                             ensure_ascii=False), flush=True)
        for name, test in (("refused", lambda r: r["re_refused"]), ("F1 < 0.3", lambda r: r["re_f1"] < 0.3)):
            a = sum(test(r) for r in rows if r["answerable"])
            u = sum(test(r) for r in rows if not r["answerable"])
            print(f"re-extraction ({llm.info.name}) {name}: {a} of {n_a} answerable, {u} of {len(rows) - n_a} "
                  f"unanswerable answers")
    return 0


def sequence_logprobs(model: Any, prompt: list[int], seq: list[int]) -> list[float]:
    """log P(seq[i] | prompt + seq[:i]) from llama.cpp, with the prompt already in its cache."""
    import numpy as np

    llama = model.llama
    llama.n_tokens = len(prompt) - 1           # decode the prompt's last token again (eval drops the cache after it)
    llama.eval([prompt[-1]])
    out = []
    for tok in seq:
        logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).astype(np.float64)
        m = logits.max()
        out.append(float(logits[tok] - m - np.log(np.exp(logits - m).sum())))
        llama.eval([tok])
    return out


def refusal_probability(rows: list[dict], settings: Any, n_a: int) -> None:
    """--refusal-prob: per answer, log P(refusal sentence | prompt) and the answer's mean token log-probability,
    with the prompt the service built for it (the default template, the passages the model was given)."""
    import statistics

    from llm.loader import load_llm
    from prompts.builder import build_prompt_from_settings
    from retrieval.types import Hit

    llm = load_llm(settings)
    if not hasattr(llm, "llama"):
        raise SystemExit("--refusal-prob needs the llama.cpp engine (llm.backend: llamacpp)")
    llama = llm.llama
    refusal = llama.tokenize("根据已知信息无法回答该问题".encode(), add_bos=False, special=False)
    for r in rows:
        hits = [Hit(text=t, score=1.0, source=f"p{i}.txt", chunk_ids=(i,)) for i, t in enumerate(r["sources"])]
        built = build_prompt_from_settings(r["question"], hits, [], settings, llm.count_tokens,
                                           max_new_tokens=64, max_context_tokens=llm.info.max_context_tokens,
                                           context_tokens=llm.info.max_context_tokens)
        prompt = llm.encode_messages(built.messages)
        llama.reset()
        if llm.prefill is not None:
            llm.prefill.read(llama, prompt)
        llama.eval(prompt[llama.n_tokens:])
        r["lp_refusal"] = sum(sequence_logprobs(llm, prompt, refusal))
        answer = llama.tokenize(r["answer"].encode(), add_bos=False, special=False)
        r["lp_answer"] = statistics.fmean(sequence_logprobs(llm, prompt, answer)) if answer else 0.0
        print(json.dumps({k: r[k] for k in ("answerable", "question", "answer", "lp_refusal", "lp_answer")},
                         ensure_ascii=False), flush=True)
    for key in ("lp_refusal", "lp_answer"):
        for side, flag in (("answerable", True), ("unanswerable", False)):
            vals = sorted(round(r[key], 2) for r in rows if r["answerable"] == flag)
            print(f"{key}, {side}: {vals}")
    print("| signal | threshold | answerable answers refused | unanswerable answers refused |\n|---|---|---|---|")
    for key, sign in (("lp_refusal", 1), ("lp_answer", -1)):
        values = sorted({round(r[key], 1) for r in rows})
        for t in values[:: max(1, len(values) // 12)]:
            hit = [(r["answerable"]) for r in rows if sign * r[key] >= sign * t]
            a, u = sum(hit), len(hit) - sum(hit)
            print(f"| {key} {'≥' if sign > 0 else '≤'} | {t:.1f} | {a} of {n_a} | {u} of {len(rows) - n_a} |")


if __name__ == "__main__":
    sys.exit(main())
