"""Built-in evaluation: build a knowledge base from a QA data set and measure retrieval and answers.

    .venv/bin/python -m bench.evaluate                                   # CMRC 2018 trial, default configurations
    .venv/bin/python -m bench.evaluate --data my.jsonl --limit 100 --answer-limit 10 \\
        --config name=small,chunk_size=200,overlap=40 --config name=bm25,mode=bm25,answer=false
    .venv/bin/python -m bench.evaluate --out docs/eval --stem cmrc2018-trial     # the committed report
    .venv/bin/python -m bench.evaluate --noise --limit 200 --answer-limit 60     # noise-robustness mode
    # a long LLM run in batches of 25 questions, each under the shared heavy-job lock, resumable:
    flock /tmp/zhiwen-heavy.lock .venv/bin/python -m bench.evaluate --noise --answer-cache answers.jsonl \
        --answer-batch 25 --work-dir /tmp/zw-eval ...      # repeat until the log says "0 pending"

Data: SQuAD/CMRC JSON (.json) or JSONL (.jsonl: query, answer, positive, negative). See docs/benchmarks.md for
the metrics' definitions. Only argument parsing lives here; the run is bench.eval.pipeline.run.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.corpus import CMRC_TRIAL
from bench.eval.configs import DEFAULT_CONFIGS, ConfigSpecError, load_config_file, parse_config
from bench.eval.datasets import DatasetError
from bench.eval.writers import FORMATS
from configs import PROJECT_ROOT, SettingsError


def _limit(v: str) -> int | None:
    """A count, or "all" (None)."""
    if v.strip().lower() == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=CMRC_TRIAL, help="SQuAD/CMRC .json or .jsonl (default: CMRC trial)")
    ap.add_argument("--config", action="append", default=[], metavar="SPEC",
                    help="a configuration, e.g. name=c250,chunk_size=250,overlap=50,mode=hybrid,k=5,threshold=0.8,"
                         "answer=false (repeat for several; default: " + "; ".join(DEFAULT_CONFIGS) + ")")
    ap.add_argument("--configs-file", type=Path, help="YAML list of configurations ({name, answer, section: {...}})")
    ap.add_argument("--limit", type=_limit, default=200, help="questions for retrieval (a number or all; default 200)")
    ap.add_argument("--answer-limit", type=_limit, default=20,
                    help="questions sent through the LLM per answering configuration (0 = no LLM, all; default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="answer length limit for the LLM (default 64: CMRC answers are short, CPU decoding is slow)")
    ap.add_argument("--unanswerable-share", type=float, default=0.2,
                    help="share of questions made unanswerable by leaving their passages out (default 0.2)")
    ap.add_argument("--noise", action="store_true",
                    help="noise-robustness mode: add a same-topic near-miss copy of each gold passage (its answer "
                         "sentences removed) and report answered-from-noise (bench/eval/noise.py)")
    ap.add_argument("--max-passages", type=_limit, default=None, help="use at most this many passages (default all)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="file formats to rotate over (default "
                                                                 f"{','.join(FORMATS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "artifacts" / "eval", help="report folder")
    ap.add_argument("--stem", default="report", help="report file names: <stem>.md, <stem>.json, <stem>_hit_at_k.png")
    ap.add_argument("--work-dir", type=Path, help="keep the written files and knowledge bases here (default: temp)")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's Notes section")
    ap.add_argument("--answer-cache", type=Path,
                    help="JSONL file of raw answers per question and configuration: answers already there are not "
                         "asked again (resume a run, or split it into batches with --answer-batch)")
    ap.add_argument("--answer-batch", type=_limit, default=None,
                    help="at most this many questions through the LLM in this call (refusals before the LLM are "
                         "free); the report covers what is answered so far. Run again until it says 0 pending")
    return ap


def main(argv: list[str] | None = None) -> int:
    from bench.eval.pipeline import RunOptions, run

    args = build_parser().parse_args(argv)
    try:
        configs = [parse_config(s) for s in args.config]
        if args.configs_file:
            configs += load_config_file(args.configs_file)
        configs = configs or [parse_config(s) for s in DEFAULT_CONFIGS]
        if args.limit == 0 or args.max_new_tokens <= 0:
            raise ConfigSpecError("--limit and --max-new-tokens must be > 0")
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigSpecError(f"configuration names must be unique, got {names}")
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ConfigSpecError(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
        argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        run(RunOptions(data=args.data, configs=configs, out_dir=args.out, stem=args.stem, limit=args.limit,
                       answer_limit=args.answer_limit, max_new_tokens=args.max_new_tokens,
                       unanswerable_share=args.unanswerable_share, noise=args.noise,
                       max_passages=args.max_passages, seed=args.seed, formats=formats, work_dir=args.work_dir,
                       command=f".venv/bin/python -m bench.evaluate {argv_text}".strip(), notes=args.note,
                       answer_cache=args.answer_cache, answer_batch=args.answer_batch))
    except (ConfigSpecError, DatasetError, SettingsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a product error (missing model, KB problem): its sentence, no traceback
        print(f"error: the evaluation stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
