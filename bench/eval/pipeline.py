"""One evaluation run: data → files → the product's ingest → retrieval per configuration → answers → report.

Nothing here re-implements the product: files are ingested with `ingest.ingest`, searched with
`retrieval.retriever.HybridSearcher` over `retrieval.store.KnowledgeBase`, and answered by `app.service.QAService`.
"""
from __future__ import annotations

import datetime as dt
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.eval.answer_eval import evaluate_answers
from bench.eval.cache import AnswerCache, Budget, fingerprint
from bench.eval.configs import EvalConfig
from bench.eval.datasets import gold_kept, gold_lost, read_eval_set, sample_questions, split_for_eval, stratified_head
from bench.eval.noise import near_miss_passages, noise_judge
from bench.eval.report import write_report
from bench.eval.retrieval_eval import evaluate_retrieval
from bench.eval.survival import survival_by_format
from bench.eval.writers import FORMATS, write_corpus
from bench.machine import describe_machine


@dataclass
class RunOptions:
    data: Path
    configs: list[EvalConfig]
    out_dir: Path
    stem: str = "report"
    limit: int | None = 200                 # questions for retrieval
    answer_limit: int | None = 20           # of those, questions sent through the LLM (per answering config)
    max_new_tokens: int = 64                # CMRC answers are short; 512 would make a CPU run take hours
    unanswerable_share: float = 0.2
    max_passages: int | None = None
    seed: int = 0
    noise: bool = False                     # add same-topic near-miss passages (bench.eval.noise)
    formats: tuple[str, ...] = FORMATS
    work_dir: Path | None = None            # None: a temporary folder, removed afterwards
    command: str = ""
    notes: list[str] = field(default_factory=list)
    answer_cache: Path | None = None        # JSONL of raw answers (bench.eval.cache): resume, split into batches
    answer_batch: int | None = None         # at most this many questions through the LLM in this call


def _say(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def _reuse_corpus(corpus: Path, index: Path, passages: list, formats: tuple[str, ...]) -> dict | None:
    """The files of an earlier run in the same --work-dir when they hold the same passages in the same formats
    (so the product's incremental ingest skips them), else None."""
    try:
        saved = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = {name: tuple(v) for name, v in saved.get("files", {}).items()}
    same = (saved.get("formats") == list(formats) and sorted(pid for pid, _ in files.values()) ==
            sorted(p.id for p in passages) and all((corpus / name).is_file() for name in files))
    return files if same else None


def _ask_fn(service: Any, kb_name: str, max_new_tokens: int) -> Callable[[str], Any]:
    """How the evaluation asks the service one question: no history, the run's answer length."""
    from app.service import AnswerParams

    params = AnswerParams(max_new_tokens=max_new_tokens)
    return lambda question: service.answer(question, kb_name, [], params)


def run(opts: RunOptions) -> dict[str, Any]:
    """Run the whole evaluation and write <stem>.json/.md/_hit_at_k.png into opts.out_dir; returns the result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ingest import ingest
    from retrieval.retriever import HybridSearcher
    from retrieval.store import KBIncompatibleError, KnowledgeBase

    ds = read_eval_set(opts.data)
    split = split_for_eval(ds, unanswerable_share=opts.unanswerable_share, max_passages=opts.max_passages,
                           seed=opts.seed)
    una_ids = {q.id for q in split.unanswerable}
    questions = sample_questions(split, opts.limit, seed=opts.seed)
    answer_qs = stratified_head(questions, una_ids, opts.answer_limit)
    near_miss = near_miss_passages(ds, questions) if opts.noise else []
    split.kb_passages.extend(near_miss)
    _say(f"{ds.name}: {len(ds.passages)} passages, {len(ds.questions)} questions; knowledge base "
         f"{len(split.kb_passages)} passages, {len(split.unanswerable)} unanswerable; evaluating {len(questions)} "
         f"({len(answer_qs)} through the LLM)")

    temp = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="zhiwen-eval-")) if temp else opts.work_dir
    corpus = work / "corpus"
    corpus_index = work / "corpus.json"
    result: dict[str, Any] = {
        "title": f"Zhiwen evaluation — {ds.name}", "command": opts.command, "machine": describe_machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dataset": {"path": str(opts.data), "name": ds.name, "passages": len(ds.passages),
                    "questions": len(ds.questions), "skipped": ds.skipped, "kb_passages": len(split.kb_passages),
                    "held_out": len(split.held_out), "split_questions": len(split.questions),
                    "gold_kept": gold_kept(split), "gold_lost": gold_lost(split), "near_miss": len(near_miss),
                    "unanswerable": len(split.unanswerable), "unanswerable_share": opts.unanswerable_share,
                    "sampled": len(questions), "answer_sampled": len(answer_qs), "seed": opts.seed,
                    "formats": list(opts.formats)},
        "configs": [], "questions": [], "notes": list(opts.notes),
    }
    try:
        t0 = time.perf_counter()
        files = _reuse_corpus(corpus, corpus_index, split.kb_passages, opts.formats)
        reused = files is not None
        if files is None:
            if corpus.exists():
                shutil.rmtree(corpus)
            files = write_corpus(split.kb_passages, corpus, opts.formats)
            corpus_index.write_text(json.dumps({"formats": list(opts.formats), "files": files}, ensure_ascii=False),
                                    encoding="utf-8")
            _say(f"wrote {len(files)} files in {time.perf_counter() - t0:.1f} s to {corpus}")
        else:
            _say(f"reusing the {len(files)} files already in {corpus} (same passages and formats)")
        passage_of_file = {name: pid for name, (pid, _) in files.items()}

        kbs: dict[tuple, tuple[str, Any]] = {}          # ingest key → (kb name, opened KB)
        embedders: dict[tuple, Any] = {}
        llms: dict[tuple, Any] = {}                     # LLM settings → loaded ChatModel, shared by configurations
        pending: list[tuple] = []                       # configurations whose answers come after all retrieval
        cache = AnswerCache(opts.answer_cache)
        searched: dict[tuple, tuple] = {}              # retrieval results per (KB, embedding, retrieval settings)
        budget = Budget(opts.answer_batch)
        kb_fingerprint = fingerprint(sorted(p.id for p in split.kb_passages), opts.formats)
        per_question: dict[str, dict[str, Any]] = {q.id: {"id": q.id, "query": q.query,
                                                          "answerable": q.id not in una_ids}
                                                   for q in questions}
        for cfg in opts.configs:
            settings = cfg.settings(work / "kb")
            key = cfg.ingest_key()
            if key not in kbs:
                kb_name = f"eval-{len(kbs)}"
                _say(f"[{cfg.name}] ingesting {len(files)} files into {kb_name} "
                     f"(chunk {settings.ingest.chunk_size}/{settings.ingest.chunk_overlap})")
                t0 = time.perf_counter()
                try:
                    report = ingest(corpus, kb_name, settings, rebuild=not reused)
                except KBIncompatibleError:   # the kept KB was built with another model or chunking: start over
                    report = ingest(corpus, kb_name, settings, rebuild=True)
                ingest_s = time.perf_counter() - t0
                kb = KnowledgeBase.open(kb_name, settings)
                failed = [Path(f.path).name for f in report.files if f.status == "failed"]
                _say(f"[{cfg.name}] {len(kb.chunks)} chunks in {ingest_s:.1f} s; {len(failed)} files failed")
                surv = survival_by_format(corpus, files, {p.id: p for p in split.kb_passages}, split.answerable,
                                          kb.chunks, settings, failed=failed)
                kbs[key] = (kb_name, kb, {"seconds": ingest_s, "chunks": len(kb.chunks), "failed": failed,
                                          "survival": surv})
                if "parse" not in result:
                    result["parse"] = {"by_format": surv, "config": cfg.name}
            kb_name, kb, ingest_info = kbs[key]

            mode = settings.retrieval.mode
            emb_key = tuple(sorted(settings.embedding.model_dump().items()))
            embedder = None
            if mode != "bm25":
                if emb_key not in embedders:
                    from retrieval.embeddings import Embedder

                    embedders[emb_key] = Embedder.from_settings(settings)
                    embedders[emb_key].warm_up()        # model loading is not query latency
                embedder = embedders[emb_key]
            searcher = HybridSearcher(settings.retrieval, embedder)
            r_key = (key, emb_key, json.dumps(settings.retrieval.model_dump(), sort_keys=True))
            if r_key in searched:       # configurations that differ only in the LLM or prompt search alike
                r_summary, r_rows = searched[r_key]
            else:
                _say(f"[{cfg.name}] retrieval on {len(questions)} questions ({mode})")
                r_summary, r_rows = evaluate_retrieval(searcher, kb, questions, una_ids, passage_of_file, mode=mode,
                                                       threshold=settings.retrieval.score_threshold)
                searched[r_key] = (r_summary, r_rows)
            entry: dict[str, Any] = {"name": cfg.name, "params": cfg.params(settings), "kb": kb_name,
                                     "ingest": {k: v for k, v in ingest_info.items() if k != "survival"},
                                     "retrieval": r_summary, "answers": None}
            for row in r_rows:
                per_question[row["id"]].setdefault("retrieval", {})[cfg.name] = {
                    k: row[k] for k in ("strict_rank", "loose_rank", "evidence", "best_dense", "top_sources")}
            s = r_summary["strict"]
            _say(f"[{cfg.name}] strict hit@1 {s['hit@1']:.3f} hit@5 {s['hit@5']:.3f} MRR@10 {s['mrr@10']:.3f}; "
                 f"p50 {r_summary['latency_ms']['p50']:.1f} ms")

            result["configs"].append(entry)
            pending.append((entry, cfg, settings, kb_name, embedder))
            result["questions"] = list(per_question.values())
            write_report(result, opts.out_dir, opts.stem)   # a long run leaves a report after every step

        # The LLM last: on a slow CPU it dominates, and the retrieval numbers are already on disk by then.
        for entry, cfg, settings, kb_name, embedder in pending:
            if cfg.answer and answer_qs:
                judge = noise_judge(ds, passage_of_file, {p.id: p.text for p in split.kb_passages})
                entry["answers"] = _answers(cfg, settings, kb_name, answer_qs, una_ids, per_question, embedder,
                                            llms, opts.max_new_tokens, judge,
                                            first=not any(c.get("answers") for c in result["configs"]),
                                            cache=cache, budget=budget, kb_fingerprint=kb_fingerprint)
                if entry["answers"].get("pending"):
                    result["partial"] = True
                result["questions"] = list(per_question.values())
                write_report(result, opts.out_dir, opts.stem)
        result["models"] = {"embedding": ", ".join(sorted({c["params"]["embedding"] for c in result["configs"]}))}
        llms = {c["answers"]["llm"].get("name", "") for c in result["configs"]
                if c["answers"] and c["answers"].get("llm")}
        if llms:
            result["models"]["llm"] = ", ".join(sorted(llms))
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    paths = write_report(result, opts.out_dir, opts.stem)
    _say("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


def _answers(cfg: EvalConfig, settings: Any, kb_name: str, answer_qs: list, una_ids: set[str],
             per_question: dict[str, dict[str, Any]], embedder: Any, llms: dict[tuple, Any], max_new_tokens: int,
             judge: Any, first: bool, cache: AnswerCache | None = None, budget: Budget | None = None,
             kb_fingerprint: str = "") -> dict[str, Any]:
    from app.service import AnswerParams, QAService
    from bench.eval.answer_eval import looks_like_refusal, timed_stream
    from grounding.check import check_answer, template_checks
    from llm import GenerationParams
    from prompts import load_template
    from retrieval.types import Hit

    template = load_template(settings.prompt.template)
    asks = template_checks(template)            # as the service checks: citations / a quote when the template asks
    prompt = settings.prompt.model_dump()
    second = bool(prompt.pop("second_pass", False))    # adds a step after the first answer: shares its answers
    base_key = fingerprint(settings.retrieval.model_dump(), prompt, settings.llm.model_dump(),
                           settings.ingest.chunk_size, settings.ingest.chunk_overlap, settings.embedding.model,
                           max_new_tokens, template, kb_fingerprint)
    config_key = base_key + ("+second-pass" if second else "")
    cache = AnswerCache(None) if cache is None else cache
    todo = [q for q in answer_qs if cache.get(cache.key(config_key, q.id, q.query)) is None]
    llm_key = tuple(sorted(settings.llm.model_dump().items()))
    service = QAService(settings, llm=llms.get(llm_key), embedder=embedder)

    def ask_llm_loaded() -> None:
        llms.clear()
        gc.collect()                            # one LLM in memory at a time
        t0 = time.perf_counter()
        llms[llm_key] = service.llm             # QAService loads it (load_llm)
        _say(f"[{cfg.name}] loaded LLM {llms[llm_key].info.name} in {time.perf_counter() - t0:.1f} s")

    def ask(question: str) -> Any:
        if llm_key not in llms:                 # the first question not in the cache: load the model now
            ask_llm_loaded()
        return _ask_fn(service, kb_name, max_new_tokens)(question)

    def derive(q: Any, base: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The second-pass configuration's answer from the base configuration's cached first answer."""
        if base["service_refused"] or not looks_like_refusal(base["text"]):
            return {**base, "second_pass": None}, False
        hits = [Hit(text=t, score=0.0, source=src, chunk_ids=()) for src, t in zip(base["sources"],
                                                                                   base["source_texts"], strict=False)]
        if llm_key not in llms:
            ask_llm_loaded()
        gen = GenerationParams.from_settings(settings.llm, max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        got = service.second_pass(q.query, hits, gen)
        if got is None:
            return {**base, "second_pass": None}, False
        pieces, info = got
        text, _, _, _ = timed_stream(pieces, t0)
        _say(f"  second pass {q.query[:30]} → {text[:40]!r}")
        return {**base, "text": text, "second_pass": {"first": base["text"], **info},
                "total_s": (base.get("total_s") or 0) + time.perf_counter() - t0}, True

    def check(question: str, text: str, passages: Any, documents: Any = None) -> Any:
        return check_answer(text, question, passages, documents=documents, **asks)

    _say(f"[{cfg.name}] answering {len(answer_qs)} questions through QAService (max {max_new_tokens} new tokens; "
         f"{len(answer_qs) - len(todo)} cached in {cache.path or '-'}, batch {budget.left if budget else 'all'})")
    summary, rows = evaluate_answers(ask, answer_qs, una_ids,
                                     count_tokens=lambda t: llms[llm_key].count_tokens(t) if llm_key in llms else 0,
                                     progress=_say, judge=judge, check=check, cache=cache, config_key=config_key,
                                     budget=budget, base_key=base_key if second else None,
                                     derive=derive if second else None,
                                     gate=lambda question: service.refusal_before_llm(question, kb_name, AnswerParams(
                                         max_new_tokens=max_new_tokens)))
    info = llms[llm_key].info if llm_key in llms else None
    summary["llm"] = ({k: str(getattr(info, k)) for k in ("name", "device", "quantization", "is_demo")
                       if hasattr(info, k)} if info is not None else {"name": settings.llm.demo_model + " (cached)"})
    summary["max_new_tokens"] = max_new_tokens
    summary["temperature"] = settings.llm.temperature
    summary["template"] = settings.prompt.template
    for row in rows:
        pq = per_question[row["id"]]
        pq.setdefault("answers", {})[cfg.name] = {k: row[k] for k in ("prediction", "refused", "em", "f1",
                                                                      "contains", "ttft_s", "tokens", "error",
                                                                      "grounding", "grounding_failures",
                                                                      "refused_grounded", "noise_claims", "cited",
                                                                      "quoted", "quote_found", "second_pass",
                                                                      "service_refused",
                                                                      "sig_coverage", "sig_agree", "sig_dense",
                                                                      "source_texts")
                                               if k in row}
        if first:   # the Markdown's sample table shows the first answering configuration
            pq.update(references=row["references"], prediction=row["prediction"], f1=row["f1"],
                      refused=row["refused"])
    _say(f"[{cfg.name}] EM {summary['em']} F1 {summary['f1']} refusal {summary['refusal_rate']} "
         f"false refusal {summary['false_refusal_rate']}; {summary['answered_now']} answered now, "
         f"{summary['cached']} from the cache, {summary['pending']} pending")
    return summary
