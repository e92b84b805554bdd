"""Which GGUF weight format prefills fastest on this CPU: what limits llama.cpp's time to first token.

    .venv/bin/python -m bench.gguf_formats                                   # the 0.5B demo GGUF, Q4_K_M / Q8_0 / Q4_0
    .venv/bin/python -m bench.gguf_formats --model qwen2.5-coder-1.5b-instruct --prompt-tokens 1000

The demo GGUF (Q4_K_M) is re-quantised with llama.cpp's own quantiser (`llama_model_quantize`, allow_requantize;
modelpack.requantize, what `python -m modelpack requantize` runs) into the other formats in a temporary folder.
Q8_0 made from Q4_K_M holds the same values to within Q8_0's
rounding, so its answers are those of the original; Q4_0 made from Q4_K_M loses precision (a real Q4_0 file is
quantised from f16 instead). Each file is then loaded the way the product loads it (llm.llamacpp_backend.open_llama
with the product's extra weight buffers, OpenMP waits, threads = physical cores) in its own child process, and runs:
  prefill   a fixed prompt of `--prompt-tokens` tokens (CMRC trial passages): tokens/s, best of `--repeats`
  decode    64 greedy tokens after it, EOS ignored: tokens/s
  agreement how many of those 64 greedy tokens equal the original file's (same prompt)
Prints one JSON line per format and a table. Prefill (prompt tokens/s) is what sets TTFT: TTFT ≈ prompt tokens ÷
prefill rate, and the prompt is mostly the 「已知信息」 passages (llm.cpu_context_tokens caps them on CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpus import CMRC_TRIAL
from configs import PROJECT_ROOT
from modelpack.requantize import RequantizeError, requantize_in_child


def _prompt_text() -> str:
    data = json.loads(Path(CMRC_TRIAL).read_text(encoding="utf-8"))["data"]
    return "\n".join(p["context"] for a in data for p in a["paragraphs"])


def measure(path: Path, prompt_tokens: int, repeats: int) -> dict:
    """In this process: load `path` as the product does, time prefill and 64 greedy decode tokens."""
    from llm.llamacpp_backend import extra_buffers_wanted, open_llama, physical_cores
    from llm.openmp import configure_openmp_waits

    configure_openmp_waits()
    import llama_cpp
    import numpy as np

    threads = physical_cores()
    llama = open_llama(llama_cpp, path, extra_buffers=extra_buffers_wanted(llama_cpp), n_ctx=prompt_tokens + 128,
                       n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llama.tokenize(_prompt_text().encode("utf-8"), add_bos=False)[:prompt_tokens]
    prefill = []
    for _ in range(repeats):
        llama.reset()
        t = time.perf_counter()
        llama.eval(tokens)
        prefill.append(time.perf_counter() - t)
    out: list[int] = []
    t = time.perf_counter()
    n_vocab = llama.n_vocab()
    for _ in range(64):   # greedy on the last position's logits (llama.scores holds none without logits_all)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
        tok = int(logits.argmax())
        out.append(tok)
        llama.eval([tok])
    decode = time.perf_counter() - t
    return {"file": path.name, "size_mb": round(path.stat().st_size / 2**20, 1), "threads": threads,
            "prompt_tokens": len(tokens), "prefill_s": round(min(prefill), 3),
            "prefill_tok_s": round(len(tokens) / min(prefill), 1), "decode_tok_s": round(64 / decode, 1),
            "tokens": out, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a demo model folder under models/")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--formats", default="Q8_0,Q4_0")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.prompt_tokens, args.repeats)), flush=True)
        return 0

    from bench.machine import describe_machine
    from configs import load_settings

    folder = Path(load_settings().paths.models_dir) / args.model
    src = next(folder.glob("*.gguf"), None)
    if src is None:
        raise SystemExit(f"no GGUF in {folder}: run `python -m modelpack pull demo` first")
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="zhiwen-gguf-") as tmp:
        files = [(src.name.rsplit("-", 1)[-1].removesuffix(".gguf").upper(), src)]
        for name in [f for f in args.formats.split(",") if f]:
            dst = Path(tmp) / f"{args.model}-{name.lower()}.gguf"
            try:
                secs = requantize_in_child(src, dst, name)
            except RequantizeError as e:
                raise SystemExit(str(e)) from None
            print(f"requantised {src.name} -> {name} in {secs:.1f} s", flush=True)
            files.append((name, dst))
        rows = []
        for name, path in files:
            proc = subprocess.run([sys.executable, "-m", "bench.gguf_formats", "--child", str(path),
                                   "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)],
                                  cwd=PROJECT_ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = {"format": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
    base = rows[0]["tokens"] if rows else []
    print("\n| format | file MB | prompt tokens | prefill tok/s | prefill s | decode tok/s | same greedy tokens "
          "| peak RSS MB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["tokens"], base, strict=False))
        print(f"| {r['format']} | {r['size_mb']} | {r['prompt_tokens']} | {r['prefill_tok_s']} | {r['prefill_s']} "
              f"| {r['decode_tok_s']} | {same}/64 | {r['peak_rss_mb']} |")
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}, ensure_ascii=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
