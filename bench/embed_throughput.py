"""Embedding throughput on CPU: the product's Embedder against a bare SentenceTransformer.encode, per precision.

    .venv/bin/python -m bench.embed_throughput                 # every sentence-transformers folder in models/
    .venv/bin/python -m bench.embed_throughput --chunks 128 --model multilingual-e5-small

Texts: the CMRC 2018 trial passages cut by the product's splitter (250/50 characters by default), with the
model's passage prefix. Each variant warms up on four texts and then encodes all of them `--repeat` times;
the best run is reported (the least disturbed by other processes on a shared machine). For reduced precision
the cosine to the fp32 vectors of the same text shows what the speed costs in quality.

Variants
  embedder-fp32   retrieval.embeddings.Embedder.encode_passages (what ingest runs: batched, length-sorted), fp32
  embedder-auto   the same with embedding.precision: auto (bf16 on CPUs with AVX512-BF16/AMX: the default there)
  bare-fp32       SentenceTransformer.encode(batch_size, normalize_embeddings=True), texts in file order
  bare-bf16       the same model cast to bfloat16 (CPU bf16 matmuls; fast only on CPUs with AVX512-BF16/AMX)
  bare-int8dyn    torch.ao.quantization.quantize_dynamic on every nn.Linear (int8 weights, fp32 activations)
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import numpy as np
import torch

from bench.corpus import cmrc_chunks
from bench.machine import describe_machine
from configs import load_settings


def _time(encode, texts: list[str], repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time of encode(texts) over `repeat` runs, after a warm-up on a few texts (first-call costs)."""
    encode(texts[:4])
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = encode(texts)
        best = min(best, time.perf_counter() - t0)
    return best, np.asarray(out, dtype=np.float32)


def _st_folders(models_dir: Path, only: str | None) -> list[Path]:
    folders = [p for p in sorted(models_dir.iterdir()) if (p / "modules.json").is_file()] if models_dir.is_dir() else []
    if only:
        folders = [p for p in folders if p.name == only] or [Path(only)]
    return folders


def bench_model(folder: Path, texts: list[str], batch_size: int, repeat: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    from retrieval.embeddings import Embedder

    settings = load_settings(embedding={"model": str(folder), "precision": "fp32"})
    prefixed = [settings.embedding.passage_prefix + t for t in texts]
    rows = []

    emb = Embedder.from_settings(settings)
    emb.warm_up()
    secs, ref = _time(emb.encode_passages, texts, repeat)
    rows.append({"variant": "embedder-fp32", "seconds": secs, "cos_to_fp32": 1.0})
    del emb
    gc.collect()
    # What `embedding.precision: auto` runs on this machine (bf16 where the CPU has AVX512-BF16/AMX).
    emb = Embedder.from_settings(load_settings(embedding={"model": str(folder), "precision": "auto"}))
    emb.warm_up()
    secs, v = _time(emb.encode_passages, texts, repeat)
    rows.append({"variant": f"embedder-{emb.precision}", "seconds": secs,
                 "cos_to_fp32": float(np.mean(np.sum(v * ref, 1)))})
    del emb
    gc.collect()

    st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    st.max_seq_length = settings.embedding.max_seq_length

    def enc(batch: list[str]) -> np.ndarray:
        return st.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    secs, fp32 = _time(enc, prefixed, repeat)
    rows.append({"variant": "bare-fp32", "seconds": secs, "cos_to_fp32": float(np.mean(np.sum(fp32 * ref, 1)))})

    st.to(torch.bfloat16)
    secs, v = _time(lambda b: enc(b).astype(np.float32), prefixed, repeat)
    rows.append({"variant": "bare-bf16", "seconds": secs, "cos_to_fp32": float(np.mean(np.sum(v * fp32, 1)))})

    st.to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        from torch.ao.quantization import quantize_dynamic

        st = quantize_dynamic(st, {torch.nn.Linear}, dtype=torch.qint8)
    secs, v = _time(enc, prefixed, repeat)
    rows.append({"variant": "bare-int8dyn", "seconds": secs, "cos_to_fp32": float(np.mean(np.sum(v * fp32, 1)))})
    for r in rows:
        r["chunks_per_s"] = len(texts) / r["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="one model folder name in models/ or a path (default: all)")
    ap.add_argument("--chunks", type=int, default=256, help="number of real chunks to encode (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up; the best is kept")
    args = ap.parse_args(argv)

    settings = load_settings()
    chunks, _ = cmrc_chunks(settings)
    texts = [c.embedding_text() for c in chunks[: args.chunks]]
    chars = sum(map(len, texts))
    print(f"machine: {describe_machine()}")
    print(f"texts: {len(texts)} CMRC chunks ({settings.ingest.chunk_size}/{settings.ingest.chunk_overlap} chars, "
          f"mean {chars / len(texts):.0f} chars), batch {args.batch_size}, best of {args.repeat}")
    folders = _st_folders(settings.models_dir, args.model)
    if not folders:
        raise SystemExit(f"no sentence-transformers model folder in {settings.models_dir}: "
                         "run `python -m modelpack pull demo` first")
    print(f"{'model':28s} {'variant':14s} {'seconds':>8s} {'chunks/s':>9s} {'cos→fp32':>9s}")
    for folder in folders:
        for r in bench_model(folder, texts, args.batch_size, args.repeat):
            print(f"{folder.name:28s} {r['variant']:14s} {r['seconds']:8.2f} {r['chunks_per_s']:9.1f} "
                  f"{r['cos_to_fp32']:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
