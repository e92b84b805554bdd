"""llama.cpp's extra (AMX / repacked) weight buffers off and on, with torch bf16 matmuls before each prompt.

In QAService the e5 query embedding (bf16 through oneDNN, AMX on AMX CPUs) runs before every answer on the same
threads as llama.cpp; an unpatched llama.cpp then dies with SIGILL (docs/benchmarks.md §8b). This prints the time to
first piece and decode pieces/s of a ~1,200-token CMRC prompt for both settings, two prompts each.

    .venv/bin/python -m bench.amx_prefill qwen2.5-coder-1.5b-instruct
"""
from __future__ import annotations

import argparse
import json
import time

import llm  # noqa: F401  (sets the OpenMP wait policy before torch and llama.cpp load libgomp, as the service does)
from bench.corpus import CMRC_TRIAL
from configs import load_settings


def cmrc_context(chars: int) -> str:
    text = ""
    for article in json.loads(CMRC_TRIAL.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            text += paragraph["context"]
            if len(text) > chars:
                return text
    return text


def main() -> None:
    import llama_cpp
    import torch

    from llm.llamacpp_backend import amx_kernels_safe, cpu_has_amx, open_llama

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a folder name in paths.models_dir holding a .gguf")
    ap.add_argument("--chars", type=int, default=1400, help="characters of CMRC text in the prompt")
    args = ap.parse_args()
    gguf = next((load_settings().paths.models_dir / args.model).glob("*.gguf"))
    print(f"AMX CPU: {cpu_has_amx()}, build with the tile-reload patch: {amx_kernels_safe(llama_cpp)}")
    context = cmrc_context(args.chars)
    a, b = torch.randn(256, 384, dtype=torch.bfloat16), torch.randn(384, 384, dtype=torch.bfloat16)
    for extra in (False, True):
        model = open_llama(llama_cpp, gguf, extra_buffers=extra, n_ctx=2048, n_batch=512, n_threads=2, verbose=False)
        tokens = len(model.tokenize(context.encode("utf-8")))
        for rep in range(2):
            for _ in range(3):
                (a @ b).sum()  # oneDNN bf16 on this thread, as the query embedding before each answer
            question = f"根据上述已知信息回答问题：第{rep}段讲了什么？"
            messages = [{"role": "user", "content": f"已知信息：{context}\n{question}"}]
            model.reset()
            start, first, pieces = time.perf_counter(), None, 0
            for chunk in model.create_chat_completion(messages, max_tokens=48, temperature=0, stream=True):
                if chunk["choices"][0]["delta"].get("content"):
                    pieces += 1
                    first = first or time.perf_counter()
            end = time.perf_counter()
            if first is None:
                print(f"extra_buffers={extra} rep={rep}: no output")
                continue
            rate = (pieces - 1) / (end - first) if end > first else 0.0
            print(f"extra_buffers={extra} rep={rep} prompt ~{tokens} tokens: TTFT {first - start:.2f} s, "
                  f"decode {rate:.1f} pieces/s")
        del model


if __name__ == "__main__":
    main()
