"""Hybrid retrieval: fusion math, Chinese BM25, threshold/abstention, neighbour merging, dedupe, stale caches.

Unit tests run on hand-made chunks with hand-made unit vectors in a real FAISS IndexFlatIP, and a query encoder that
returns a chosen vector per question (the test double stands in for the e5 model so each cosine is known exactly).
The CMRC test at the end uses the real multilingual-e5-small model.
"""
from __future__ import annotations

import dataclasses
import hashlib

import faiss
import numpy as np
import pytest

from configs import load_settings
from retrieval import fusion
from retrieval.bm25 import BM25Index, tokenize
from retrieval.hits import char_overlap, join_overlapping, merged_text
from retrieval.retriever import HybridSearcher, KnowledgeBaseRetriever, SearchResult
from retrieval.types import Chunk
from tests.conftest import require_model

DIM = 8


def unit(*weights: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(weights)] = weights
    return v / np.linalg.norm(v)


def cos_vec(c: float, axis: int = 0, other: int = 7) -> np.ndarray:
    """A unit vector whose cosine with basis vector `axis` is exactly `c`."""
    v = np.zeros(DIM, dtype=np.float32)
    v[axis] = c
    v[other] = np.sqrt(1 - c * c)
    return v


class FixedQueries:
    """Query encoder test double: each question maps to a chosen unit vector."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode_query(self, text: str) -> np.ndarray:
        return self.vectors[text]


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def make_index(vectors: list[np.ndarray]) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(DIM)
    index.add(np.vstack(vectors).astype(np.float32))
    return index


def chunk(text: str, file: str, position: int, row: int, **kw) -> Chunk:
    return Chunk(text=text, source=file, sha256=sha(file), position=position, id=row, **kw)


def settings(**retrieval):
    return load_settings(retrieval=retrieval).retrieval


# --- fusion math -----------------------------------------------------------------------------------------------
def test_rrf_sums_reciprocal_ranks():
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    sparse = [(3, 20.0), (4, 10.0)]
    fused = fusion.rrf([dense, sparse], k=60)
    assert fused[1] == pytest.approx(1 / 61)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[4] == pytest.approx(1 / 62)
    assert max(fused, key=fused.get) == 3  # found by both retrievers beats first place in one


def test_rrf_weights_and_bad_arguments():
    fused = fusion.rrf([[(1, 1.0)], [(2, 1.0)]], k=10, weights=[2.0, 1.0])
    assert fused == {1: pytest.approx(2 / 11), 2: pytest.approx(1 / 11)}
    with pytest.raises(ValueError, match="rrf_k must be > 0, got 0"):
        fusion.rrf([[(1, 1.0)]], k=0)
    with pytest.raises(ValueError, match="one weight per ranking"):
        fusion.rrf([[(1, 1.0)]], weights=[1.0, 1.0])


def test_weighted_fusion_normalises_each_list():
    dense = [(1, 0.90), (2, 0.80), (3, 0.70)]       # cosines: small spread
    sparse = [(3, 30.0), (2, 15.0), (5, 0.0)]       # BM25: large spread
    fused = fusion.weighted([dense, sparse], [0.5, 0.5])
    assert fused[1] == pytest.approx(0.5)            # 1.0 dense, absent from BM25
    assert fused[2] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert fused[3] == pytest.approx(0.0 + 0.5)
    assert fused[5] == pytest.approx(0.0)
    assert fusion.min_max([(7, 3.0), (8, 3.0)]) == {7: 1.0, 8: 1.0}


# --- BM25 over jieba ---------------------------------------------------------------------------------------------
def test_tokenize_drops_punctuation_whitespace_and_stopwords():
    toks = tokenize("中华人民共和国成立于1949年。  什么是 BM25？")
    assert "中华人民共和国" in toks and "共和国" in toks  # search mode keeps the long word and its parts
    assert "1949" in toks and "bm25" in toks            # lower-cased
    for dropped in ("。", "？", " ", "什么", "于", "是"):
        assert dropped not in toks


def test_bm25_ranks_chinese_keyword_matches():
    chunks = [
        chunk("故宫位于北京市中心，是明清两代的皇家宫殿。", "a.txt", 0, 0),
        chunk("上海是中国的经济中心，人口超过两千万。", "b.txt", 0, 1),
        chunk("长城是古代中国为抵御外敌修建的军事工程。", "c.txt", 0, 2),
    ]
    index = BM25Index(chunks)
    top = index.search("明清皇家宫殿在哪里？", 3)
    assert top[0][0] == 0 and top[0][1] > 0
    assert [row for row, _ in index.search("长城", 3)] == [2]
    assert index.search("什么？是的。", 3) == []  # only stopwords and punctuation: nothing matches


# --- the searcher over plain inputs -------------------------------------------------------------------------------
@pytest.fixture()
def corpus():
    """Three single-chunk files: dense likes row 0, BM25 likes row 1, both like row 2 (a little)."""
    chunks = [
        chunk("会议纪要：第三季度预算讨论。", "dense.txt", 0, 0),
        chunk("光合作用把光能转化为化学能，光合作用发生在叶绿体。", "bm25.txt", 0, 1),
        chunk("植物的叶绿体进行光合作用。", "both.txt", 0, 2),
    ]
    vectors = [cos_vec(0.95), cos_vec(0.20, other=6), cos_vec(0.90, other=5)]
    q = "光合作用在哪里发生？"
    return chunks, make_index(vectors), FixedQueries({q: unit(1)}), q


def test_hybrid_rrf_prefers_chunks_both_retrievers_found(corpus):
    chunks, index, enc, q = corpus
    # fetch_k=2: each retriever contributes its best two, as fetch_k=50 does in a real KB of thousands
    searcher = HybridSearcher(settings(fusion="rrf", top_k=3, fetch_k=2, merge_neighbors=False, score_threshold=0.5),
                              enc)
    hybrid = searcher.search_chunks(q, chunks, index)
    dense = searcher.search_chunks(q, chunks, index, mode="dense")
    bm25 = searcher.search_chunks(q, chunks, index, mode="bm25")
    assert [h.source for h in dense.hits][0] == "dense.txt"
    assert [h.source for h in bm25.hits][0] == "bm25.txt"
    assert hybrid.hits[0].source == "both.txt"  # rank 2 in dense and rank 2 in BM25 beats rank 1 + absent
    assert hybrid.hits[0].score == pytest.approx(1 / 62 + 1 / 62)
    assert hybrid.hits[0].dense_score == pytest.approx(0.90, abs=1e-6)
    assert hybrid.hits[0].bm25_score is not None and hybrid.hits[0].bm25_score > 0
    # a BM25-only hit still gets its cosine (from the stored vector), and the dense-only hit no BM25 score
    by_source = {h.source: h for h in hybrid.hits}
    assert by_source["bm25.txt"].dense_score == pytest.approx(0.20, abs=1e-6)
    assert by_source["dense.txt"].bm25_score is None


def test_weighted_fusion_setting_changes_the_order(corpus):
    chunks, index, enc, q = corpus
    dense_heavy = HybridSearcher(settings(fusion="weighted", dense_weight=0.9, merge_neighbors=False,
                                          score_threshold=0.5), enc)
    bm25_heavy = HybridSearcher(settings(fusion="weighted", dense_weight=0.1, merge_neighbors=False,
                                         score_threshold=0.5), enc)
    assert dense_heavy.search_chunks(q, chunks, index).hits[0].source == "dense.txt"
    assert bm25_heavy.search_chunks(q, chunks, index).hits[0].source == "bm25.txt"


def test_threshold_abstains_and_keeps_closest_passages(corpus):
    chunks, index, _, q = corpus
    far = FixedQueries({q: cos_vec(0.5, axis=0, other=3)})  # best cosine 0.95 * 0.5 = 0.475
    searcher = HybridSearcher(settings(merge_neighbors=False, score_threshold=0.8), far)
    result = searcher.search_chunks(q, chunks, index)
    assert isinstance(result, SearchResult)
    assert result.evidence is False and result.hits == []
    assert result.best_dense == pytest.approx(0.475, abs=1e-5)
    assert result.low_relevance and result.low_relevance[0].dense_score <= 0.8
    # the same question, a lower threshold: evidence, and the passages move to hits
    lenient = searcher.search_chunks(q, chunks, index, threshold=0.4)
    assert lenient.evidence is True and lenient.hits and lenient.low_relevance == []


def test_bm25_score_alone_is_not_evidence_when_dense_is_far(corpus):
    """A shared keyword must not open the door for an unrelated question."""
    chunks, index, _, q = corpus
    searcher = HybridSearcher(settings(score_threshold=0.8), FixedQueries({q: unit(0, 0, 0, 1)}))
    result = searcher.search_chunks(q, chunks, index, mode="bm25")
    assert result.evidence is False and result.low_relevance[0].source == "bm25.txt"


def test_bm25_mode_without_embedder_uses_keyword_matches():
    chunks = [chunk("苹果是一种水果。", "f.txt", 0, 0), chunk("汽车需要汽油。", "g.txt", 0, 1)]
    searcher = HybridSearcher(settings(mode="bm25"), embedder=None)
    found = searcher.search_chunks("苹果", chunks, make_index([unit(1), unit(0, 1)]))
    assert found.evidence and [h.source for h in found.hits] == ["f.txt"] and found.hits[0].dense_score is None
    assert searcher.search_chunks("火箭", chunks, make_index([unit(1), unit(0, 1)])).evidence is False
    with pytest.raises(ValueError, match="needs an embedding model"):
        searcher.search_chunks("苹果", chunks, None, mode="hybrid")


# --- neighbour merging ----------------------------------------------------------------------------------------------
def overlapping_file(name: str, sentences: list[str], overlap_sentences: int = 1) -> list[str]:
    """Chunk texts of two sentences each, sharing `overlap_sentences` with the previous chunk (like the splitter)."""
    texts, i = [], 0
    while i < len(sentences):
        texts.append("".join(sentences[i : i + 2]))
        i += 2 - overlap_sentences
    return texts


def test_neighbour_merging_joins_adjacent_chunks_without_repeating_overlap():
    sents = ["甲方应在每月五日前付款。", "逾期付款按日计收万分之五的违约金。", "违约金上限为合同总额的百分之十。",
             "双方争议提交仲裁委员会解决。", "本合同一式两份。"]
    texts = overlapping_file("contract.txt", sents)
    chunks = [chunk(t, "contract.txt", i, i, page=i + 1) for i, t in enumerate(texts)]
    chunks.append(chunk("无关的文件内容，讲的是天气预报。", "other.txt", 0, len(chunks)))
    q = "违约金是多少？"
    assert len(texts) == 5  # s0s1, s1s2, s2s3, s3s4, s4
    vectors = [cos_vec(0.3, other=2), cos_vec(0.95, other=3), cos_vec(0.85, other=4), cos_vec(0.2, other=5),
               cos_vec(0.15), cos_vec(0.1, other=6)]
    index = make_index(vectors)
    enc = FixedQueries({q: unit(1)})

    merged = HybridSearcher(settings(top_k=1, max_hit_chars=600, score_threshold=0.5), enc).search_chunks(
        q, chunks, index, mode="dense")
    top = merged.hits[0]
    assert top.chunk_ids == (0, 1, 2)                      # the hit (row 1) and both neighbours, in file order
    assert top.text == "".join(sents[:4])                  # overlap sentences appear once
    assert top.page == 1 and top.source == "contract.txt"  # page of the first merged chunk
    assert top.dense_score == pytest.approx(0.95, abs=1e-6)

    # a tight limit keeps only the more relevant neighbour (row 2, cosine 0.85, beats row 0, cosine 0.3)
    tight = HybridSearcher(settings(top_k=1, max_hit_chars=len(merged_text(texts[1:3])), score_threshold=0.5), enc)
    hit = tight.search_chunks(q, chunks, index, mode="dense").hits[0]
    assert hit.chunk_ids == (1, 2) and len(hit.text) <= len(merged_text(texts[1:3]))

    # neighbours already shown are not shown again; the next hit starts from the next uncovered chunk
    two = HybridSearcher(settings(top_k=2, max_hit_chars=600, score_threshold=0.5), enc).search_chunks(
        q, chunks, index, mode="dense")
    ids = [i for h in two.hits for i in h.chunk_ids]
    assert len(ids) == len(set(ids)) and 5 not in two.hits[0].chunk_ids  # other.txt never merged into contract

    off = HybridSearcher(settings(top_k=1, merge_neighbors=False, score_threshold=0.5), enc)
    assert off.search_chunks(q, chunks, index, mode="dense").hits[0].chunk_ids == (1,)


def test_join_overlapping_removes_only_real_overlap():
    assert join_overlapping("第一句。第二句。", "第二句。第三句。") == "第一句。第二句。第三句。"
    assert join_overlapping("他来了的", "的确如此") == "他来了的的确如此"  # a 1-char coincidence is not overlap
    assert merged_text(["abcdefg", "defghij", "ghijklm"]) == "abcdefghijklm"


# --- de-duplication -----------------------------------------------------------------------------------------------
def test_near_duplicate_hits_are_removed():
    text = "员工每年享有十五天带薪年假，未休完的年假可以顺延到下一年的第一季度使用。"
    edited = text.replace("十五天", "15天")
    other = "报销单据须在费用发生后三十天内提交财务部门审核。"
    chunks = [chunk(text, "v1.txt", 0, 0), chunk(edited, "v2.txt", 0, 1), chunk(text, "copy.txt", 0, 2),
              chunk(other, "money.txt", 0, 3)]
    assert char_overlap(text, edited) > 0.8
    q = "年假有几天？"
    index = make_index([cos_vec(0.9, other=2), cos_vec(0.89, other=3), cos_vec(0.9, other=2), cos_vec(0.5, other=4)])
    searcher = HybridSearcher(settings(top_k=4, dedupe_threshold=0.8, score_threshold=0.5), FixedQueries({q: unit(1)}))
    sources = [h.source for h in searcher.search_chunks(q, chunks, index).hits]
    assert sources.count("v1.txt") + sources.count("v2.txt") + sources.count("copy.txt") == 1
    assert "money.txt" in sources
    # by vector alone: distinct texts whose vectors coincide are duplicates at the threshold
    twins = [chunk("第一份说明。", "x.txt", 0, 0), chunk("完全不同的另一段话。", "y.txt", 0, 1)]
    same_vec = make_index([cos_vec(0.9, other=2), cos_vec(0.9, other=2)])
    hits = searcher.search_chunks(q, twins, same_vec, mode="dense").hits
    assert len(hits) == 1


def test_errors_are_sentences_naming_the_value(corpus):
    chunks, index, enc, q = corpus
    searcher = HybridSearcher(settings(), enc)
    with pytest.raises(ValueError, match="question is empty"):
        searcher.search_chunks("  ", chunks, index)
    with pytest.raises(ValueError, match="retrieval.mode must be one of hybrid, dense, bm25, got 'fuzzy'"):
        searcher.search_chunks(q, chunks, index, mode="fuzzy")
    with pytest.raises(ValueError, match=r"top_k\) must be > 0, got 0"):
        searcher.search_chunks(q, chunks, index, k=0)
    wrong_dim = faiss.IndexFlatIP(4)
    wrong_dim.add(np.eye(4, dtype=np.float32)[:3])
    with pytest.raises(ValueError, match="8-dimensional vectors but this knowledge base was built with 4"):
        searcher.search_chunks(q, chunks, wrong_dim)
    empty = searcher.search_chunks(q, [], faiss.IndexFlatIP(DIM))  # an empty KB: nothing, and no evidence
    assert empty.hits == [] and empty.evidence is False


# --- a real store: generations and the BM25 cache --------------------------------------------------------------------
def _commit(kb_name: str, st, files: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write `files` (path -> (text, vector)) as the KB's next generation, removing paths not listed."""
    from retrieval.store import FileEntry, KnowledgeBase

    kb = KnowledgeBase.open_or_create(kb_name, st)
    with kb.writer() as w:
        for path in list(w.files):
            if path not in files:
                w.remove(path)
        for path, (text, vec) in files.items():
            digest = sha(text)
            w.add_content(digest, [Chunk(text=text, source=path, sha256=digest, position=0)], vec[None, :])
            w.put(FileEntry(path=path, sha256=digest, size=len(text.encode()), mtime=0.0, status="ok"))
        w.commit()


def test_new_generation_without_a_file_never_returns_it(tmp_settings):
    from retrieval.store import KnowledgeBase

    q = "公司的差旅报销标准是什么？"
    enc = FixedQueries({q: unit(1)})
    files = {
        "docs/travel.txt": ("差旅报销标准：住宿每晚不超过五百元，差旅报销须附发票。", cos_vec(0.9, other=2)),
        "docs/holiday.txt": ("年假规定：员工每年十五天年假。", cos_vec(0.3, other=3)),
    }
    _commit("policies", tmp_settings, files)
    retriever = KnowledgeBaseRetriever(kb_name="policies", settings=tmp_settings,
                                       searcher=HybridSearcher(tmp_settings.retrieval, enc))
    docs = retriever.invoke(q)
    assert docs[0].metadata["source"] == "docs/travel.txt"
    assert docs[0].page_content.startswith("差旅报销标准")
    assert set(docs[0].metadata) >= {"source", "page", "heading", "score", "chunk_ids"}
    gen1 = retriever.knowledge_base().generation

    # the travel policy is deleted: the next generation must never return it, even though BM25 for gen 1 is cached
    del files["docs/travel.txt"]
    _commit("policies", tmp_settings, files)
    result = retriever.search(q)
    kb = retriever.knowledge_base()
    assert kb.generation != gen1
    returned = result.hits + result.low_relevance
    assert returned and all("差旅" not in h.text and h.source != "docs/travel.txt" for h in returned)
    assert (str(kb.path), kb.generation) in retriever.searcher._cache.keys()
    assert result.evidence is False  # the only remaining file is unrelated (cosine 0.27 < 0.8)
    assert retriever.invoke(q) == []  # LangChain users get no documents without evidence...
    retriever.include_low_relevance = True
    assert retriever.invoke(q)[0].metadata["evidence"] is False  # ...unless they ask for the closest ones

    # the same content under two live paths: the hit names a live path
    fresh = KnowledgeBase.open("policies", tmp_settings)
    searcher = HybridSearcher(tmp_settings.retrieval, FixedQueries({"年假几天": unit(1)}))
    h = searcher.search(fresh, "年假几天", threshold=0)
    assert h.hits[0].source in fresh.sources_for(fresh.chunks[h.hits[0].chunk_ids[0]].sha256)


def test_search_result_hits_are_frozen_dataclasses(corpus):
    chunks, index, enc, q = corpus
    hit = HybridSearcher(settings(score_threshold=0.5), enc).search_chunks(q, chunks, index).hits[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        hit.score = 1.0  # type: ignore[misc]


# --- real model, real data: CMRC 2018 trial, first 40 paragraphs ------------------------------------------------------
# Measured with multilingual-e5-small, chunk_size 250 / overlap 50, default retrieval settings (docs/retrieval.md):
# 151 questions, hybrid hit@5 0.993, hit@1 0.921 (dense hit@5 0.987, BM25 0.980). The bar leaves room for a different
# CPU's float noise
# and small splitter changes, not for a broken retriever (no merging alone drops hybrid hit@5 to ~0.97, BM25 without
# jieba to far less).
CMRC_SUBSET_PASSAGES = 40
CMRC_HYBRID_HIT5_BAR = 0.95


def test_cmrc_subset_hybrid_retrieval_quality(cmrc_trial, models_dir, tmp_path):
    from bench.retrieval_cmrc import build_kb, evaluate, read_cmrc

    st = load_settings()
    require_model(models_dir, st.embedding.model)
    passages, questions = read_cmrc(cmrc_trial, limit=CMRC_SUBSET_PASSAGES)
    assert len(passages) == CMRC_SUBSET_PASSAGES and len(questions) > 100
    kb = build_kb(passages, st, cache_root=tmp_path)
    results = evaluate(kb, questions, st)
    hybrid = results["hybrid"]
    assert hybrid["hit@5"] >= CMRC_HYBRID_HIT5_BAR, results
    assert hybrid["hit@5"] >= max(results["dense"]["hit@5"], results["bm25"]["hit@5"]), results
    assert hybrid["hit@1"] <= hybrid["hit@3"] <= hybrid["hit@5"] <= hybrid["hit@10"]


def test_join_without_overlap_keeps_line_breaks_and_one_table_header():
    # a list item after a finished sentence starts a new line instead of being glued to it
    assert join_overlapping("不支持的文件会被跳过并说明原因。", "- 单个文件不能超过 100 MB；") == \
        "不支持的文件会被跳过并说明原因。\n- 单个文件不能超过 100 MB；"
    # two pieces of one table (the splitter repeats the header in each): the header appears once
    a = "配置项 | 默认值\n配置项: a | 默认值: 1\n配置项: b | 默认值: 2"
    b = "配置项 | 默认值\n配置项: c | 默认值: 3"
    assert merged_text([a, b]) == a + "\n配置项: c | 默认值: 3"


def test_neighbours_of_another_section_are_not_merged():
    """A FAQ: each question is its own section; merging must not glue the next question's answer under this one."""
    texts = ["不会。删除文件后，它的段落会从知识库中移除。", "不需要。网页只从本机服务加载内容。",
             "可以。多个人可以同时提问。"]
    heads = [("常见问题", "删除的文件还会出现吗？"), ("常见问题", "页面需要联网吗？"), ("常见问题", "页面需要联网吗？")]
    chunks = [dataclasses.replace(chunk(t, "faq.md", i, i), heading_path=h)
              for i, (t, h) in enumerate(zip(texts, heads, strict=False))]
    q = "页面需要联网吗？"
    index = make_index([cos_vec(0.7, other=2), cos_vec(0.95, other=3), cos_vec(0.6, other=4)])
    hit = HybridSearcher(settings(top_k=1, max_hit_chars=600, score_threshold=0.5), FixedQueries({q: unit(1)})) \
        .search_chunks(q, chunks, index, mode="dense").hits[0]
    assert hit.chunk_ids == (1, 2)  # the same section's next chunk, not the previous question's answer
    assert "不会" not in hit.text and hit.text.startswith("不需要")
