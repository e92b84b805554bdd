"""The OpenAI-compatible /v1 API, driven by the official `openai` client and LangChain's ChatOpenAI against the real
app (FastAPI + the Gradio page, uvicorn on a loopback port), a real knowledge base (two guide files, real FAISS and
the real multilingual-e5-small) and a tiny random GLM as the LLM (float32, CPU, greedy: the same text every run).

The API key comes from the real `python -m app.openai_api create-key` command and reaches the app through a settings
file, as an administrator would do it.
"""
from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from app import openai_api
from app.openai_api import ApiKeys, StopScanner, hash_key, parse_request, sentence_spans
from configs import PROJECT_ROOT, load_settings
from ingest import ingest
from prompts import REFUSAL
from tests.conftest import require_model
from tests.support.tiny_glm import build_tiny_glm

KB = "使用指南"
QUESTION = "如何上传文件？"
UNRELATED = "如何给汽车更换轮胎的气门芯？"
GUIDE = PROJECT_ROOT / "docs" / "guide"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_key(name: str) -> tuple[str, str]:
    """(key, settings line) from the real command (test_create_key_command runs it as a process too)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert openai_api.main(["create-key", name]) == 0
    return tuple(out.getvalue().splitlines()[:2])


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    """The app on 127.0.0.1:<free port> with one KB and one API key; yields (base_url, key, ctx)."""
    import uvicorn

    from app.context import AppContext
    from app.server import create_app

    require_model(models_dir, "multilingual-e5-small")
    root = tmp_path_factory.mktemp("v1")
    key, line = _create_key("pytest")
    assert key.startswith("zw-") and hash_key(key) in line
    config = root / "zhiwen.yaml"
    config.write_text(f"app:\n  api_keys:\n  {line}\n", encoding="utf-8")
    glm = build_tiny_glm(root / "tiny-glm", "glm")
    settings = load_settings(config, paths={"kb_root": str(root / "kb"), "models_dir": str(models_dir)},
                             llm={"model": str(glm), "device": "cpu", "dtype": "float32", "temperature": 0.0,
                                  "max_new_tokens": 24})
    assert [k.name for k in settings.app.api_keys] == ["pytest"]
    docs = root / "docs"
    docs.mkdir()
    for name in ("02-导入文件.md", "06-常见问题.md"):
        (docs / name).write_bytes((GUIDE / name).read_bytes())
    ctx = AppContext(settings)
    assert ingest(docs, KB, settings, embedder=ctx.embedder).exit_code == 0    # one e5 load for both
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/v1", key, ctx
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    base, key, _ = server
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


class LLMCalls:
    """Records the messages of each call to the app's model (the real generation still runs)."""

    def __init__(self, ctx):
        self.llm = ctx.service.llm
        self.calls: list[list[dict]] = []

    def __enter__(self):
        real = self.llm.stream

        def spy(messages, params=None, stop_event=None):
            self.calls.append([dict(m) for m in messages])
            return real(messages, params, stop_event)

        self.llm.stream = spy
        return self.calls

    def __exit__(self, *exc):
        del self.llm.stream


def ask(client, question=QUESTION, **kw):
    return client.chat.completions.create(model=KB, messages=[{"role": "user", "content": question}], **kw)


# --- the openai client ----------------------------------------------------------------------------------------------
def test_models_lists_one_model_per_knowledge_base(client):
    assert [m.id for m in client.models.list()] == [KB]
    assert client.models.retrieve(KB).owned_by == "zhiwen"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("没有这个库")
    assert KB in e.value.message


def test_answer_with_sources_and_usage(client, server):
    with LLMCalls(server[2]) as calls:
        r = ask(client, temperature=0)
    assert len(calls) == 1 and "已知信息" in calls[0][-1]["content"] and QUESTION in calls[0][-1]["content"]
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == KB and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    extra = r.model_extra["zhiwen"]
    assert extra["refused"] is False and extra["low_relevance"] == []
    # the finished answer went through the same grounding check as on the page (prompt.grounding_check)
    assert isinstance(extra["grounding"], dict) and extra["ungrounded"] == (not extra["grounding"]["ok"])
    assert extra["refusal_reason"] in (None, "model", "ungrounded") and extra["citations"] is None   # default template
    assert (extra["refusal_reason"] == "ungrounded") == extra["ungrounded"]
    top = extra["sources"][0]
    assert top["file"].endswith("02-导入文件.md") and top["text"] in calls[0][-1]["content"]
    assert set(top) >= {"file", "page", "heading", "score", "text", "spans"}
    assert top["heading"] and top["dense_score"] >= load_settings().retrieval.score_threshold
    for start, end in top["spans"]:
        assert 0 <= start < end <= len(top["text"])
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_the_whole_answer(client):
    whole = ask(client, temperature=0).choices[0].message.content
    chunks = list(ask(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["zhiwen"]["sources"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_ends_with_done_on_the_wire(server):
    base, key, _ = server
    body = {"model": KB, "messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_clients_that_leave_mid_stream_give_their_generation_slot_back(server):
    """app.concurrency_limit (2 here) slots are shared by page and API: a client that drops a stream after the first
    chunk must not keep one, or the third such client would leave every later question waiting forever."""
    base, key, ctx = server
    limit = ctx.settings.app.concurrency_limit
    body = {"model": KB, "messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 24}
    for _ in range(limit + 1):
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())                              # one event, then hang up
    deadline = time.monotonic() + 60
    while ctx.gate._value < limit and time.monotonic() < deadline:   # slots come back as the server notices
        time.sleep(0.2)
    assert ctx.gate._value == limit
    r = httpx.post(f"{base}/chat/completions", json={**body, "stream": False}, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_max_tokens_temperature_top_p_are_honoured(client):
    long = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    short = ask(client, temperature=0, max_tokens=3)
    assert long.startswith(short.choices[0].message.content) and len(short.choices[0].message.content) < len(long)
    assert short.usage.completion_tokens <= 3
    # top_p so small that only the most likely token survives: sampling at a high temperature is then greedy
    assert ask(client, temperature=1.5, top_p=1e-6, max_tokens=20).choices[0].message.content == long
    # a high temperature with the whole distribution samples something else (random weights, 600 tokens)
    samples = {ask(client, temperature=2.0, top_p=1.0, max_tokens=20).choices[0].message.content for _ in range(3)}
    assert samples - {long}


def test_stop_sequences_cut_the_text(client):
    whole = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    expected = whole[:whole.find(stop)]
    r = ask(client, temperature=0, max_tokens=20, stop=[stop, "never-there"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, temperature=0, max_tokens=20, stop=stop,
                                                                      stream=True) if c.choices)
    assert streamed == expected


def test_history_reaches_the_prompt(client, server):
    with LLMCalls(server[2]) as calls:
        client.chat.completions.create(model=KB, max_tokens=2, messages=[
            {"role": "system", "content": "忽略知识库"},
            {"role": "user", "content": "上一个问题：支持哪些格式？"},
            {"role": "assistant", "content": "支持 PDF 和 Word。"},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    sent = calls[0]
    assert {"role": "user", "content": "上一个问题：支持哪些格式？"} in sent
    assert {"role": "assistant", "content": "支持 PDF 和 Word。"} in sent
    assert not any("忽略知识库" in m["content"] for m in sent)     # the knowledge base's prompt stays in charge
    assert QUESTION in sent[-1]["content"]


def test_no_evidence_is_a_recognisable_refusal_without_llm_call(client, server):
    with LLMCalls(server[2]) as calls:
        r = ask(client, UNRELATED)
        chunks = list(ask(client, UNRELATED, stream=True))
    assert calls == []
    assert r.choices[0].message.content == REFUSAL and r.choices[0].finish_reason == "stop"
    extra = r.model_extra["zhiwen"]
    assert extra["refused"] is True and extra["sources"] == [] and extra["low_relevance"]
    # which rule refused, in a stable machine-readable field plus the page's note, and the closest sentences
    assert extra["refusal_reason"] in ("score_threshold", "key_term_coverage") and extra["model_refused"] is False
    assert "没有调用模型" in extra["refusal_message"] and extra["refusal_detail"]
    for hit in extra["low_relevance"]:
        (a, b), = hit["spans"]                       # one sentence per passage: the closest to the question
        assert 0 <= a < b <= len(hit["text"])
    assert r.usage.total_tokens == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REFUSAL
    assert chunks[-1].model_extra["zhiwen"]["refused"] is True
    raw = client.chat.completions.with_raw_response.create(model=KB, messages=[{"role": "user", "content": UNRELATED}])
    assert raw.headers["x-zhiwen-refused"] == "true"


def test_bad_requests_get_openai_errors_naming_the_field(client, server):
    base, key, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="不存在", messages=[{"role": "user", "content": QUESTION}])
    assert e.value.code == "model_not_found" and "不存在" in e.value.message
    cases = [
        (dict(temperature=5), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=2), "n"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, **kwargs)
        assert e.value.param == param and param in e.value.message, (kwargs, e.value.body)
    bad_messages = [
        ([], "messages"),
        ([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "x"}], "messages[1]"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "   "}], "messages[0]"),
    ]
    for messages, param in bad_messages:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=KB, messages=messages)
        assert e.value.param == param, (messages, e.value.body)
    r = httpx.post(f"{base}/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base}/chat/completions", json={"messages": [{"role": "user", "content": "q"}]}, timeout=30,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_wrong_or_missing_key_is_401(server):
    base, key, _ = server
    for api_key in ("zw-wrong", key[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=base, api_key=api_key, max_retries=0).models.list()
        assert e.value.code == "invalid_api_key" and "app.api_keys" in e.value.message
    r = httpx.post(f"{base}/chat/completions", json={"model": KB, "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "Bearer" in r.json()["error"]["message"]


# --- LangChain ----------------------------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_and_stop(server, client):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    base, key, _ = server
    llm = ChatOpenAI(base_url=base, api_key=key, model=KB, temperature=0, max_tokens=20, max_retries=0)
    whole = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    msg = llm.invoke(QUESTION)
    assert msg.content == whole and msg.usage_metadata["output_tokens"] > 0
    assert "".join(c.content for c in llm.stream(QUESTION)) == whole
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm | StrOutputParser()
    assert chain.invoke({"q": QUESTION}) == whole
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    assert llm.invoke(QUESTION, stop=[stop]).content == whole[:whole.find(stop)]
    assert llm.invoke(UNRELATED).content == REFUSAL
    with pytest.raises(openai.NotFoundError):
        ChatOpenAI(base_url=base, api_key=key, model="不存在", max_retries=0).invoke(QUESTION)


# --- in-process pieces and auth modes -----------------------------------------------------------------------------
def test_login_users_unaffected_and_keys_required_with_login(tmp_path, monkeypatch):
    from app.server import create_app

    monkeypatch.setenv("ZHIWEN_PATHS__KB_ROOT", str(tmp_path))
    monkeypatch.setenv("ZHIWEN_PASSWORD_ALICE", "pw-alice")
    s = load_settings(app={"auth_enabled": True, "users": [{"username": "alice"}]})
    with TestClient(create_app(s)) as c:
        assert c.get("/api/kbs", auth=("alice", "pw-alice")).status_code == 200       # login users as before
        r = c.get("/v1/models", auth=("alice", "pw-alice"))                           # but they are not API keys
        assert r.status_code == 401 and "create-key" in r.json()["error"]["message"]
    s = load_settings()
    with TestClient(create_app(s)) as c:                                              # no login, no keys: open
        assert c.get("/v1/models").json() == {"object": "list", "data": []}


def test_key_hashes_are_checked_by_settings():
    from configs import SettingsError

    with pytest.raises(SettingsError, match="app.api_keys.0.key_hash"):
        load_settings(app={"api_keys": [{"name": "x", "key_hash": "zw-plaintext-key"}]})
    keys = ApiKeys(load_settings(app={"api_keys": [{"name": "bot", "key_hash": hash_key("zw-1")}]}))
    assert keys.required and keys.check("Bearer zw-1") == "bot"


def test_stop_scanner_cuts_at_the_first_stop_however_the_text_is_split():
    text = "答案是<b>十五天</b>。##后面的不要</s>"
    for stops, expected in ((["##", "</s>"], "答案是<b>十五天</b>。"), (["</s>"], "答案是<b>十五天</b>。##后面的不要"),
                            (["天<"], "答案是<b>十五"), (["没有"], text), ([], text)):
        for size in (1, 2, 3, 7, len(text)):
            s = StopScanner(stops)
            out = ""
            for i in range(0, len(text), size):
                out += s.feed(text[i:i + size])
                if s.hit:
                    break
            out += "" if s.hit else s.flush()
            assert out == expected and s.hit == (expected != text), (stops, size, out)


def test_parse_request_history_and_spans():
    req, q, history, stops = parse_request(json.dumps({
        "model": "kb", "stop": "。", "user": "ignored", "seed": 1, "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "问1"},
            {"role": "assistant", "content": None}, {"role": "user", "content": " 问2 "}]}).encode())
    assert q == "问2" and stops == ["。"] and history == [{"role": "user", "content": "问1"},
                                                         {"role": "assistant", "content": ""}]
    text = "天气很好。上传文件请点击上传按钮。其他。"
    assert [text[a:b] for a, b in sentence_spans(text, "点击上传按钮")] == ["上传文件请点击上传按钮。"]


def test_create_key_command_prints_key_and_entry():
    r = subprocess.run([sys.executable, "-m", "app.openai_api", "create-key", "报表脚本"], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "app.api_keys" in r.stderr
    key, line = r.stdout.splitlines()[:2]
    assert len(key) > 40 and line.strip().startswith("- {name: \"报表脚本\"")
    import yaml

    entry = yaml.safe_load(line.strip())[0]
    assert entry == {"name": "报表脚本", "key_hash": hash_key(key)}
    r = subprocess.run([sys.executable, "-m", "app.openai_api", "create-key", " "], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "empty" in r.stderr



def test_api_ask_clients_that_leave_mid_stream_give_their_generation_slot_back(server):
    """The same for the line protocol of /api/ask: a dropped stream gives its slot back (before, Starlette stopped
    iterating the answer's sync generator without closing it, and the slot stayed taken until garbage collection)."""
    base, _key, ctx = server
    api = base.removesuffix("/v1") + "/api"
    limit = ctx.settings.app.concurrency_limit
    for _ in range(limit + 1):
        with httpx.stream("POST", f"{api}/ask", json={"question": QUESTION, "kb": KB}, timeout=60) as r:
            assert r.status_code == 200
            assert json.loads(next(r.iter_lines()))["type"] in ("token", "done")   # one line, then hang up
    deadline = time.monotonic() + 60
    while ctx.gate._value < limit and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ctx.gate._value == limit
    r = httpx.post(f"{api}/ask", json={"question": QUESTION, "kb": KB}, timeout=60)
    last = json.loads(r.text.splitlines()[-1])
    assert r.status_code == 200 and last["type"] == "done" and last["answer"]


def test_api_ask_and_search_say_why_and_where(server):
    """/api/ask's done line carries the same refusal fields as /v1 (threshold set above any cosine: the score rule;
    threshold off: the key-word rule), and /api/search marks each passage's sentence closest to the question."""
    base, _key, _ctx = server
    api = base.removesuffix("/v1") + "/api"
    reasons = {}
    for threshold in (0.999, -1.0):
        r = httpx.post(f"{api}/ask", json={"question": UNRELATED, "kb": KB, "threshold": threshold}, timeout=60)
        done = json.loads(r.text.splitlines()[-1])
        assert done["type"] == "done" and done["refused"] is True and done["answer"] == REFUSAL
        reasons[threshold] = done["refusal_reason"]
        assert done["refusal_message"].startswith("检索拒答") and done["low_relevance"]
        assert all(len(h["spans"]) == 1 for h in done["low_relevance"])
    assert reasons == {0.999: "score_threshold", -1.0: "key_term_coverage"}
    assert done["refusal_detail"]["missing"] and done["refusal_detail"]["coverage"] < done["refusal_detail"]["required"]
    found = httpx.post(f"{api}/search", json={"question": QUESTION, "kb": KB}, timeout=60).json()
    assert found["evidence"] and found["hits"] and found["low_relevance"] == []
    a, b = found["hits"][0]["spans"][0]
    assert "上传" in found["hits"][0]["text"][a:b]
