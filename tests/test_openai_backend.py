"""llm.backend: openai against a REAL OpenAI-compatible server: `python -m llama_cpp.server` (llama-cpp-python's
[server] extra, through tests/support/llama_server.py, which only switches off AMX weight buffers that crash in this
VM) started by the test on a loopback port, serving the 0.5B demo GGUF from the model pack
(models/.sources/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf). Streaming, the stop button, a server killed in the middle
of an answer, a wrong model name, a wrong key and a server that is down each end in one clear sentence.

One fake remains, for what llama.cpp's server cannot be made to do: send an error event inside a running stream
(vLLM does this when generation fails part-way). `_ErrorEventServer` below sends exactly that and nothing else.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from configs import PROJECT_ROOT, load_settings
from llm import BackendUnavailableError, GenerationParams, LLMError, load_llm

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed (scripts/setup.sh)")

ALIAS = "qwen2.5-coder-0.5b"
KEY = "sk-zhiwen-test"
CHAT = [{"role": "system", "content": "你是一个简洁的助手。"}, {"role": "user", "content": "中国的首都是哪里？"}]
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def _gguf(models_dir: Path) -> Path:
    for name in ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-0.5b-instruct-q4_k_m.gguf"):
        if (models_dir / ".sources" / name).is_file():
            return models_dir / ".sources" / name
    pytest.fail(f"the 0.5B demo GGUF is missing from {models_dir / '.sources'}: run `python -m modelpack pull demo`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` in its own process group on 127.0.0.1; .url is its /v1 address."""

    def __init__(self, gguf: Path, log: Path, api_key: str = KEY):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.api_key = api_key
        self.log = log
        cmd = [sys.executable, "-m", "tests.support.llama_server", "--model", str(gguf), "--model_alias", ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2",
               "--api_key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=PROJECT_ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llama_cpp.server exited: {log.read_text()[-2000:]}"
            try:
                req = urllib.request.Request(self.url + "/models", headers={"Authorization": f"Bearer {api_key}"})
                with urllib.request.urlopen(req, timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"llama_cpp.server did not start within 180 s: {log.read_text()[-2000:]}")

    def settings(self, **llm):
        return load_settings(llm={"backend": "openai", "openai_base_url": self.url, "openai_api_key": self.api_key,
                                  **llm})

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def gguf(models_dir):
    return _gguf(models_dir)


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    srv = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(server):
    return load_llm(server.settings(openai_model=ALIAS))


def test_streams_a_real_answer(server, model):
    assert model.info.name == ALIAS and model.info.backend == "openai" and model.info.weights_path == server.url
    pieces = list(model.stream(CHAT, GREEDY))
    text = "".join(pieces)
    assert len(pieces) > 3 and "北京" in text                 # the 0.5B model knows this one
    assert model.generate(CHAT, GREEDY) == text               # greedy: the same answer again
    short = "".join(model.stream(CHAT, GREEDY.merged(max_new_tokens=3)))
    assert text.startswith(short) and len(short) < len(text)  # max_tokens reached the server


def test_first_served_model_when_none_is_set(server):
    assert load_llm(server.settings()).model == ALIAS


def test_stop_event_ends_the_answer(model):
    event = threading.Event()
    got = []
    for piece in model.stream(CHAT, GREEDY.merged(max_new_tokens=64), stop_event=event):
        got.append(piece)
        if len(got) == 2:
            event.set()
    assert len(got) == 2
    assert "北京" in model.generate(CHAT, GREEDY)             # the server is free for the next question


def test_langchain_stop_sequences_over_the_server(model):
    from llm.langchain_chat import ZhiwenChatModel

    chat = ZhiwenChatModel(llm=model, max_new_tokens=12, temperature=0.0)
    full = chat.invoke(CHAT).content
    stop = full[2:4]
    assert chat.invoke(CHAT, stop=[stop]).content == full[: full.find(stop)]


def test_wrong_model_name_is_one_sentence(server):
    with pytest.raises(BackendUnavailableError) as e:
        load_llm(server.settings(openai_model="glm-4-9b-chat"))
    msg = str(e.value)
    assert "does not serve llm.openai_model='glm-4-9b-chat'" in msg and repr(ALIAS) in msg and "\n" not in msg


def test_wrong_key_is_one_sentence(server):
    with pytest.raises(BackendUnavailableError, match=r"refused the API key \(HTTP 401\); check llm.openai_api_key"):
        load_llm(server.settings(openai_api_key="wrong"))


def test_server_down_is_one_sentence():
    port = _free_port()                                        # nothing listens there
    settings = load_settings(llm={"backend": "openai", "openai_base_url": f"http://127.0.0.1:{port}/v1"})
    with pytest.raises(BackendUnavailableError, match="cannot reach .*check llm.openai_base_url and that the server"):
        load_llm(settings)
    with pytest.raises(LLMError, match="openai_base_url is empty"):
        load_llm(load_settings(llm={"backend": "openai"}))


def test_server_killed_mid_answer_is_one_sentence(gguf, tmp_path):
    srv = LlamaServer(gguf, tmp_path / "dying.log")
    try:
        m = load_llm(srv.settings(openai_model=ALIAS))
        got = []
        with pytest.raises(BackendUnavailableError) as e:
            for piece in m.stream(CHAT, GREEDY.merged(max_new_tokens=200)):
                got.append(piece)
                if len(got) == 2:
                    srv.kill()
        assert got and "stopped answering in the middle of the answer" in str(e.value)
        # the next question, with the server gone, says so too
        with pytest.raises(BackendUnavailableError, match="cannot reach"):
            list(m.stream(CHAT, GREEDY))
    finally:
        srv.stop()


def test_service_keeps_partial_text_and_the_sentence(gguf, tmp_path):
    """Through the QA service: a dying server ends the stream with .error set and the text so far kept."""
    from app.service import AnswerStream

    srv = LlamaServer(gguf, tmp_path / "dying2.log")
    try:
        m = load_llm(srv.settings(openai_model=ALIAS))
        pieces = m.stream(CHAT, GREEDY.merged(max_new_tokens=200))

        def killing():
            for i, p in enumerate(pieces):
                if i == 1:
                    srv.kill()
                yield p

        stream = AnswerStream(killing(), sources=[], refused=False, low_relevance=[])
        text = "".join(stream)
        assert text and stream.text == text and "stopped answering" in stream.error
    finally:
        srv.stop()


# --- the one fake: an error event inside the stream ----------------------------------------------------------------
class _ErrorEventServer(BaseHTTPRequestHandler):
    """Lists one model, then streams two pieces and an OpenAI-style error event (as vLLM does when generation fails
    part-way). No real server here can be made to do this."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode(),
                   "application/json")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        events = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in ("北京", "是")]
        events.append({"error": {"message": "CUDA out of memory", "type": "server_error"}})
        self._send(200, b"".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events),
                   "text/event-stream")


def test_error_event_in_the_stream_is_one_sentence():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ErrorEventServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        m = load_llm(load_settings(llm={"backend": "openai",
                                        "openai_base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1"}))
        got = []
        with pytest.raises(LLMError, match="failed in the middle of the answer: CUDA out of memory"):
            for piece in m.stream(CHAT, GREEDY):
                got.append(piece)
        assert got == ["北京", "是"]
    finally:
        srv.shutdown()
        srv.server_close()
