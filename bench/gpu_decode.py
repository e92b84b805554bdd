"""Decoding speed on a CUDA GPU: plain generate vs static KV cache vs static cache + torch.compile. Needs a GPU.

    python -m bench.gpu_decode                       # ChatGLM3-6B dimensions; nf4, int8, bf16; 2k and 4k prompts
    python -m bench.gpu_decode --quant nf4 --prompts 2048 --new-tokens 64 --bandwidth-tbs 4.8

Everything goes through the product's loader and the TransformersChatModel's own settings (llm.static_cache,
llm.compile): one load per quantization, then the three modes in turn on the same weights (plain: a dynamic cache as
transformers allocates it; static: the pooled StaticCache of the window; compile: the same plus the compiled
decoding step, warmed up once like load_llm does). For each mode and prompt length it records the time to the first
token, decode tokens/s (tokens after the first over the time after the first, a fixed number of tokens: random
weights may pick a stop token early, so min_new_tokens = new tokens), and the peak of torch.cuda.max_memory_reserved.
"% of bandwidth limit" = decode tok/s ÷ (memory bandwidth ÷ weight bytes): at batch 1 each token reads every
weight once.
The weights are random with ChatGLM3-6B's shapes (bench/gpu_memory.py builds them): speed depends on shapes only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from bench.gpu_memory import GiB, TokenClock, build_folder


def run_once(chat, prompt_tokens: int, new_tokens: int, static: bool) -> dict:
    model, tok = chat.model, chat.tokenizer
    ids = torch.randint(20, len(tok) - 1, (1, prompt_tokens), generator=torch.Generator().manual_seed(prompt_tokens))
    inputs = {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()}
    cfg = chat.generation_config(chat.default_params.merged(temperature=0.0, repetition_penalty=1.0), new_tokens)
    cfg.min_new_tokens = new_tokens
    extra = {}
    cache = None
    if static:
        cache = chat._take_cache()
        extra["past_key_values"] = cache
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    clock = TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, generation_config=cfg, streamer=clock, **extra)
    torch.cuda.synchronize()
    if cache is not None:
        chat._give_back(cache)
    n = len(clock.times)
    decode_s = clock.times[-1] - clock.times[0]
    return {"prompt_tokens": prompt_tokens, "new_tokens": n, "ttft_s": round(clock.times[0] - t0, 3),
            "decode_tok_s": round((n - 1) / decode_s, 1) if decode_s > 0 else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}


def measure(folder: Path, quant: str, prompts: list[int], new_tokens: int, bandwidth: float,
            modes: list[str]) -> list[dict]:
    from configs import load_settings
    from llm import load_llm
    from llm.transformers_backend import enable_compiled_decoding

    settings = load_settings(llm={"model": str(folder), "device": "cuda", "quantization": quant,
                                  "max_context_tokens": max(prompts) + new_tokens, "static_cache": False,
                                  "compile": False})
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    chat = load_llm(settings)
    weights = torch.cuda.memory_allocated() - before
    limit = bandwidth / weights
    rows = []
    chat.model.generate(input_ids=torch.tensor([[20, 21, 22]], device="cuda"), max_new_tokens=2, do_sample=False)
    for mode in modes:
        static = mode != "plain"
        chat.static_cache = static
        if mode == "compile":
            chat.compile_decoding = True
            enable_compiled_decoding(chat.model)
            t = time.perf_counter()
            note = chat.warm_up_compiled_decoding()
            print(json.dumps({"quant": quant, "compile_warmup_s": round(time.perf_counter() - t, 1),
                              "compile_note": note}), flush=True)
            if note:
                continue
        for n in prompts:
            torch.cuda.empty_cache()
            try:
                r = run_once(chat, n, new_tokens, static)
            except Exception as e:  # noqa: BLE001 - a benchmark row that failed says why and the run goes on
                r = {"prompt_tokens": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            r = {"quant": quant, "mode": mode, "weights_gib": round(weights / GiB, 3), **r}
            if r.get("decode_tok_s"):
                r["bandwidth_limit_tok_s"] = round(limit, 1)
                r["pct_of_limit"] = round(100 * r["decode_tok_s"] / limit, 1)
            rows.append(r)
            print(json.dumps(rows[-1]), flush=True)
    del chat
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", nargs="+", default=["nf4", "int8", "none"], choices=["nf4", "int8", "none"])
    ap.add_argument("--modes", nargs="+", default=["plain", "static", "compile"],
                    choices=["plain", "static", "compile"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="the card's memory bandwidth (H200: 4.8 TB/s)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "zhiwen-gpu-bench")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    from llm.transformers_backend import configure_cuda_allocator

    configure_cuda_allocator()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark measures GPU decoding; run it on a machine with an NVIDIA GPU")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = build_folder(args.work)
    rows = [r for q in args.quant
            for r in measure(folder, q, args.prompts, args.new_tokens, args.bandwidth_tbs * 1e12, args.modes)]
    print("\nquant  mode     prompt  TTFT s  decode tok/s  % of bandwidth limit  peak reserved GiB")
    for r in rows:
        if "error" in r:
            print(f"{r['quant']:5}  {r['mode']:7}  {r['prompt_tokens']:6}  failed: {r['error']}")
            continue
        print(f"{r['quant']:5}  {r['mode']:7}  {r['prompt_tokens']:6}  {r['ttft_s']:6.2f}  {r['decode_tok_s']:12}"
              f"  {r.get('pct_of_limit', 0):19.1f}%  {r['peak_reserved_gib']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
