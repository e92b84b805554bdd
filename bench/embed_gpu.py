"""Embedding throughput on a CUDA GPU (`embedding.device: cuda`) per precision, the way the Embedder runs it:
SentenceTransformer with the weights cast once (fp32 / fp16 / bf16), encode(batch_size, normalize), float32 out.

    python -m bench.embed_gpu --model models/multilingual-e5-small --texts chunks.json
    python bench/embed_gpu.py --model <folder with config + tokenizer> --random-weights --texts chunks.json

--texts: a JSON list of passage texts (make one here with `python -m bench.embed_gpu --dump-texts chunks.json`:
CMRC trial chunks, 250/50 characters, with the passage prefix). --random-weights builds the folder's architecture
with random weights: for a GPU machine the weights cannot be copied to (speed depends on the shapes, not on the
values; quality is measured on CPU in docs/benchmarks.md). Prints one row per precision and batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dump_texts(path: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.corpus import cmrc_chunks
    from configs import load_settings

    settings = load_settings()
    chunks, _ = cmrc_chunks(settings)
    texts = [settings.embedding.passage_prefix + c.embedding_text() for c in chunks[:n]]
    path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {len(texts)} texts to {path}")


def random_copy(folder: Path) -> Path:
    """The folder's sentence-transformers layout with freshly initialised weights of the same architecture."""
    from transformers import AutoConfig, AutoModel

    out = Path(tempfile.mkdtemp()) / folder.name
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model = AutoModel.from_config(AutoConfig.from_pretrained(out))
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--texts", type=Path)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dump-texts", type=Path, help="write CMRC chunk texts to this file and exit")
    ap.add_argument("--n", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.dump_texts:
        dump_texts(args.dump_texts, args.n)
        return 0

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    folder = random_copy(args.model) if args.random_weights else args.model
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {len(texts)} texts, "
          f"{'random' if args.random_weights else 'real'} weights of {args.model.name}")
    print(f"{'precision':9s} {'batch':>5s} {'seconds':>8s} {'chunks/s':>9s} {'cos->fp32':>9s}")
    ref = None
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        st = SentenceTransformer(str(folder), device="cuda", local_files_only=True)
        st.max_seq_length = 512
        st.to(dtype)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            st.encode(texts[:64], batch_size=bs)
            best = float("inf")
            for _ in range(args.repeat):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                v = st.encode(texts, batch_size=bs, normalize_embeddings=True, convert_to_tensor=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            v = v.float().cpu().numpy()
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            if ref is None:
                ref = v
            cos = float(np.mean(np.sum(v * ref, axis=1)))
            print(f"{name:9s} {bs:5d} {best:8.3f} {len(texts) / best:9.0f} {cos:9.4f}", flush=True)
        del st
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
