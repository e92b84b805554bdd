"""unstructured's partitioners vs the product loaders, offline (issue 11 item 4): which files each reads, the
element types unstructured gives, and whether CMRC gold answers survive parsing.

    .venv/bin/pip install unstructured==0.27.32     # no longer a requirement; install it to re-measure
    .venv/bin/python -m bench.unstructured_eval                 # messy_docs + 60 CMRC passages per format
    .venv/bin/python -m bench.unstructured_eval --passages 256

Offline is the point: this machine has no network, as an intranet install has none. unstructured is called
with strategy="fast" (no layout model downloads) and languages chi_sim + eng. A partitioner that tries to fetch
a model (spaCy's en_core_web_sm from GitHub) or needs an extra that is not installed (unstructured[md], [pdf],
[odt], [rtf], [image]) fails that file: that failure is the finding. messy_docs "found" counts the files where
every phrase tests/test_loaders.py expects for that file is in the parsed text; CMRC "survived" counts gold
answers found in the parsed text of their passage's file (bench.eval.metrics.contains_answer).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from bench.eval.datasets import read_squad
from bench.eval.metrics import contains_answer
from bench.eval.writers import FORMATS, write_corpus
from configs import PROJECT_ROOT, load_settings
from ingest.loaders import LoadError, load_file

SHARED = PROJECT_ROOT.parent / "shared" / "data"


def ours(path: Path, settings) -> tuple[bool, str, str]:
    try:
        return True, "\n".join(d.page_content for d in load_file(path, settings)), ""
    except LoadError as e:
        return False, "", f"LoadError {e.kind}"


def theirs(path: Path) -> tuple[bool, str, str, Counter]:
    from unstructured.partition.auto import partition

    try:
        els = partition(filename=str(path), strategy="fast", languages=["chi_sim", "eng"])
    except Exception as e:  # noqa: BLE001 - the failure (and its kind) is what we measure
        return False, "", f"{type(e).__name__}: {str(e).split('.')[0][:90]}", Counter()
    return True, "\n".join(str(e) for e in els), "", Counter(e.category for e in els)


def messy(settings) -> dict:
    from tests.test_loaders import EXPECT, GB2312_PHRASES

    expect = {k: [p for ps in v[1].values() for p in ps] for k, v in EXPECT.items() if v[0] == "ok"}
    expect.update({f"chardet-5.2.0-tests/GB2312/{k}": [v] for k, v in GB2312_PHRASES.items()})
    root = SHARED / "messy_docs"
    rows = {"files": 0, "ours_read": 0, "theirs_read": 0, "ours_found": 0, "theirs_found": 0, "should_read": 0}
    errors: Counter = Counter()
    types: Counter = Counter()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        key = p.relative_to(root).as_posix()
        ok1, t1, _ = ours(p, settings)
        ok2, t2, err, cats = theirs(p)
        rows["files"] += 1
        rows["ours_read"] += ok1
        rows["theirs_read"] += ok2 and bool(t2.strip())
        errors[err.split(":")[0] + ": " + err.split(":", 1)[-1][:70] if err else "ok"] += 1
        types.update(cats)
        if key in expect:
            rows["should_read"] += 1
            rows["ours_found"] += ok1 and all(ph in t1 for ph in expect[key])
            rows["theirs_found"] += ok2 and all(ph in t2 for ph in expect[key])
    return {"summary": rows, "unstructured_outcomes": dict(errors.most_common()), "element_types": dict(types)}


def cmrc(settings, n: int) -> dict:
    data = read_squad(SHARED / "cmrc2018" / "squad-style-data_cmrc2018_trial.json")
    passages = list(data.passages.values())[:n]
    out: dict[str, dict] = defaultdict(lambda: {"files": 0, "answers": 0, "ours": 0, "theirs": 0, "theirs_failed": 0})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        by_pid: dict[str, tuple[str, str]] = {}
        for fmt in FORMATS:  # every passage in every format: formats compare on the same passages
            files = write_corpus(passages, folder / fmt, formats=(fmt,))
            by_pid.update({(pid + "/" + fmt): (str(folder / fmt / name), f) for name, (pid, f) in files.items()})
        parsed: dict[str, tuple[str, str, bool]] = {}
        for key, (path, fmt) in by_pid.items():
            _, t1, _ = ours(Path(path), settings)
            ok2, t2, _, _ = theirs(Path(path))
            parsed[key] = (t1, t2, ok2)
            out[fmt]["files"] += 1
            out[fmt]["theirs_failed"] += not ok2
        for q in data.questions:
            for pid in q.positives:
                for fmt in FORMATS:
                    key = pid + "/" + fmt
                    if key not in parsed or not contains_answer(data.passages[pid].text, q.answer):
                        continue
                    t1, t2, _ = parsed[key]
                    out[fmt]["answers"] += 1
                    out[fmt]["ours"] += contains_answer(t1, q.answer)
                    out[fmt]["theirs"] += contains_answer(t2, q.answer)
    return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=60, help="CMRC passages written in every format")
    args = ap.parse_args()
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import unstructured
    except ImportError:
        print("unstructured is not installed (it is no longer a requirement): "
              "pip install unstructured==0.27.32 to re-measure")
        return 2
    from bench.machine import describe_machine

    settings = load_settings().ingest
    result = {"machine": describe_machine(), "unstructured": unstructured.__version__.__version__,
              "messy_docs": messy(settings), "cmrc_answer_survival": cmrc(settings, args.passages)}
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
