"""retrieval/embeddings.py: a tiny random BERT folder for the mechanics (fast), the real multilingual-e5-small of
the model pack for prefixes, normalisation and Chinese similarity."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from langchain_core.embeddings import Embeddings

from configs import load_settings
from retrieval.embeddings import Embedder, EmbedderError, ModelMissingError
from tests.conftest import require_model
from tests.support.tiny_embedder import build_tiny_embedder

TEXTS = ["北京是中国的首都。", "短", "今天天气很好，我们去公园散步吧。" * 3, "模型训练需要大量显存。", "hello world"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("emb") / "tiny-embedder")


def make(folder: Path, **embedding) -> Embedder:
    """fp32 unless a test asks for another precision: the mechanics compare with the bare model exactly."""
    return Embedder.from_settings(load_settings(embedding={"model": str(folder), "precision": "fp32", **embedding}))


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> Embedder:
    return make(tiny_folder).warm_up()


# ---------------------------------------------------------------------------------------------- loading ----------
def test_from_settings_only_stores_and_a_missing_model_says_what_to_do(tmp_path: Path) -> None:
    emb = Embedder.from_settings(load_settings(embedding={"model": "no-such-model"}))
    assert emb._model is None and emb._tokenizer is None
    assert emb.folder == load_settings().models_dir / "no-such-model"
    for use in (emb.warm_up, lambda: emb.count_tokens("x"), lambda: emb.encode_query("x"), lambda: emb.model_id):
        with pytest.raises(ModelMissingError) as err:
            use()
        assert "python -m modelpack pull demo" in str(err.value) and "embedding.model" in str(err.value)
        assert str(emb.folder) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelMissingError, match="not a sentence-transformers or Hugging Face model folder"):
        make(tmp_path / "empty").warm_up()


def test_loads_offline_and_lazily(tiny_folder: Path) -> None:
    emb = make(tiny_folder)
    assert emb._model is None
    emb.encode_query("你好")
    assert emb._model is not None and os.environ["HF_HUB_OFFLINE"] == "1"


def test_concurrent_first_use_loads_once(tiny_folder: Path) -> None:
    emb = make(tiny_folder)
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: emb._get_model(), range(4)))
    assert all(m is models[0] for m in models)


def test_pickles_without_its_model_for_worker_processes(tiny: Embedder) -> None:
    import pickle

    count = pickle.loads(pickle.dumps(tiny.count_tokens))  # what ingest hands to its parser processes
    assert count.__self__._model is None and count.__self__.folder == tiny.folder
    assert count("你好") == tiny.count_tokens("你好")


def test_device_setting(tiny_folder: Path) -> None:
    assert make(tiny_folder, device="cpu").device == "cpu"
    assert make(tiny_folder, device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EmbedderError, match="embedding.device is 'cuda'"):
            make(tiny_folder, device="cuda").warm_up()


def test_precision_auto_follows_the_processor_and_bf16_stays_close_to_fp32(tiny_folder: Path, tiny: Embedder) -> None:
    from common.cpu import has_native_bf16

    assert make(tiny_folder, device="cpu", precision="auto").precision == ("bf16" if has_native_bf16() else "fp32")
    assert make(tiny_folder, precision="fp32").precision == "fp32"
    bf16 = make(tiny_folder, precision="bf16")
    assert bf16.precision == "bf16" and bf16.model_id == tiny.model_id  # same stored vectors: KBs stay compatible
    vecs, ref = bf16.encode_passages(TEXTS), tiny.encode_passages(TEXTS)
    assert vecs.dtype == np.float32 and bf16._model.dtype == torch.bfloat16
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(vecs * ref, axis=1)) > 0.99
    if not torch.cuda.is_available():
        with pytest.raises(EmbedderError, match="fp16' needs embedding.device 'cuda'"):
            make(tiny_folder, precision="fp16").warm_up()


# ---------------------------------------------------------------------------------------------- encoding ---------
def test_is_a_langchain_embeddings(tiny: Embedder) -> None:
    assert isinstance(tiny, Embeddings)
    docs = tiny.embed_documents(TEXTS[:2])
    assert len(docs) == 2 and len(docs[0]) == tiny.dim and all(isinstance(x, float) for x in docs[0])
    q = tiny.embed_query("你好")
    assert len(q) == tiny.dim and isinstance(q[0], float)


def test_passages_normalised_float32_in_input_order_with_prefix(tiny: Embedder) -> None:
    vecs = tiny.encode_passages(TEXTS)
    assert vecs.shape == (len(TEXTS), tiny.dim) and vecs.dtype == np.float32 and vecs.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    bare = tiny._model.encode(["passage: " + t for t in TEXTS], normalize_embeddings=True)
    np.testing.assert_allclose(vecs, bare, atol=1e-5)
    # Row i belongs to TEXTS[i] however the batches were sorted by length.
    one_by_one = np.stack([tiny.encode_passages([t])[0] for t in TEXTS])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)
    assert tiny.encode_passages([]).shape == (0, tiny.dim)


def test_query_prefix_differs_from_passage_prefix(tiny: Embedder) -> None:
    q = tiny.encode_query("北京是中国的首都。")
    assert q.shape == (tiny.dim,) and q.dtype == np.float32
    np.testing.assert_allclose(q, tiny._model.encode("query: 北京是中国的首都。", normalize_embeddings=True), atol=1e-5)
    assert not np.allclose(q, tiny.encode_passages(["北京是中国的首都。"])[0], atol=1e-3)


def test_bge_style_prefixes(tiny_folder: Path) -> None:
    instruction = "为这个句子生成表示以用于检索相关文章："
    emb = make(tiny_folder, query_prefix=instruction, passage_prefix="").warm_up()
    np.testing.assert_allclose(
        emb.encode_passages(["你好"])[0], emb._model.encode("你好", normalize_embeddings=True), atol=1e-5
    )
    np.testing.assert_allclose(
        emb.encode_query("你好"), emb._model.encode(instruction + "你好", normalize_embeddings=True), atol=1e-5
    )
    assert emb.count_tokens("你好") == 4  # [CLS] 你 好 [SEP]: no passage prefix


def test_a_default_prompt_saved_in_the_folder_is_not_added_twice(tiny: Embedder, tiny_folder: Path,
                                                                  tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "with-prompts")
    cfg_path = folder / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="passage")
    cfg_path.write_text(json.dumps(cfg))
    emb = make(folder).warm_up()
    # Same weights as `tiny`, whose folder has no prompts: the same vector means the prefix went in once.
    np.testing.assert_allclose(emb.encode_passages(["你好"]), tiny.encode_passages(["你好"]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- limits, identity -
def test_count_tokens_includes_prefix_and_special_tokens_without_truncation(tiny: Embedder) -> None:
    # [CLS] p ##a ##s ##s ##a ##g ##e : 你 好 [SEP]
    assert tiny.count_tokens("你好") == len(tiny._model.tokenizer("passage: 你好")["input_ids"]) == 12
    assert tiny.count_tokens("你" * 300) == 300 + 10 > tiny.max_tokens  # counted in full, never cut at the limit
    # Encoding first (which makes sentence-transformers truncate) does not change the count.
    tiny.encode_passages(["你" * 300])
    assert tiny.count_tokens("你" * 300) == 310


def test_max_tokens_is_the_smaller_of_setting_and_model(tiny_folder: Path) -> None:
    assert make(tiny_folder, max_seq_length=512).max_tokens == 128  # the tiny model's positions
    emb = make(tiny_folder, max_seq_length=64)
    assert emb.max_tokens == 64
    emb.warm_up()
    assert emb._model.max_seq_length == 64  # encoding truncates where the splitter stops


def test_model_id_is_name_plus_fingerprint_and_detects_a_changed_model(tiny_folder: Path, tmp_path: Path) -> None:
    a = make(tiny_folder).model_id
    assert a == make(tiny_folder).model_id and a.startswith("tiny-embedder-") and len(a) == len("tiny-embedder-") + 12
    assert make(tiny_folder, query_prefix="问：").model_id == a  # queries are not stored
    assert make(tiny_folder, passage_prefix="").model_id != a  # stored passage vectors would differ
    assert make(tiny_folder, max_seq_length=64).model_id != a
    copy = shutil.copytree(tiny_folder, tmp_path / "tiny-embedder")
    assert make(copy).model_id == a  # same content, same id, wherever it lives
    cfg = copy / "1_Pooling" / "config.json"
    cfg.write_text(cfg.read_text().replace('"mean"', '"max"'))
    assert '"max"' in cfg.read_text()
    assert make(copy).model_id != a
    shutil.rmtree(copy)
    copy = shutil.copytree(tiny_folder, tmp_path / "tiny-embedder")
    build_tiny_embedder(copy, hidden_size=48)  # other weights
    assert make(copy).model_id != a


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_folder: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = make(tiny_folder, device="cuda", precision="fp32")
    cpu = make(tiny_folder, device="cpu", precision="fp32")
    np.testing.assert_allclose(gpu.encode_passages(TEXTS), cpu.encode_passages(TEXTS), atol=1e-4)
    assert make(tiny_folder, device="cuda", precision="auto").precision == "fp32"
    half = make(tiny_folder, device="cuda", precision="fp16")
    assert np.min(np.sum(half.encode_passages(TEXTS) * cpu.encode_passages(TEXTS), axis=1)) > 0.99


# ---------------------------------------------------------------------------------------------- real e5 ----------
@pytest.fixture(scope="module")
def e5(models_dir: Path) -> Embedder:
    require_model(models_dir, "multilingual-e5-small")
    return make(models_dir / "multilingual-e5-small").warm_up()


def test_e5_shape_limits_and_prefixes(e5: Embedder) -> None:
    assert e5.dim == 384 and e5.max_tokens == 512 and e5.model_id.startswith("multilingual-e5-small-")
    q = "中国的首都是哪里？"
    np.testing.assert_allclose(e5.encode_query(q), e5._model.encode("query: " + q, normalize_embeddings=True),
                               atol=1e-5)
    vecs = e5.encode_passages(TEXTS)
    np.testing.assert_allclose(vecs, e5._model.encode(["passage: " + t for t in TEXTS], normalize_embeddings=True),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert e5.count_tokens("你好") > len(e5._model.tokenizer("你好")["input_ids"])  # the prefix is counted


def test_e5_chinese_similarity(e5: Embedder) -> None:
    passages = ["北京是中华人民共和国的首都。", "今天天气很好，我们去公园散步吧。", "这款手机的电池续航时间很长。",
                "长江是中国最长的河流。"]
    scores = e5.encode_passages(passages) @ e5.encode_query("中国的首都是哪里？")
    # e5 scores sit in a narrow band (0.8-0.9): the paraphrase wins, and clearly over the unrelated sentences.
    assert scores.argmax() == 0 and scores[0] - max(scores[1], scores[2]) > 0.05
    scores = e5.encode_passages(passages) @ e5.encode_query("中国哪条河最长？")
    assert scores.argmax() == 3


def test_e5_finds_cmrc_passages(e5: Embedder, cmrc_trial: Path) -> None:
    """Each of 20 CMRC questions against the chunk (250 characters, as ingested) that holds its answer."""
    from langchain_core.documents import Document

    from ingest.splitter import split_documents

    data = json.loads(cmrc_trial.read_text(encoding="utf-8"))["data"]
    questions, chunks = [], []
    for para in [p for d in data for p in d["paragraphs"]][:20]:
        qa = para["qas"][0]
        parts = split_documents([Document(para["context"], metadata={"kind": "text"})], source="cmrc", sha256="",
                                chunk_size=250, chunk_overlap=50)
        chunks.append(next(c.text for c in parts if qa["answers"][0]["text"] in c.text))
        questions.append(qa["question"])
    passages = e5.encode_passages(chunks)
    queries = np.stack([e5.encode_query(q) for q in questions])
    hit_at_1 = float(np.mean((queries @ passages.T).argmax(1) == np.arange(len(chunks))))
    assert hit_at_1 >= 0.8, f"hit@1 {hit_at_1:.2f} over {len(chunks)} CMRC questions"
