"""GPU memory and speed of the 4-bit and 8-bit paths, and how close the memory planner comes. Needs a CUDA GPU.

    python -m bench.gpu_memory                        # ChatGLM3-6B dimensions, nf4 + int8, 2k/4k/8k-token prompts
    python -m bench.gpu_memory --quant nf4 --prompts 2048 --new-tokens 32 --work /tmp/glm-dims

What it does, all through the product's own loader (llm.load_llm → planner check → BitsAndBytesConfig →
AutoModelForCausalLM → streaming):
  1. builds a GlmForCausalLM with ChatGLM3-6B's dimensions (vocab 65,024, hidden 4,096, 28 layers, 32 heads,
     2 KV heads, FF 13,696), random weights initialised on the GPU in bf16, saved once to a local folder together
     with a small GLM-style tokenizer (no real weights exist here; memory and speed depend on shapes only);
  2. for each quantization: loads the folder with load_llm, reads the weights' GPU bytes, then for each prompt
     length runs one generation (prompt of N token ids + --new-tokens greedy tokens) and records the peak of
     torch.cuda.max_memory_reserved (what the caching allocator took from the card, the number that must fit),
     the time to the first token and decode tokens/s;
  3. prints each measurement next to plan_memory's estimate for N + new tokens and the error in percent.
The CUDA context (~0.5 GiB) is outside both numbers: free memory from torch.cuda.mem_get_info() already excludes it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

GiB = 1024**3
CHATGLM3_6B = dict(vocab_size=65024, hidden_size=4096, num_hidden_layers=28, num_attention_heads=32,
                   num_key_value_heads=2, head_dim=128, intermediate_size=13696)


class TokenClock:
    """A generate() streamer that timestamps each new token (the first put() is the prompt itself).

    Text streamers cannot be used here: random weights pick ids beyond the small tokenizer, which decode to ""."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_folder(work: Path) -> Path:
    """Random GlmForCausalLM of ChatGLM3-6B dimensions + tiny GLM tokenizer, saved in bf16 safetensors."""
    from transformers import GlmConfig, GlmForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.tiny_glm import build_tokenizer

    folder = work / "chatglm3-6b-dims"
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer()
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = GlmConfig(**CHATGLM3_6B, max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=stop, tie_word_embeddings=False, dtype="bfloat16")
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = GlmForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"built {folder}: {n / 1e9:.3f}B params in {time.perf_counter() - t:.0f}s", flush=True)
    return folder


def measure(folder: Path, quant: str, prompts: list[int], new_tokens: int) -> list[dict]:
    from configs import load_settings
    from llm import load_llm
    from llm.planner import plan_memory

    settings = load_settings(llm={"model": str(folder), "device": "cuda", "quantization": quant,
                                  "max_context_tokens": max(prompts) + new_tokens})
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    chat = load_llm(settings)
    load_s = time.perf_counter() - t
    weights = torch.cuda.memory_allocated() - before
    load_peak = torch.cuda.max_memory_reserved()          # loading quantizes tensor by tensor: its own peak
    torch.cuda.empty_cache()
    print(json.dumps({"quant": quant, "load_s": round(load_s, 1), "weights_gib": round(weights / GiB, 3),
                      "load_peak_reserved_gib": round(load_peak / GiB, 3),
                      "load_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
                      "reserved_after_load_gib": round(torch.cuda.memory_reserved() / GiB, 3)}), flush=True)
    model, tok = chat.model, chat.tokenizer
    rows = []
    # Warm-up: the first generation pays for CUDA kernel loading and bitsandbytes set-up, not for the model.
    model.generate(input_ids=torch.tensor([[20, 21, 22]], device="cuda"), max_new_tokens=2, do_sample=False)
    for n in prompts:
        ids = torch.randint(20, len(tok) - 1, (1, n), generator=torch.Generator().manual_seed(n))
        inputs = {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()}
        cfg = chat.generation_config(chat.default_params.merged(temperature=0.0, repetition_penalty=1.0), new_tokens)
        cfg.min_new_tokens = new_tokens          # random weights may emit a stop token: decode a fixed length
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        clock = TokenClock()
        t0 = time.perf_counter()
        model.generate(**inputs, generation_config=cfg, streamer=clock)
        torch.cuda.synchronize()
        gen_tokens = len(clock.times)
        ttft = clock.times[0] - t0
        decode_s = clock.times[-1] - clock.times[0]
        peak_reserved = torch.cuda.max_memory_reserved()
        peak_alloc = torch.cuda.max_memory_allocated()
        plan = plan_memory(model.config, "cuda", quant, n + new_tokens)
        rows.append({
            "quant": quant, "prompt_tokens": n, "new_tokens": gen_tokens, "load_s": round(load_s, 1),
            "load_peak_reserved_gib": round(load_peak / GiB, 3),
            "weights_gib": round(weights / GiB, 3), "plan_weights_gib": round(plan.weights_bytes / GiB, 3),
            "peak_allocated_gib": round(peak_alloc / GiB, 3), "peak_reserved_gib": round(peak_reserved / GiB, 3),
            "plan_total_gib": round(plan.total_bytes / GiB, 3),
            "plan_error_pct": round(100 * (plan.total_bytes - peak_reserved) / peak_reserved, 1),
            "ttft_s": round(ttft, 3),
            # decode speed at batch 1: tokens after the first, over the time after the first
            "decode_tok_s": round((gen_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    del chat, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", nargs="+", default=["nf4", "int8"], choices=["nf4", "int8", "none"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "zhiwen-gpu-bench")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    from llm.transformers_backend import configure_cuda_allocator

    configure_cuda_allocator()            # the product's allocator setting, before this process touches CUDA
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark measures GPU memory; run it on a machine with an NVIDIA GPU")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = build_folder(args.work)
    rows = [r for q in args.quant for r in measure(folder, q, args.prompts, args.new_tokens)]
    print("\nquant  prompt  weights GiB (plan)  peak reserved GiB  plan GiB  error   TTFT s  decode tok/s")
    for r in rows:
        print(f"{r['quant']:5}  {r['prompt_tokens']:6}  {r['weights_gib']:6.2f} ({r['plan_weights_gib']:5.2f})"
              f"       {r['peak_reserved_gib']:6.2f}            {r['plan_total_gib']:6.2f}"
              f"  {r['plan_error_pct']:+5.1f}%"
              f"  {r['ttft_s']:6.2f}  {r['decode_tok_s']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
