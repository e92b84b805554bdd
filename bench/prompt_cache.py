"""What llama.cpp's prompt cache (llm.prompt_cache_mb) does to the first word, through QAService, on this CPU.

    .venv/bin/python -m bench.prompt_cache                        # 1.5B demo model, 10 passages x 2 questions
    .venv/bin/python -m bench.prompt_cache --model qwen2.5-coder-0.5b-instruct --passages 6

A knowledge base of the first `--passages` CMRC trial passages that have at least two questions (real e5 embedder).
Each setting runs in its own child process (llama.cpp engine, greedy, `--max-new-tokens`): one warm-up question, then
round 1 (the first question of every passage) and round 2 (the second question of every passage, in the same
order). So when a round-2 question comes, its passages were last read `--passages` prompts ago: llama.cpp's own
reuse of the previous prompt cannot help, the RAM cache of recent prompts can (when retrieval puts the same passage
first again). Printed per setting: TTFT p50 of each round, prompt tokens p50; and how many round-2 answers are the
same text in both settings (greedy: a cache must not change an answer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpus import CMRC_TRIAL
from configs import PROJECT_ROOT


def passages_with_two_questions(path: Path, n: int) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    out = []
    for article in data:
        for para in article["paragraphs"]:
            if len(para["qas"]) >= 2:
                out.append({"context": para["context"], "questions": [q["question"] for q in para["qas"][:2]],
                            "question": para["qas"][0]["question"]})
            if len(out) >= n:
                return out
    return out


def run_child(args: argparse.Namespace) -> int:
    from app.service import QAService
    from configs import load_settings

    items = passages_with_two_questions(args.data, args.passages)
    settings = load_settings(paths={"kb_root": str(args.kb_root)},
                             llm={"model": args.model, "backend": "llamacpp", "temperature": 0.0,
                                  "max_new_tokens": args.max_new_tokens, "prompt_cache_mb": args.cache_mb})
    service = QAService(settings)
    service.warm_up()
    "".join(service.answer("这篇文章讲了什么？", "speed", []))          # warm-up, not counted
    rows = []
    for rnd in (0, 1):
        for i, it in enumerate(items):
            t0 = time.perf_counter()
            stream = service.answer(it["questions"][rnd], "speed", [])
            first, pieces = None, []
            for piece in stream:
                if first is None:
                    first = time.perf_counter()
                pieces.append(piece)
            rows.append({"round": rnd + 1, "i": i, "question": it["questions"][rnd], "answer": "".join(pieces),
                         "refused": bool(stream.refused), "prompt_tokens": getattr(stream, "prompt_tokens", 0),
                         "ttft_s": round(first - t0, 3) if first and not stream.refused else None})
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    import resource

    states = getattr(service.llm, "prompt_states", None)
    args.json.write_text(json.dumps({
        "cache_mb": args.cache_mb, "model": service.info.name, "rows": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "hits": states.hits if states else 0, "kept_mb": round(states.size_bytes / 2**20) if states else 0,
    }, ensure_ascii=False), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prompt_cache", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--passages", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[256, 0], help="settings to compare")
    ap.add_argument("--data", type=Path, default=CMRC_TRIAL)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kb-root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.cache_mb = args.cache_mb[0]
        return run_child(args)

    from bench.answer_speed import build_kb
    from bench.machine import describe_machine
    from configs import load_settings

    print(describe_machine(), flush=True)
    items = passages_with_two_questions(args.data, args.passages)
    results = {}
    with tempfile.TemporaryDirectory(prefix="zhiwen-pcache-") as tmp:
        work = Path(tmp)
        kb_root = build_kb(items, work, str(load_settings().models_dir))
        for mb in args.cache_mb:
            out = work / f"cache{mb}.json"
            cmd = [sys.executable, "-m", "bench.prompt_cache", "--child", "--cache-mb", str(mb), "--kb-root",
                   str(kb_root), "--json", str(out), "--model", args.model, "--passages", str(args.passages),
                   "--max-new-tokens", str(args.max_new_tokens), "--data", str(args.data)]
            print(f"--- llm.prompt_cache_mb={mb}", flush=True)
            if subprocess.run(cmd, cwd=PROJECT_ROOT, check=False).returncode != 0:
                print(f"prompt_cache_mb={mb} failed", flush=True)
                continue
            results[mb] = json.loads(out.read_text(encoding="utf-8"))

    def p50(values: list[float]) -> float | None:
        return round(statistics.median(values), 2) if values else None

    print("\nprompt_cache_mb  model                               round-1 TTFT p50   round-2 TTFT p50   "
          "prompt tokens p50   states brought back   kept MB   peak RSS MB")
    for mb, res in results.items():
        r1 = [r["ttft_s"] for r in res["rows"] if r["round"] == 1 and r["ttft_s"] is not None]
        r2 = [r["ttft_s"] for r in res["rows"] if r["round"] == 2 and r["ttft_s"] is not None]
        toks = [r["prompt_tokens"] for r in res["rows"] if r["prompt_tokens"]]
        print(f"{mb:>15}  {res['model']:<35} {p50(r1)!s:>9} s ({len(r1)})   {p50(r2)!s:>9} s ({len(r2)})   "
              f"{p50(toks)!s:>17}   {res['hits']:>19}   {res['kept_mb']:>7}   {res['peak_rss_mb']:>11}")
    if len(results) == 2:
        a, b = results.values()
        same = sum(x["answer"] == y["answer"] for x, y in zip(a["rows"], b["rows"], strict=True))
        print(f"same answer text in both settings: {same} of {len(a['rows'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
