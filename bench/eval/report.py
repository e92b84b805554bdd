"""Turn an evaluation result (a plain dict, also saved as JSON) into Markdown and a hit@k plot.

The result dict's shape (written by bench/evaluate.py, read here and by anyone comparing runs):
  {"title", "command", "machine", "dataset": {...}, "models": {...}, "parse": {"by_format": {fmt: {...}}},
   "configs": [{"name", "params": {...}, "retrieval": {"n", "strict": {"hit@1", ..., "mrr@10"},
                "loose": {...}, "latency_ms": {"p50", "p95"}}, "answers": {...} | None}],
   "questions": [...per-question rows...]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIT_KS: tuple[int, ...] = (1, 3, 5, 10)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}f}"
    return str(v)


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict[str, Any], plot_name: str | None = None) -> str:
    """The report a person reads: what was run, on what, and the numbers side by side."""
    ds, configs = result.get("dataset", {}), result.get("configs", [])
    out = [f"# {result.get('title', 'Zhiwen evaluation')}", ""]
    out += [f"Command: `{result.get('command', '')}`", "",
            f"Machine: {result.get('machine', '')}", "",
            f"Date: {result.get('date', '')}", ""]
    models = result.get("models", {})
    if models:
        out += ["Models: " + ", ".join(f"{k} = `{v}`" for k, v in models.items()), ""]
    out += ["## Data", "",
            f"- source: `{ds.get('path', '')}` ({ds.get('passages', '–')} passages, "
            f"{ds.get('questions', '–')} questions"
            f", {ds.get('skipped', 0)} records skipped)",
            f"- knowledge base: {ds.get('kb_passages', '–')} passages written as files; {ds.get('held_out', '–')} gold"
            f" passages left out → {ds.get('unanswerable', '–')} unanswerable of "
            f"{ds.get('split_questions', '–')} questions"
            f" (share {ds.get('unanswerable_share', '–')}); answerable questions keep {ds.get('gold_kept', '–')}"
            f" ({{gold passages kept: questions}}), {ds.get('gold_lost', '–')} lost one",
            f"- near-miss passages (noise mode): {ds.get('near_miss', 0)}",
            f"- evaluated: {ds.get('sampled', '–')} questions for retrieval (seed {ds.get('seed', '–')}),"
            f" {ds.get('answer_sampled', '–')} of them through the LLM", ""]

    parse = result.get("parse", {}).get("by_format", {})
    if parse:
        out += ["## Parsing: do gold answers survive?", "",
                "Each passage is written as a real file and read back by the product's loader (`parse`) and "
                "split into the knowledge base's chunks (`chunks`); a survived answer is found verbatim "
                "(whitespace and character widths ignored).", ""]
        rows = [[fmt, d["files"], d["failed"], d["answers"], d["survived_parse"], d["survived_chunks"]]
                for fmt, d in parse.items()]
        out += [_table(["format", "files", "failed to ingest", "answers", "in parsed text", "in a chunk"], rows), ""]

    out += ["## Retrieval", "",
            "strict: the result is a chunk (or merged hit) of a gold passage *and* contains a gold answer. "
            "loose: the result contains a gold answer, whatever file it came from. Answerable questions only; "
            "the searcher is asked for 10 results with the configuration's mode and fusion, threshold ignored "
            "(ranking quality), latency is one `search` call (query embedding included). no evidence: share of "
            "questions whose best dense score stays under the configuration's threshold, so the service refuses "
            "without calling the LLM (wanted for unanswerable questions, a false refusal for answerable ones).", ""]
    head = ["config", "n"] + [f"hit@{k}" for k in HIT_KS] + ["MRR@10"] + [f"loose hit@{k}" for k in HIT_KS] + \
           ["loose MRR@10", "no evidence: answerable", "no evidence: unanswerable", "p50 ms", "p95 ms"]
    rows = []
    for c in configs:
        r = c.get("retrieval") or {}
        s, lo, lat = r.get("strict", {}), r.get("loose", {}), r.get("latency_ms", {})
        rows.append([c["name"], r.get("n")] + [s.get(f"hit@{k}") for k in HIT_KS] + [s.get("mrr@10")] +
                    [lo.get(f"hit@{k}") for k in HIT_KS] + [lo.get("mrr@10"), r.get("no_evidence_rate_answerable"),
                                                            r.get("no_evidence_rate_unanswerable"), lat.get("p50"),
                                                            lat.get("p95")])
    out += [_table(head, rows), ""]
    if plot_name:
        out += [f"![hit@k per configuration]({plot_name})", ""]

    out += _threshold_sweep(result)
    out += ["## Configurations", ""]
    keys = sorted({k for c in configs for k in c.get("params", {})})
    out += [_table(["config"] + keys, [[c["name"]] + [c["params"].get(k) for k in keys] for c in configs]), ""]

    ans = [c for c in configs if c.get("answers")]
    if ans:
        out += ["## Answers (real QA service)", "",
                "EM / F1: CMRC 2018 normalisation (punctuation and spaces removed, best over the references), "
                "character F1. contains: every part of the reference appears in the answer. refusal: the service "
                "refused (no evidence above the threshold, or the model said 「无法回答」). TTFT and tokens/s are "
                "measured around the service's token stream.", ""]
        head = ["config", "answerable", "EM", "F1", "contains", "false refusal", "unanswerable", "refusal rate",
                "from noise", "TTFT p50 s", "TTFT p95 s", "tokens/s", "retrieval p50 ms"]
        rows = []
        for c in ans:
            a = c["answers"]
            rows.append([c["name"], a.get("n_answerable"), a.get("em"), a.get("f1"), a.get("contains"),
                         a.get("false_refusal_rate"), a.get("n_unanswerable"), a.get("refusal_rate"),
                         a.get("answered_from_noise"), a.get("ttft_s_p50"), a.get("ttft_s_p95"), a.get("tokens_per_s"),
                         (c.get("retrieval") or {}).get("latency_ms", {}).get("p50")])
        out += [_table(head, rows), ""]
        out += ["After the grounding check (grounding.check_answer: an answer whose numbers, dates or entities are not "
                "in its passages, or whose passage misses the question's year/place, is shown as "
                "「资料中没有找到可靠依据」 and counts as a refusal). from noise: the answer states a claim that "
                "only a noise passage given to the model holds. cited: answers with at least one [n] marker. "
                "quoted: answers with a 「原文：」 quote (template knowledge_qa_quoted); quote found: of those, the "
                "quote is in the passages.", ""]
        out += [_table(["config", "contains", "false refusal", "refusal rate", "from noise", "cited", "quoted",
                        "quote found", "answered", "pending"],
                       [[c["name"], c["answers"].get("grounded_contains"),
                         c["answers"].get("grounded_false_refusal_rate"), c["answers"].get("grounded_refusal_rate"),
                         c["answers"].get("grounded_answered_from_noise"), c["answers"].get("cited_rate"),
                         c["answers"].get("quoted_rate"), c["answers"].get("quote_found_rate"),
                         (c["answers"].get("n_answerable") or 0) + (c["answers"].get("n_unanswerable") or 0),
                         c["answers"].get("pending", 0)]
                        for c in ans]), ""]
        if any(c["answers"].get("pending") for c in ans):
            out += ["**Partial run**: some questions are still pending (--answer-batch); run the same command "
                    "again with the same --answer-cache to answer them.", ""]
        examples = [q for q in result.get("questions", []) if q.get("prediction") is not None][:8]
        if examples:
            out += ["### Sample answers (first configuration with answers)", ""]
            out += [_table(["question", "reference", "answer", "F1", "refused"],
                           [[q["query"], " / ".join(q["references"]), q["prediction"].replace("\n", " ")[:120],
                             q.get("f1"), q.get("refused")] for q in examples]), ""]
    notes = result.get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


SWEEP: tuple[float, ...] = tuple(round(0.80 + 0.01 * i, 2) for i in range(11))


def threshold_sweep(result: dict[str, Any], config: str) -> list[tuple[float, float, float]]:
    """(threshold, false-refusal rate on answerable, refusal rate on unanswerable) had the service used that
    threshold: recomputed from each question's best dense score, no new searches needed."""
    rows = [(q["answerable"], q["retrieval"][config]["best_dense"]) for q in result.get("questions", [])
            if q.get("retrieval", {}).get(config, {}).get("best_dense") is not None]
    ans = [d for a, d in rows if a]
    una = [d for a, d in rows if not a]
    if not ans or not una:
        return []
    return [(t, sum(d < t for d in ans) / len(ans), sum(d < t for d in una) / len(una)) for t in SWEEP]


def _threshold_sweep(result: dict[str, Any]) -> list[str]:
    sweeps = {c["name"]: threshold_sweep(result, c["name"]) for c in result.get("configs", [])
              if c.get("params", {}).get("mode") != "bm25"}
    sweeps = {k: v for k, v in sweeps.items() if v}
    if not sweeps:
        return []
    out = ["## Threshold sweep (from the same searches)", "",
           "What `retrieval.score_threshold` would do: share of answerable questions refused for lack of evidence "
           "(false refusal) / share of unanswerable questions refused, recomputed from each question's best "
           "dense cosine.", ""]
    head = ["threshold"] + [f"{name}: false refusal / refusal" for name in sweeps]
    rows = [[f"{t:.2f}"] + [f"{sw[i][1]:.3f} / {sw[i][2]:.3f}" for sw in sweeps.values()]
            for i, t in enumerate(SWEEP)]
    return out + [_table(head, rows), ""]


def plot_hit_at_k(result: dict[str, Any], path: Path) -> Path:
    """One line per configuration: strict hit@k (solid) and loose hit@k (dashed) for k in HIT_KS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, c in enumerate(result.get("configs", [])):
        r = c.get("retrieval") or {}
        if not r.get("n"):
            continue
        color = f"C{i % 10}"
        ax.plot(HIT_KS, [r["strict"][f"hit@{k}"] for k in HIT_KS], "o-", color=color, label=f"{c['name']} strict")
        ax.plot(HIT_KS, [r["loose"][f"hit@{k}"] for k in HIT_KS], "x--", color=color, alpha=0.6,
                label=f"{c['name']} loose")
    ax.set_xticks(HIT_KS)
    ax.set_xlabel("k")
    ax.set_ylabel("hit@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(result.get("plot_title", "Retrieval hit@k per configuration"))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out_dir: Path, stem: str = "report") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>_hit_at_k.png into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_hit_at_k(result, out_dir / f"{stem}_hit_at_k.png")
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(result, png.name), encoding="utf-8")
    return {"json": write_json(result, out_dir / f"{stem}.json"), "md": md, "png": png}


if __name__ == "__main__":  # re-render a saved run: python -m bench.eval.report RUN.json [OUT_DIR]
    import sys

    src = Path(sys.argv[1])
    saved = json.loads(src.read_text(encoding="utf-8"))
    print(write_report(saved, Path(sys.argv[2]) if len(sys.argv) > 2 else src.parent, src.stem))
