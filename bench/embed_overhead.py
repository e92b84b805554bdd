"""What the Embedder wrapper costs: Embedder.encode_passages against a bare SentenceTransformer.encode.

    .venv/bin/python -m bench.embed_overhead                      # 500 CMRC chunks, the configured model
    .venv/bin/python -m bench.embed_overhead --chunks 200 --repeat 3 --model /path/to/folder

Both sides use the same loaded model object (so only the wrapper differs: prefixing, dtype/contiguity, argument
handling), the same ~500 CMRC 2018 trial chunk texts (heading + text, as ingest embeds them) and the same batch
size. Runs alternate (wrapper, bare, wrapper, bare, ...) after a short warm-up, and the best time of each side is
kept: the least disturbed by other processes on a shared machine. Target: the wrapper within 20 % of bare.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import numpy as np

from bench.corpus import cmrc_chunks
from configs import load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=500, help="number of CMRC chunks to encode (default 500)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per side after a warm-up (default 2)")
    ap.add_argument("--model", help="embedding.model override: a folder name in models/ or a path")
    args = ap.parse_args(argv)

    from retrieval.embeddings import Embedder

    settings = load_settings(**({"embedding": {"model": args.model}} if args.model else {}))
    chunks, _ = cmrc_chunks(settings)
    texts = [c.embedding_text() for c in chunks[: args.chunks]]
    emb = Embedder.from_settings(settings).warm_up()
    model = emb._model  # the very model the wrapper uses: only the wrapper differs
    cfg = settings.embedding
    prefixed = [cfg.passage_prefix + t for t in texts]

    def wrapper() -> np.ndarray:
        return emb.encode_passages(texts)

    def bare() -> np.ndarray:
        return model.encode(prefixed, batch_size=cfg.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    best = {"Embedder.encode_passages": float("inf"), "SentenceTransformer.encode": float("inf")}
    fns = {"Embedder.encode_passages": wrapper, "SentenceTransformer.encode": bare}
    emb.encode_passages(texts[:64])  # warm-up (thread pools, first allocations) on a slice: the model is shared
    out: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    print(f"model {emb.model_id} on {emb.device}, {len(texts)} chunks "
          f"(mean {np.mean([len(t) for t in texts]):.0f} characters), batch {cfg.batch_size}, best of {args.repeat}")
    for name, secs in best.items():
        print(f"  {name:28s} {secs:8.2f} s  {len(texts) / secs:7.1f} chunks/s")
    ratio = best["Embedder.encode_passages"] / best["SentenceTransformer.encode"]
    same = float(np.min(np.sum(out["Embedder.encode_passages"] * out["SentenceTransformer.encode"], axis=1)))
    print(f"  wrapper / bare = {ratio:.3f} (target <= 1.20); min cosine between the two outputs {same:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
