"""The 「已知信息」 template, template checks, and the token-budgeted prompt builder.

Token counting uses len() (one token per character) where the arithmetic must be exact, and the real e5 tokenizer
(through the product's Embedder) in one test that the budget holds with a real subword tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from configs import load_settings
from prompts import (
    MESSAGE_OVERHEAD_TOKENS,
    REFUSAL,
    PromptBudgetError,
    PromptTemplateError,
    as_chat_prompt_template,
    as_prompt_template,
    build_prompt,
    build_prompt_from_settings,
    check_template,
    hit_label,
    load_template,
)
from retrieval.sentences import split_sentences
from retrieval.types import Hit
from tests.conftest import require_model

EXPECTED_TEMPLATE = (
    "已知信息：\n{context}\n\n根据上述已知信息，简洁和专业的来回答用户的问题。"
    "如果无法从中得到答案，请说 “根据已知信息无法回答该问题” "
    "或 “没有提供足够的相关信息”，不允许在答案中添加编造成分，答案请使用中文。 问题是：{question}"
)


def hit(text: str, n: int, source: str = "员工手册.pdf", page: int | None = 3, heading=("第一章 总则",)) -> Hit:
    return Hit(text=text, score=1.0 / n, source=source, chunk_ids=(n,), page=page, heading_path=heading)


def budget(**kw):
    base = dict(count_tokens=len, context_tokens=2048, history_turns=3, max_context_tokens=4096, max_new_tokens=512)
    base.update(kw)
    return base


# --- the template ---------------------------------------------------------------------------------------------------
def test_default_template_is_verbatim():
    path = Path(__file__).resolve().parent.parent / "prompts" / "templates" / "knowledge_qa.txt"
    assert path.read_text(encoding="utf-8") == EXPECTED_TEMPLATE
    assert load_template("knowledge_qa") == EXPECTED_TEMPLATE
    assert load_template(load_settings().prompt.template) == EXPECTED_TEMPLATE
    assert REFUSAL == "根据已知信息无法回答该问题" and f"“{REFUSAL}”" in EXPECTED_TEMPLATE


def test_template_from_a_path_and_loud_failures(tmp_path):
    good = tmp_path / "short.txt"
    good.write_text("资料：{context}\n问：{question}\n", encoding="utf-8")
    assert load_template(str(good)) == "资料：{context}\n问：{question}"  # the editor's final newline is dropped

    missing_q = tmp_path / "no_question.txt"
    missing_q.write_text("资料：{context}", encoding="utf-8")
    with pytest.raises(PromptTemplateError) as e:
        load_template(str(missing_q))
    assert "missing variables: question" in str(e.value) and "provided variables: context, question" in str(e.value)
    assert str(missing_q) in str(e.value)

    with pytest.raises(PromptTemplateError, match="unknown variables: history, user"):
        check_template("{context}{question}{history}{user}")
    with pytest.raises(PromptTemplateError, match="not a valid template"):
        check_template("{context} {question} {")
    with pytest.raises(PromptTemplateError, match="no file .*nope.txt.*knowledge_qa"):
        load_template("nope")


def test_langchain_views_render_like_the_builder():
    t = load_template("knowledge_qa")
    assert sorted(as_prompt_template(t).input_variables) == ["context", "question"]
    chat = as_chat_prompt_template(t)
    history = [("human", "早"), ("ai", "早上好")]
    msgs = chat.invoke({"context": "甲", "question": "乙？", "history": history}).to_messages()
    assert [m.type for m in msgs] == ["human", "ai", "human"]
    assert msgs[-1].content == t.format(context="甲", question="乙？")
    built = build_prompt("乙？", [], [("早", "早上好")], template=t, **budget())
    assert [m["content"] for m in built.messages[:2]] == ["早", "早上好"]


# --- the builder ----------------------------------------------------------------------------------------------------
def test_hits_are_labelled_with_source_page_and_heading():
    t = load_template("knowledge_qa")
    hits = [hit("试用期为三个月。", 1), hit("年假十五天。", 2, source="notes/假期.md", page=None, heading=())]
    built = build_prompt("试用期多久？", hits, None, template=t, **budget())
    user = built.messages[-1]
    assert user["role"] == "user" and len(built.messages) == 1
    assert "[1] 来源：员工手册.pdf 第3页 · 第一章 总则\n试用期为三个月。" in user["content"]
    assert "[2] 来源：notes/假期.md\n年假十五天。" in user["content"]
    assert user["content"].endswith("问题是：试用期多久？")
    assert built.used_hits == hits and built.dropped_hits == []
    assert built.prompt_tokens == len(user["content"]) + MESSAGE_OVERHEAD_TOKENS
    assert hit_label(2, hits[1]) == "[2] 来源：notes/假期.md"


def test_lowest_ranked_hits_are_dropped_first_to_fit_context_tokens():
    t = load_template("knowledge_qa")
    hits = [hit("第一条：" + "甲" * 80 + "。", 1), hit("第二条：" + "乙" * 80 + "。", 2),
            hit("第三条：" + "丙" * 80 + "。", 3)]
    one = len(f"{hit_label(1, hits[0])}\n{hits[0].text}")
    built = build_prompt("问？", hits, None, template=t, **budget(context_tokens=2 * one + 10))
    assert built.used_hits == hits[:2] and built.dropped_hits == hits[2:]
    assert len(built.context) <= 2 * one + 10
    assert "丙" not in built.messages[-1]["content"]


def test_model_window_minus_answer_room_is_respected():
    t = load_template("knowledge_qa")
    hits = [hit("内容" * 100 + "。", i) for i in range(1, 6)]
    window = 1200
    built = build_prompt("问？", hits, None, template=t,
                         **budget(context_tokens=5000, max_context_tokens=window + 300, max_new_tokens=300))
    assert built.prompt_tokens <= window
    assert built.used_hits and built.dropped_hits  # some fit, the rest were dropped by rank
    assert built.used_hits + built.dropped_hits == hits


def test_a_too_big_top_hit_is_cut_at_a_sentence_end():
    t = load_template("knowledge_qa")
    sentences = [f"第{i}句话讲的是规章制度的第{i}个要点。" for i in range(1, 40)]
    big = hit("".join(sentences), 1)
    built = build_prompt("问？", [big, hit("小段落。", 2)], None, template=t, **budget(context_tokens=200))
    used = built.used_hits[0]
    assert used.metadata["trimmed"] is True and len(built.used_hits) == 1
    assert used.text.endswith("。") and big.text.startswith(used.text)
    kept = split_sentences(used.text)
    assert kept == sentences[: len(kept)] and 0 < len(kept) < len(sentences)  # whole sentences only
    assert len(built.context) <= 200
    assert built.dropped_hits == [hit("小段落。", 2)]


def test_a_hit_with_no_sentence_small_enough_is_dropped_not_cut_mid_sentence():
    t = load_template("knowledge_qa")
    run_on = hit("没有标点的超长段落" * 40, 1)
    built = build_prompt("问？", [run_on], None, template=t, **budget(context_tokens=100))
    assert built.used_hits == [] and built.dropped_hits == [run_on]
    assert "已知信息：\n\n" in built.messages[-1]["content"]


def test_history_keeps_the_newest_turns_that_fit():
    t = load_template("knowledge_qa")
    history = [(f"问题{i}" + "？" * 30, f"回答{i}" + "。" * 30) for i in range(1, 6)]
    built = build_prompt("新问题？", [hit("资料。", 1)], history, template=t, **budget(history_turns=3))
    assert built.history_turns_used == 3
    assert [m["content"][:3] for m in built.messages[:-1]] == ["问题3", "回答3", "问题4", "回答4", "问题5", "回答5"]
    assert [m["role"] for m in built.messages] == ["user", "assistant"] * 3 + ["user"]

    # a tight window: the context stays, the oldest of the three turns go first
    user_len = len(t.format(context=built.context, question="新问题？")) + MESSAGE_OVERHEAD_TOKENS
    turn_cost = 2 * (33 + MESSAGE_OVERHEAD_TOKENS)
    tight = build_prompt("新问题？", [hit("资料。", 1)], history, template=t,
                         **budget(max_context_tokens=user_len + turn_cost + 10 + 100, max_new_tokens=100))
    assert tight.history_turns_used == 1 and tight.messages[0]["content"].startswith("问题5")
    assert tight.used_hits and tight.prompt_tokens <= user_len + turn_cost + 10

    as_messages = [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]
    assert build_prompt("新问题？", [], as_messages, template=t, **budget()).history_turns_used == 3
    assert build_prompt("新问题？", [], history, template=t, **budget(history_turns=0)).history_turns_used == 0


def test_budget_errors_name_the_values():
    t = load_template("knowledge_qa")
    with pytest.raises(PromptBudgetError, match=r"max_new_tokens \(512\) leaves no room .*max_context_tokens \(512\)"):
        build_prompt("问？", [], None, template=t, **budget(max_context_tokens=512))
    with pytest.raises(PromptBudgetError, match="the question is too long"):
        build_prompt("长" * 5000, [], None, template=t, **budget())
    with pytest.raises(ValueError, match="context_tokens must be > 0, got 0"):
        build_prompt("问？", [], None, template=t, **budget(context_tokens=0))


def test_budget_holds_with_the_real_e5_tokenizer(models_dir, tmp_settings):
    """A real subword tokenizer is not additive over pieces; the finished prompt must still fit."""
    from retrieval.embeddings import Embedder

    require_model(models_dir, tmp_settings.embedding.model)
    count = Embedder.from_settings(tmp_settings).count_tokens
    hits = [hit(f"第{i}条：员工出差住宿标准为每晚不超过{i}百元，须凭发票报销。" * 6, i) for i in range(1, 9)]
    settings = load_settings(prompt={"context_tokens": 300, "history_turns": 2}, llm={"max_context_tokens": 700,
                                                                                        "max_new_tokens": 200})
    built = build_prompt_from_settings("出差住宿标准是多少？", hits, [("你好", "你好，请问有什么可以帮您？")] * 4,
                                       settings, count)
    total = sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in built.messages)
    assert total <= 700 - 200
    assert count(built.context) <= 300
    assert built.used_hits and built.dropped_hits
    assert built.used_hits == hits[: len(built.used_hits)]
