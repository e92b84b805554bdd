"""What a LoRA adapter costs on the GPU: load time, weight memory and decode speed, with and without merging.
Needs a CUDA GPU.

    python -m bench.adapter_speed                       # ChatGLM3-6B dimensions, LoRA r=8 on q/k/v/o
    python -m bench.adapter_speed --prompt 1024 --new-tokens 64 --work /tmp/glm-dims

All through the product's loader (load_llm with llm.adapter / llm.adapter_merge): builds (once) a random
GlmForCausalLM with ChatGLM3-6B's dimensions (bench.gpu_memory.build_folder; no real weights exist here, and memory
and speed depend on shapes only), makes a LoRA with peft (r=8, alpha 16, q/k/v/o projections, random non-zero B),
then for base / +LoRA / +LoRA merged under nf4 and bf16 measures the load, the weights' GPU bytes, and one greedy
generation of --new-tokens tokens after a --prompt-token prompt (time to first token, decode tokens/s at batch 1).
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

CASES = [("nf4", False, False), ("nf4", True, False), ("none", False, False), ("none", True, False),
         ("none", True, True)]


def make_lora(folder: Path, out: Path) -> Path:
    """A peft LoRA for `folder`'s shapes, written without loading the 12 GB base (built on the meta device)."""
    if (out / "adapter_config.json").exists():
        return out
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"],
                                                 task_type=TaskType.CAUSAL_LM))
    torch.manual_seed(0)
    state = {name.replace(".default", ""): (torch.randn(p.shape) * 0.01).to(torch.bfloat16)
             for name, p in peft_model.named_parameters() if "lora_" in name}
    out.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"))
    return out


def measure(folder: Path, adapter: Path | None, quant: str, merge: bool, prompt: int, new_tokens: int) -> dict:
    from configs import load_settings
    from llm import load_llm

    settings = load_settings(llm={"model": str(folder), "device": "cuda", "quantization": quant, "dtype": "bfloat16",
                                  "adapter": str(adapter or ""), "adapter_merge": merge,
                                  "max_context_tokens": prompt + new_tokens})
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    chat = load_llm(settings)
    load_s = time.perf_counter() - t
    weights = torch.cuda.memory_allocated() - before
    model = chat.model
    ids = torch.randint(20, len(chat.tokenizer) - 1, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    cfg = chat.generation_config(chat.default_params.merged(temperature=0.0, repetition_penalty=1.0), new_tokens)
    cfg.min_new_tokens = new_tokens
    # Warm-up with the measured shapes: the first generation of the process pays for CUDA/cuBLAS/bitsandbytes set-up
    # (a 2-token warm-up was not enough: the first case measured 8 tok/s, below its own +LoRA variant).
    model.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), generation_config=cfg)
    clock = TokenClock()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), generation_config=cfg,
                   streamer=clock)
    torch.cuda.synchronize()
    row = {"model": chat.info.name, "quant": quant, "adapter": bool(adapter), "merged": merge,
           "load_s": round(load_s, 1), "weights_gib": round(weights / GiB, 3),
           "ttft_s": round(clock.times[0] - t0, 3),
           "decode_tok_s": round((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), 1)}
    print(json.dumps(row), flush=True)
    del chat, model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "zhiwen-gpu-bench")
    args = ap.parse_args(argv)
    from llm.transformers_backend import configure_cuda_allocator

    configure_cuda_allocator()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark measures GPU speed; run it on a machine with an NVIDIA GPU")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = build_folder(args.work)
    lora = make_lora(folder, args.work / "lora-r8")
    rows = [measure(folder, lora if with_adapter else None, quant, merge, args.prompt, args.new_tokens)
            for quant, with_adapter, merge in CASES]
    print(f"\nprompt {args.prompt} tokens, {args.new_tokens} new tokens, batch 1, greedy")
    print("quant  adapter        load s  weights GiB  TTFT s  decode tok/s")
    for r in rows:
        kind = ("LoRA merged" if r["merged"] else "LoRA") if r["adapter"] else "-"
        print(f"{r['quant']:5}  {kind:13}  {r['load_s']:6.1f}  {r['weights_gib']:11.3f}  {r['ttft_s']:6.3f}  "
              f"{r['decode_tok_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
