"""Parse speed of ingest.loaders per file extension: files/s and MB/s, one process, sequential.

    .venv/bin/python bench/parse_speed.py                      # the shared messy_docs folder
    .venv/bin/python bench/parse_speed.py docs/ --no-ocr       # any folder; OCR off
    .venv/bin/python bench/parse_speed.py --repeat 3           # best of 3 per file (steadier on a busy machine)

The OCR engine is created before timing starts (its ~0.5 s start-up is printed separately); errors (LoadError)
count as parsed files, since finding out costs time too. files/s and MB/s are from wall-clock time; "cpu s" is
the process's CPU time (all threads: ONNX Runtime runs OCR on several), steadier than wall time on a shared
machine. Numbers depend on the CPU and its load: compare runs on the same machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import PROJECT_ROOT, load_settings
from ingest.loaders import SUPPORTED_EXTENSIONS, LoadError, load_file

DEFAULT_FOLDER = PROJECT_ROOT.parent / "shared" / "data" / "messy_docs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    ap.add_argument("--no-ocr", action="store_true", help="turn OCR off (ingest.ocr=false)")
    ap.add_argument("--repeat", type=int, default=1, help="parse each file this many times, keep the fastest")
    args = ap.parse_args()
    if not args.folder.is_dir():
        print(f"folder not found: {args.folder}", file=sys.stderr)
        return 2
    settings = load_settings(ingest={"ocr": not args.no_ocr}).ingest
    files = sorted(p for p in args.folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
    if not settings.ocr:
        print("OCR off")
    else:
        from ingest import ocr

        t = time.perf_counter()
        ocr.get_engine()
        print(f"OCR engine start-up: {time.perf_counter() - t:.2f} s (not counted below)")

    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0, 0.0])  # files, bytes, wall s, errors, cpu s
    slowest: list[tuple[float, str, str]] = []
    for f in files:
        best, best_cpu, outcome = float("inf"), float("inf"), ""
        for _ in range(max(1, args.repeat)):
            t, c = time.perf_counter(), time.process_time()
            try:
                docs = load_file(f, settings)
                outcome = f"{len(docs)} docs"
            except LoadError as e:
                outcome = f"LoadError {e.kind}"
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.process_time() - c)
        s = stats[f.suffix.lower()]
        s[0] += 1
        s[1] += f.stat().st_size
        s[2] += best
        s[3] += outcome.startswith("LoadError")
        s[4] += best_cpu
        slowest.append((best, f.relative_to(args.folder).as_posix(), outcome))

    print(f"\n{'ext':<7}{'files':>6}{'errors':>7}{'MB':>9}{'wall s':>9}{'cpu s':>9}{'files/s':>9}{'MB/s':>10}")
    total = [0, 0, 0.0, 0, 0.0]
    for ext, row in sorted(stats.items(), key=lambda kv: -kv[1][2]):
        _print_row(ext, row)
        total = [a + b for a, b in zip(total, row, strict=False)]
    _print_row("all", total)
    print("\nslowest files:")
    for secs, name, outcome in sorted(slowest, reverse=True)[:8]:
        print(f"  {secs:7.2f} s  {name}  ({outcome})")
    return 0


def _print_row(label: str, row: list[float]) -> None:
    n, size, secs, errs, cpu = row
    print(f"{label:<7}{n:>6}{errs:>7}{size / 1e6:>9.2f}{secs:>9.2f}{cpu:>9.2f}{n / secs:>9.1f}"
          f"{size / 1e6 / secs:>10.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
