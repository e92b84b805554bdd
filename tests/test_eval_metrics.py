"""Evaluation metrics and dataset readers on hand-made cases whose right values are worked out by hand."""
from __future__ import annotations

import json

import pytest

from bench.eval.datasets import DatasetError, gold_kept, gold_lost, read_eval_set, sample_questions, split_for_eval
from bench.eval.metrics import (
    char_f1,
    contains_answer,
    contains_any_answer,
    exact_match,
    first_rank,
    hit_at,
    mean,
    normalize_answer,
    normalize_for_match,
    percentile,
    reciprocal_rank,
    references,
)

# --- normalisation (CMRC 2018: punctuation and spaces removed, widths and case unified) ---------------

@pytest.mark.parametrize("raw, norm", [
    (" 《北京》 市。", "北京市"),
    ("ＡＢc 1２", "abc12"),                      # full-width letters/digits → ASCII, lower-case
    ("“踢爆”！", "踢爆"),
    ("4 分钟", "4分钟"),
    ("1,000-2,000", "10002000"),
    ("，。、", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_for_match_keeps_punctuation_but_drops_line_breaks():
    assert normalize_for_match("西班牙语\r\n言（ESPAÑOL）") == "西班牙语言(español)"
    assert "4分钟" not in normalize_for_match("4，分钟")


# --- EM / F1 --------------------------------------------------------------------------------------

def test_exact_match_ignores_punctuation_and_uses_best_reference():
    ans = (("北京市", "北京"),)
    assert exact_match("北京。", ans) == 1.0
    assert exact_match("  北京市 ", ans) == 1.0
    assert exact_match("首都北京", ans) == 0.0


def test_char_f1_known_values():
    # pred 北京 (2 chars) vs ref 北京市 (3): common 2, P = 1, R = 2/3, F1 = 0.8
    assert char_f1("北京", (("北京市",),)) == pytest.approx(0.8)
    # best over references: 北京 matches the second alternative exactly
    assert char_f1("北京", (("北京市", "北京"),)) == pytest.approx(1.0)
    # pred 中国首都北京 (6) vs 北京 (2): common 2, P = 1/3, R = 1, F1 = 0.5
    assert char_f1("中国首都北京", (("北京",),)) == pytest.approx(0.5)
    # repeated characters count with multiplicity: 哈哈哈 vs 哈: common 1, P = 1/3, R = 1 → 0.5
    assert char_f1("哈哈哈", (("哈",),)) == pytest.approx(0.5)
    assert char_f1("上海", (("北京",),)) == 0.0
    assert char_f1("", (("北京",),)) == 0.0


def test_multi_part_answer_references_and_containment():
    ans = (("1月2日", "一月二日"), ("1月3日",))
    assert references(ans) == ["1月2日、1月3日"]
    assert exact_match("1月2日、1月3日", ans) == 1.0
    assert contains_answer("比赛在一月二日和1月3日举行", ans)
    assert not contains_answer("比赛在1月2日举行", ans)               # second part missing
    assert contains_any_answer("比赛在1月2日举行", ans)


def test_contains_answer_across_line_breaks_and_widths():
    assert contains_answer("玩家以水枪、小枪\r\n、锤子泡封敌人", (("水枪、小枪、锤子",),))
    assert contains_answer("共有４分钟", (("4分钟",),))
    assert not contains_answer("共有4小时", (("4分钟",),))


# --- ranking --------------------------------------------------------------------------------------

def test_rank_hit_and_mrr():
    rank = first_rank([False, False, True, True])
    assert rank == 3
    assert [hit_at(rank, k) for k in (1, 3, 5, 10)] == [0.0, 1.0, 1.0, 1.0]
    assert reciprocal_rank(rank, 10) == pytest.approx(1 / 3)
    assert reciprocal_rank(11, 10) == 0.0
    assert first_rank([False] * 10) is None
    assert hit_at(None, 10) == 0.0 and reciprocal_rank(None) == 0.0
    # MRR@10 over four questions with first relevant ranks 1, 2, none, 4 → (1 + 0.5 + 0 + 0.25) / 4
    assert mean([reciprocal_rank(r) for r in (1, 2, None, 4)]) == pytest.approx(0.4375)


def test_mean_and_percentile():
    assert mean([]) is None
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="within 0..100"):
        percentile([1.0], 101)


# --- dataset readers and the unanswerable split -----------------------------------------------------

def _squad(tmp_path):
    data = {"data": [{"title": "T", "paragraphs": [
        {"id": f"P{i}", "context": f"第{i}段。答案是{i}号。",
         "qas": [{"id": f"Q{i}a", "question": f"第{i}段的答案？", "answers": [{"text": f"{i}号"}, {"text": f"{i}号"}]},
                 {"id": f"Q{i}b", "question": f"第{i}段？", "answers": [{"text": f"第{i}段"}]}]}
        for i in range(10)]}]}
    p = tmp_path / "mini.json"
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return p


def test_read_squad_and_split(tmp_path):
    ds = read_eval_set(_squad(tmp_path))
    assert len(ds.passages) == 10 and len(ds.questions) == 20
    assert ds.questions[0].answer == (("0号",),)          # duplicate annotator answers collapse
    split = split_for_eval(ds, unanswerable_share=0.2, seed=1)
    # two questions per passage: holding out 2 passages makes exactly 4 of 20 questions unanswerable
    assert len(split.unanswerable) == 4 and len(split.held_out) == 2 and len(split.kb_passages) == 8
    kb_ids = {p.id for p in split.kb_passages}
    assert all(not set(q.positives) & kb_ids for q in split.unanswerable)
    assert all(set(q.positives) & kb_ids for q in split.answerable)
    sample = sample_questions(split, 10, seed=1)
    assert len(sample) == 10 and sum(q in split.unanswerable for q in sample) == 2


def test_split_on_multi_positive_data_removes_only_the_unanswerable_questions_gold(tmp_path):
    """RGB-style data: questions with several gold passages, some shared. The split must leave every answerable
    question all of its gold passages, and make unanswerable only questions none of whose positives is left."""
    rows, shared = [], [f"共享段落{i}。记录了数字{i}。" for i in range(6)]
    for i in range(30):
        own = [f"问题{i}的第{j}段：答案是{i}号。" for j in range(3)]
        pos = own + ([shared[i % 6]] if i % 3 == 0 else [])   # every third question also needs a shared passage
        rows.append({"id": i, "query": f"问题{i}的答案？", "answer": [f"{i}号"], "positive": pos,
                     "negative": [f"噪声{i}。"]})
    p = tmp_path / "multi.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ds = read_eval_set(p)
    for seed in range(5):
        split = split_for_eval(ds, unanswerable_share=0.3, seed=seed)
        assert len(split.unanswerable) == 9 and len(split.answerable) == 21
        kb = {q.id for q in split.kb_passages}
        assert all(not set(q.positives) & kb for q in split.unanswerable)
        assert all(set(q.positives) <= kb for q in split.answerable)      # nothing taken from answerable ones
        assert gold_lost(split) == 0
        assert sum(gold_kept(split).values()) == 21 and set(gold_kept(split)) <= {3, 4}
        # a shared passage needed by an answerable question stays, so its unanswerable sharers are never chosen
        for q in split.unanswerable:
            assert len(q.positives) == 3 or all(o in split.unanswerable for o in ds.questions
                                                if set(o.positives) & set(q.positives))


def test_read_jsonl_answers_and_shared_passages(tmp_path):
    p = tmp_path / "rgb.jsonl"
    rows = [
        {"id": 1, "query": "谁赢了？", "answer": [["甲队", "甲"]], "positive": ["甲队赢了。"],
         "negative": ["天气晴。"]},
        {"id": 2, "query": "哪两天？", "answer": ["1月2日", "1月3日"], "positive": ["1月2日和1月3日。", "甲队赢了。"],
         "negative": ["天气晴。"]},
    ]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ds = read_eval_set(p)
    assert len(ds.passages) == 3                          # shared passages are written once
    assert ds.questions[0].answer == (("甲队", "甲"),)
    assert ds.questions[1].answer == (("1月2日",), ("1月3日",))
    assert len(ds.questions[1].positives) == 2


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "answer": [], "positive": ["x"]}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl line 1: `answer` is empty"):
        read_eval_set(bad)
    with pytest.raises(DatasetError, match="not found"):
        read_eval_set(tmp_path / "missing.json")


def test_cmrc_trial_reads(cmrc_trial):
    ds = read_eval_set(cmrc_trial)
    assert len(ds.passages) == 256
    assert len(ds.questions) + ds.skipped == 1002
    q = next(q for q in ds.questions if q.id == "TRIAL_800_QUERY_1")
    assert q.answer == (("4分钟",),) and q.positives == ("TRIAL_800",)
    assert contains_answer(ds.passages["TRIAL_800"].text, q.answer)


# --- judging real Hit lists ------------------------------------------------------------------------

def test_judge_hits_strict_and_loose_and_summary():
    from bench.eval.datasets import Question
    from bench.eval.retrieval_eval import judge_hits, summarize
    from retrieval.types import Hit

    q = Question("q", "若游戏中离，则多少分钟内不得进行配对？", (("4分钟",),), ("P1",))
    files = {"P1.pdf": "P1", "P2.txt": "P2"}
    hits = [
        Hit(text="无关的段落。", score=0.9, source="/kb/P2.txt", chunk_ids=(3,)),
        Hit(text="另一篇也说4分钟。", score=0.8, source="/kb/P2.txt", chunk_ids=(4,)),   # answer, wrong passage
        Hit(text="P1 的开头，没有答案。", score=0.7, source="/kb/P1.pdf", chunk_ids=(0,)),  # gold passage, no answer
        Hit(text="则4\n分钟内不得进行配对", score=0.6, source="/kb/P1.pdf", chunk_ids=(1,)),  # both
    ]
    ranks = judge_hits(hits, q, files)
    assert ranks == {"strict_rank": 4, "loose_rank": 2}

    rows = [
        {"answerable": True, "strict_rank": 4, "loose_rank": 2, "latency_ms": 10.0, "evidence": True},
        {"answerable": True, "strict_rank": 1, "loose_rank": 1, "latency_ms": 20.0, "evidence": True},
        {"answerable": True, "strict_rank": None, "loose_rank": 3, "latency_ms": 30.0, "evidence": False},
        {"answerable": False, "strict_rank": None, "loose_rank": None, "latency_ms": 40.0, "evidence": False},
    ]
    s = summarize(rows)
    assert s["n"] == 3 and s["n_unanswerable"] == 1
    assert s["strict"]["hit@1"] == pytest.approx(1 / 3)
    assert s["strict"]["hit@5"] == pytest.approx(2 / 3)
    assert s["strict"]["mrr@10"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert s["loose"]["hit@3"] == pytest.approx(1.0)
    assert s["loose"]["mrr@10"] == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert s["latency_ms"]["p50"] == pytest.approx(25.0)
    assert s["no_evidence_rate_answerable"] == pytest.approx(1 / 3)
    assert s["no_evidence_rate_unanswerable"] == pytest.approx(1.0)


def test_answer_rows_refusal_and_speed():
    from bench.eval.answer_eval import evaluate_answers, looks_like_refusal
    from bench.eval.datasets import Question

    class Stream:
        def __init__(self, pieces, refused=False):
            self.pieces, self.refused, self.sources = pieces, refused, []

        def __iter__(self):
            return iter(self.pieces)

    replies = {"甲?": Stream(["4", "分钟", "。"]), "乙?": Stream(["根据已知信息无法回答该问题。"]),
               "丙?": Stream([], refused=True), "丁?": Stream(["北京"])}
    qs = [Question("a", "甲?", (("4分钟",),), ("P",)), Question("b", "乙?", (("上海",),), ("P",)),
          Question("c", "丙?", (("x",),), ("Q",)), Question("d", "丁?", (("北京市",),), ("Q",))]
    summary, rows = evaluate_answers(lambda q: replies[q], qs, unanswerable_ids={"c", "d"})
    assert looks_like_refusal("根据已知信息无法回答该问题。") and not looks_like_refusal("4分钟")
    assert [r["refused"] for r in rows] == [False, True, True, False]
    assert summary["em"] == pytest.approx(0.5)                    # "4分钟。" exact; the refusal is not
    assert summary["false_refusal_rate"] == pytest.approx(0.5)
    assert summary["refusal_rate"] == pytest.approx(0.5)          # answered 丁 although its passage is absent
    assert rows[0]["tokens"] == 3 and rows[2]["ttft_s"] is None    # a service refusal has no first token


def test_answer_cache_splits_a_run_into_batches_and_resumes(tmp_path):
    """A run with --answer-batch answers a few questions per call; the next call takes the rest from the cache file
    (refusals before the LLM cost no budget) and the final summary equals one uninterrupted run's."""
    from bench.eval.answer_eval import evaluate_answers
    from bench.eval.cache import AnswerCache, Budget
    from bench.eval.datasets import Question

    asked: list[str] = []

    class Stream:
        def __init__(self, q):
            self.q, self.refused, self.sources = q, q == "丙?", []

        def __iter__(self):
            asked.append(self.q)
            return iter([] if self.refused else {"甲?": ["4分钟"], "乙?": ["根据已知信息无法回答该问题。"],
                                                  "丁?": ["北京"]}[self.q])

    qs = [Question("a", "甲?", (("4分钟",),), ("P",)), Question("b", "乙?", (("上海",),), ("P",)),
          Question("c", "丙?", (("x",),), ("Q",)), Question("d", "丁?", (("北京市",),), ("Q",))]
    path = tmp_path / "answers.jsonl"
    first, rows = evaluate_answers(Stream, qs, {"c", "d"}, cache=AnswerCache(path), config_key="k",
                                   budget=Budget(1))
    assert first["answered_now"] == 1 and first["pending"] == 3 and [r["id"] for r in rows] == ["a"]
    second, rows = evaluate_answers(Stream, qs, {"c", "d"}, cache=AnswerCache(path), config_key="k",
                                    budget=Budget(2))
    assert second["cached"] == 1 and second["answered_now"] == 3 and second["pending"] == 0   # 丙 refused for free
    assert asked == ["甲?", "乙?", "丙?", "丁?"]                                # nobody was asked twice
    whole, _ = evaluate_answers(Stream, qs, {"c", "d"}, cache=AnswerCache(path), config_key="k")
    assert asked == ["甲?", "乙?", "丙?", "丁?"] and whole["cached"] == 4
    assert whole["false_refusal_rate"] == pytest.approx(0.5) and whole["refusal_rate"] == pytest.approx(0.5)
    other, _ = evaluate_answers(Stream, qs[:1], set(), cache=AnswerCache(path), config_key="other-config")
    assert other["answered_now"] == 1 and asked[-1] == "甲?"                 # another configuration is asked anew
    path.write_text(path.read_text(encoding="utf-8") + '{"key": "broken', encoding="utf-8")   # killed mid-write
    assert len(AnswerCache(path)) == 5


def test_cached_answers_are_re_decided_by_todays_refusal_rules(tmp_path):
    """The cache keys on settings, not code: after a change to the rules before the LLM, `gate` (the service's
    refusal_before_llm) re-decides each cached question — one the rules refuse now is scored as that refusal without
    asking, one an old rule refused is asked again — and the cached LLM answer is kept for later runs."""
    from bench.eval.answer_eval import evaluate_answers
    from bench.eval.cache import AnswerCache
    from bench.eval.datasets import Question

    asked: list[str] = []
    refuse_now: set[str] = {"丙?"}

    class Stream:
        def __init__(self, q, refused=None):
            self.q, self.sources = q, []
            self.refused = q in refuse_now if refused is None else refused

        def __iter__(self):
            if not self.refused:
                asked.append(self.q)
            return iter(["根据已知信息无法回答该问题"] if self.refused else [{"甲?": "4分钟", "丙?": "x"}[self.q]])

    def gate(q):
        return Stream(q, refused=True) if q in refuse_now else None

    qs = [Question("a", "甲?", (("4分钟",),), ("P",)), Question("c", "丙?", (("x",),), ("Q",))]
    cache = AnswerCache(tmp_path / "answers.jsonl")
    first, _ = evaluate_answers(Stream, qs, set(), cache=cache, config_key="k", gate=gate)
    assert asked == ["甲?"] and first["false_refusal_rate"] == 0.5
    refuse_now = {"甲?"}                                   # the rules changed: 甲 is refused now, 丙 no longer
    again, rows = evaluate_answers(Stream, qs, set(), cache=AnswerCache(tmp_path / "answers.jsonl"),
                                   config_key="k", gate=gate)
    assert asked == ["甲?", "丙?"] and [r["refused"] for r in rows] == [True, False]
    assert again["answered_now"] == 1 and again["cached"] == 1
    refuse_now = set()                                     # and back: 甲's cached answer was kept
    back, rows = evaluate_answers(Stream, qs, set(), cache=AnswerCache(tmp_path / "answers.jsonl"),
                                  config_key="k", gate=gate)
    assert asked == ["甲?", "丙?"] and [r["prediction"] for r in rows] == ["4分钟", "x"]


def test_a_second_pass_configuration_starts_from_the_base_configurations_cached_answers(tmp_path):
    from bench.eval.answer_eval import evaluate_answers
    from bench.eval.cache import AnswerCache, Budget
    from bench.eval.datasets import Question

    class Stream:
        def __init__(self, q):
            self.refused, self.sources, self.q = False, [], q

        def __iter__(self):
            return iter(["根据已知信息无法回答该问题。"] if self.q == "乙?" else ["4分钟"])

    qs = [Question("a", "甲?", (("4分钟",),), ("P",)), Question("b", "乙?", (("上海",),), ("P",))]
    cache = AnswerCache(tmp_path / "answers.jsonl")
    evaluate_answers(Stream, qs, set(), cache=cache, config_key="base")
    derived: list[str] = []

    def derive(q, base):
        derived.append(q.query)
        if base["text"].startswith("根据"):
            return {**base, "text": "上海", "second_pass": {"first": base["text"]}}, True
        return {**base, "second_pass": None}, False

    def never(_q):
        raise AssertionError("a base answer is cached: the service is not asked again")

    budget = Budget(1)
    summary, rows = evaluate_answers(never, qs, set(), cache=cache, config_key="base+2nd", base_key="base",
                                     derive=derive, budget=budget)
    assert derived == ["甲?", "乙?"] and budget.left == 0          # only the re-asked refusal cost an LLM call
    assert [r["prediction"] for r in rows] == ["4分钟", "上海"] and summary["false_refusal_rate"] == 0.0
    assert rows[1]["second_pass"] == {"first": "根据已知信息无法回答该问题。"}
