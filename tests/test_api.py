"""The HTTP API against the real app (`python app.py` on loopback, real requests): bad input is a 4xx JSON error
before any streaming, uploads are checked before and while they stream in, login attempts are limited, and upload
jobs survive a kill -9 of the app (issue 13 items 3, 9, 10, 12). Each case failed on the code before the fix."""
from __future__ import annotations

import json
import select
import socket
import time

import pytest

from tests.conftest import require_model
from tests.support.app_server import AppProcess, multipart

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def app(tmp_path_factory, models_dir):
    require_model(models_dir, "multilingual-e5-small")
    root = tmp_path_factory.mktemp("api")
    proc = AppProcess(root / "kb", env={"ZHIWEN_APP__MAX_UPLOAD_MB": "1"})
    try:
        yield proc
    finally:
        proc.stop()


def test_create_knowledge_base_route(app):
    assert app.json("POST", "/api/kbs", {"name": "空库"}) == (201, {"name": "空库"})
    status, body = app.json("POST", "/api/kbs", {"name": "空库"})
    assert status == 409 and "已存在" in body["error"]
    status, body = app.json("POST", "/api/kbs", {"name": "../up"})
    assert status == 400 and "无效" in body["error"]
    assert (app.kb_root / "空库" / "CURRENT").is_file() and not (app.kb_root.parent / "up").exists()


@pytest.mark.parametrize("route", ["/api/ask", "/api/search"])
def test_bad_questions_are_4xx_json_before_any_streaming(app, route):
    app.json("POST", "/api/kbs", {"name": "空库"})
    cases = [
        ({"question": "你好", "kb": "不存在"}, 404, "不存在"),
        ({"question": "你好", "kb": "../up"}, 400, "无效"),
        ({"question": "你好", "kb": "/etc"}, 400, "无效"),
        ({"question": "", "kb": "空库"}, 400, "问题为空"),
        ({"question": " \n\t ", "kb": "空库"}, 400, "问题为空"),
        ({"question": "你好", "kb": "空库"}, 400, "还没有可检索的内容"),
        ({"question": "问" * 2001, "kb": "空库"}, 413, "app.max_question_chars"),
        ({"question": "你好", "kb": "空库", "top_k": 0}, 400, "top_k"),
        ({"question": "你好", "kb": "空库", "top_k": "很多"}, 400, "top_k"),
    ]
    if route == "/api/ask":
        cases.append(({"question": "你好", "kb": "空库", "max_new_tokens": 1e9}, 400, "max_new_tokens"))
    for body, status, words in cases:
        got, headers, raw = app.request("POST", route, body)
        assert (got, headers["content-type"]) == (status, "application/json"), (body, raw[:200])
        assert words in json.loads(raw)["error"], (body, raw[:200])
    # bodies json.dumps would not write: a NaN threshold, a lone surrogate (in the question, in a wrong-typed field)
    for raw_body, words in ((b'{"question": "\\u4f60\\u597d", "kb": "\\u7a7a\\u5e93", "threshold": NaN}', "threshold"),
                            (b'{"question": "\\ud800", "kb": "\\u7a7a\\u5e93"}', "无效的字符"),
                            (b'{"question": "x", "kb": "k", "top_k": "\\ud800"}', "top_k"),
                            (b'{"question": ', "请求格式不对")):
        got, headers, raw = app.request("POST", route, raw_body, headers={"content-type": "application/json"})
        assert (got, headers["content-type"]) == (400, "application/json"), (raw_body, raw[:200])
        assert words in json.loads(raw)["error"], (raw_body, raw[:200])


def test_upload_to_a_bad_knowledge_base_is_refused_at_once(app):
    body, ctype = multipart([("a.txt", "内容".encode())])
    status, _h, raw = app.request("POST", "/api/kbs/a.b/files", body, headers={"content-type": ctype})
    assert status == 400 and "无效" in json.loads(raw)["error"]
    status, _h, raw = app.request("POST", "/api/kbs/没有这个库/files", body, headers={"content-type": ctype})
    assert status == 404 and "不存在" in json.loads(raw)["error"]


def test_oversized_upload_is_refused_while_it_streams(app):
    """app.max_upload_mb is 1 here. The client offers 40 MB in 64 KB pieces and looks for an answer after each
    one: the 413 must come while most of the body is still unsent (the old code read every byte first, then
    answered 200 with a job)."""
    app.json("POST", "/api/kbs", {"name": "大文件"})
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    total = 40 * 2**20
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=60)
    path = "/api/kbs/%E5%A4%A7%E6%96%87%E4%BB%B6/files"
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                  f"boundary={boundary}\r\nContent-Length: {len(head) + total}\r\n\r\n").encode() + head)
    sent, piece = 0, b"x" * 65536
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = b""
    sock.settimeout(60)
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        response += chunk
    sock.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert "app.max_upload_mb" in response.split(b"\r\n\r\n", 1)[1].decode("utf-8")
    assert sent < total / 2, f"{sent} of {total} bytes were sent before the answer"
    assert list((app.kb_root / "大文件" / "sources").iterdir()) == []


def test_bidi_controls_are_stripped_from_stored_names(app):
    app.json("POST", "/api/kbs", {"name": "名字"})
    body, ctype = multipart([("报告\u202etxt.exe\u200b.md", "# 标题\n\n年假为十五天。".encode())])
    status, job = app.json("POST", "/api/kbs/%E5%90%8D%E5%AD%97/files", body, headers={"content-type": ctype})
    assert status == 200, job
    done = app.wait_job(job["job_id"])
    assert done["state"] == "done" and [f["status"] for f in done["files"]] == ["ok"], done
    stored = [p.name for p in (app.kb_root / "名字" / "sources").iterdir()]
    assert stored == ["报告txt.exe.md"]
    assert done["files"][0]["name"] == "sources/报告txt.exe.md"


def test_login_attempts_are_limited_per_user_and_per_address(tmp_path):
    """3 wrong passwords lock a user name (even the right password is then refused, 429); 5 failures from one
    address lock the address, for the API and the page's login form alike."""
    config = tmp_path / "login.yaml"
    config.write_text("app:\n  auth_enabled: true\n  users: [{username: alice}, {username: bob}]\n"
                      "  login_max_failures: 3\n  login_max_failures_per_address: 5\n", encoding="utf-8")
    app = AppProcess(tmp_path / "kb", env={"ZHIWEN_CONFIG": str(config), "ZHIWEN_PASSWORD_ALICE": "a-pass",
                                           "ZHIWEN_PASSWORD_BOB": "b-pass"}, ready_auth=("alice", "a-pass"))
    try:
        for _ in range(3):
            assert app.request("GET", "/api/kbs", auth=("alice", "wrong"))[0] == 401
        status, headers, _ = app.request("GET", "/api/kbs", auth=("alice", "a-pass"))
        assert status == 429 and int(headers["retry-after"]) > 0
        assert app.request("GET", "/api/kbs", auth=("bob", "b-pass"))[0] == 200       # another name still works
        form = {"content-type": "application/x-www-form-urlencoded"}
        for _ in range(2):  # the page's login form: two more failures from this address make five
            assert app.request("POST", "/login", b"username=bob&password=nope", headers=form)[0] in (400, 401)
        assert app.request("POST", "/login", b"username=bob&password=b-pass", headers=form)[0] == 429
        assert app.request("GET", "/api/kbs", auth=("bob", "b-pass"))[0] == 429
    finally:
        app.stop()


def test_basic_auth_checks_bcrypt_once_then_remembers(monkeypatch):
    """A spy on the real bcrypt.checkpw counts the checks: one for the first request, none for the next ones;
    a wrong password is never taken from the memory."""
    import bcrypt

    from app.auth import Authenticator, hash_password
    from configs import load_settings

    settings = load_settings(app={"auth_enabled": True, "users": [{"username": "u", "password_hash":
                                                                      hash_password("pw")}]})
    auth = Authenticator(settings, environ={})
    calls, real = [], bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda *a: calls.append(1) or real(*a))
    assert all(auth.verify("u", "pw", address="10.0.0.1") for _ in range(20))
    assert len(calls) == 1
    assert not auth.verify("u", "pw2") and len(calls) == 2
    off = Authenticator(load_settings(app={**settings.app.model_dump(), "auth_cache_s": 0}), environ={})
    assert off.verify("u", "pw") and off.verify("u", "pw") and len(calls) == 4


def test_upload_job_survives_a_kill(tmp_path, models_dir):
    """An upload job is killed (kill -9) after its files were stored but before they were indexed (the test holds
    the knowledge base's writer lock, as a long command-line ingest would). After a restart the job's record still
    answers, says it was interrupted and names the job that ingests the stored files, which then are searchable."""
    from configs import load_settings
    from retrieval.store import KnowledgeBase

    require_model(models_dir, "multilingual-e5-small")
    kb_root = tmp_path / "kb"
    app = AppProcess(kb_root)
    try:
        assert app.json("POST", "/api/kbs", {"name": "手册"})[0] == 201
        settings = load_settings(paths={"kb_root": str(kb_root)})
        files = [(f"制度{i}.md", f"# 制度 {i}\n\n第 {i} 条：出差住宿标准为每晚 {300 + i} 元。".encode())
                 for i in range(5)]
        body, ctype = multipart(files)
        with KnowledgeBase.open_writer("手册", settings, timeout=10):
            status, job = app.json("POST", "/api/kbs/%E6%89%8B%E5%86%8C/files", body, headers={"content-type": ctype})
            assert status == 200, job
            sources = kb_root / "手册" / "sources"
            deadline = time.monotonic() + 120
            while len([p for p in sources.iterdir() if p.suffix == ".md"]) < 5 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert app.json("GET", f"/api/jobs/{job['job_id']}")[1]["state"] == "running"
            app.kill()
        assert KnowledgeBase.open("手册", settings).manifest.files == {}   # stored, never indexed
    finally:
        app.stop()
    app = AppProcess(kb_root)
    try:
        status, old = app.json("GET", f"/api/jobs/{job['job_id']}")
        assert status == 200 and old["state"] == "failed" and "任务中断" in old["error"], old
        assert old["resumed_by"] and old["resumed_by"] in old["error"]
        resumed = app.wait_job(old["resumed_by"])
        assert resumed["kind"] == "resume" and resumed["state"] == "done", resumed
        assert sorted((f["name"], f["status"]) for f in resumed["files"]) == [
            (f"sources/{name}", "ok") for name, _ in sorted(files)]
        listed = app.json("GET", "/api/kbs")[1]
        assert [(k["name"], k["files"], k["chunks"], k["failed"]) for k in listed] == [("手册", 5, 5, 0)]
        status, found = app.json("POST", "/api/search", {"question": "出差住宿标准每晚多少元", "kb": "手册",
                                                          "threshold": -1})
        assert status == 200 and found["hits"], found
    finally:
        app.stop()


def test_gradio_upload_folder_is_emptied_at_start(tmp_path):
    """Files left in the app's Gradio upload folder by an earlier run (uploads never cleaned) are gone after a
    start; a folder that is not the app's own (no marker, not empty) is left alone."""
    own = tmp_path / "kb" / ".gradio-uploads"
    (own / "0123abcd").mkdir(parents=True)
    (own / "0123abcd" / "报告.pdf").write_bytes(b"%PDF-1.4 left over")
    (own / ".zhiwen-uploads").write_text("marker", encoding="utf-8")
    app = AppProcess(tmp_path / "kb")
    try:
        assert sorted(p.name for p in own.iterdir()) == [".zhiwen-uploads"]
    finally:
        app.stop()
    foreign = tmp_path / "shared-tmp"
    (foreign / "other-app").mkdir(parents=True)
    app = AppProcess(tmp_path / "kb", env={"GRADIO_TEMP_DIR": str(foreign)})
    try:
        assert (foreign / "other-app").is_dir()
    finally:
        app.stop()
