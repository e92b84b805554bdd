"""The real page in a real browser: the app runs as `python app.py` in a subprocess on a free loopback port with a
temporary knowledge-base root and the demo 0.5B model; Chromium (Debian's, headless) drives it through Playwright.

What is proven, in order (the tests share one server and build on each other):
  upload two files → background ingestion finishes with per-file results and a file table;
  a question → a streamed answer (several partial texts seen) with a sources panel naming the file;
  deleting a file → its text is no longer found on the retrieval-test tab;
  with login configured, the page and the API refuse strangers and let a configured user in;
  every request the browser made went to the app's own origin (no fonts, CDNs, analytics).
Screenshots and the network log go to artifacts/browser/.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs import PROJECT_ROOT
from tests.conftest import require_model

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "artifacts" / "browser"
DOC_NAME = "星河公司年假制度.md"
DOC_TEXT = """# 星河公司年假制度

## 年假天数
星河公司的正式员工每年享有十五天带薪年假。入职未满一年的员工按在职月份折算。

## 申请方式
年假需要提前三个工作日在办公系统中提交申请，由直属主管审批。
"""
GUIDE = PROJECT_ROOT / "docs" / "guide" / "02-导入文件.md"
# Small and fast on a 2-core CPU: the demo 0.5B model in float32 (bf16 matmuls are slow on most CPUs),
# one passage of context, a short answer. What is tested is the page, not the answer's quality.
FAST_ENV = {
    "ZHIWEN_PROFILE": "test",
    "ZHIWEN_LLM__DTYPE": "float32",
    "ZHIWEN_LLM__MAX_NEW_TOKENS": "16",
    "ZHIWEN_RETRIEVAL__TOP_K": "1",
    "ZHIWEN_PROMPT__HISTORY_TURNS": "0",
    "ZHIWEN_INGEST__WORKERS": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` in a subprocess; its log goes to artifacts/browser/<name>.log."""

    def __init__(self, name: str, kb_root: Path, extra_env: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.port = _free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        env = {**os.environ, **FAST_ENV, "ZHIWEN_PATHS__KB_ROOT": str(kb_root),
               "GRADIO_TEMP_DIR": str(kb_root.parent / "gradio-tmp"), **(extra_env or {})}
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(self.port), "--no-warm-up"],
            cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def api(self, path: str, data: dict | None = None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.origin + path, method="POST" if data is not None else "GET",
                                     data=json.dumps(data).encode() if data is not None else None,
                                     headers={"content-type": "application/json"})
        if auth:
            req.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, r.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8")

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with code {self.proc.returncode}; see {self.log_path}:\n"
                            + self.log_path.read_text(encoding="utf-8")[-3000:])
            try:
                if self.api("/api/kbs", auth=self.auth)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the app did not answer on {self.origin} within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Iterator[AppServer]:
    require_model(models_dir, "multilingual-e5-small")
    require_model(models_dir, "qwen2.5-0.5b-instruct")
    root = tmp_path_factory.mktemp("browser")
    (root / "kb").mkdir()
    srv = AppServer("app", root / "kb")
    yield srv
    srv.stop()


class NetLog:
    """Every URL the page requested, kept per test and written to artifacts/browser/network.log."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def check_only(self, origin: str, test: str) -> None:
        with (ARTIFACTS / "network.log").open("a", encoding="utf-8") as f:
            f.write(f"# {test}: {len(self.urls)} requests\n" + "".join(u + "\n" for u in self.urls))
        foreign = [u for u in self.urls if not (u == origin or u.startswith(origin + "/")) and not u.startswith("data:")
                   and not u.startswith("blob:")]
        assert self.urls, "no request was recorded: the network log is not working"
        assert foreign == [], f"the page requested other hosts: {foreign[:10]}"


@pytest.fixture()
def page(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="zh-CN")
    net = NetLog()
    context.on("request", lambda r: net.urls.append(r.url))
    pg = context.new_page()
    pg.netlog = net
    yield pg
    context.close()


def _shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _open(pg, server: AppServer) -> None:
    pg.goto(server.origin + "/")
    pg.wait_for_selector("#status-line", timeout=60_000)
    pg.wait_for_function("() => document.querySelector('#status-line').innerText.includes('模型')", timeout=60_000)


def _tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def _wait_job_done(pg, timeout_s: float = 300) -> str:
    pg.wait_for_selector("#job [data-state=done], #job [data-state=failed]", timeout=timeout_s * 1000)
    return pg.inner_text("#job")


def test_upload_and_background_ingestion(server, page, tmp_path):
    doc = tmp_path / DOC_NAME
    doc.write_text(DOC_TEXT, encoding="utf-8")
    _open(page, server)
    assert "尚无知识库" in page.inner_text("#status-line")
    _tab(page, "知识库管理")
    page.fill("#new-kb textarea", "测试库")
    page.click("#create-kb")
    page.wait_for_function("() => document.querySelector('#status-line').innerText.includes('测试库')", timeout=30_000)

    page.set_input_files("#upload input[type=file]", [str(doc), str(GUIDE)])
    # both files have reached the server when the component lists them
    page.wait_for_function("() => document.querySelectorAll('#upload .file-preview tr').length === 2", timeout=60_000)
    page.click("#start-ingest")
    page.wait_for_selector("#job [data-job-id]", timeout=30_000)
    _shot(page, "1-ingest-running")
    job = _wait_job_done(page)
    _shot(page, "2-ingest-done")
    assert "已完成" in job, job
    assert f"sources/{DOC_NAME}" in job and f"sources/{GUIDE.name}" in job and "成功" in job
    table = page.inner_text("#file-table")
    assert DOC_NAME in table and GUIDE.name in table
    page.wait_for_function("() => /2 个文件 \\/ \\d+ 段/.test(document.querySelector('#status-line').innerText)",
                           timeout=30_000)
    page.netlog.check_only(server.origin, "upload")


def test_chat_streams_an_answer_with_sources(server, page):
    _open(page, server)
    page.fill("#question textarea", "星河公司的员工每年有多少天年假？")
    page.press("#question textarea", "Enter")
    seen: list[str] = []
    deadline = time.monotonic() + 420  # the first question also loads the model
    while time.monotonic() < deadline and not page.query_selector("#sources .zw-sources"):
        texts = page.eval_on_selector_all("#chat [data-testid=bot]", "els => els.map(e => e.innerText)")
        if texts and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        time.sleep(0.1)
    _shot(page, "3-chat-answer")
    assert page.query_selector("#sources .zw-sources"), f"no sources panel after the answer; bubbles seen: {seen}"
    partial = [t for t in seen if t.strip() not in ("", "…")]
    assert len(partial) >= 2, f"the answer did not stream (texts seen: {seen})"
    final = page.eval_on_selector_all("#chat [data-testid=bot]", "els => els.map(e => e.innerText)")[-1]
    assert final.strip() and not page.query_selector("#chat .zw-error"), final
    sources = page.inner_text("#sources")
    assert DOC_NAME in sources, sources
    assert page.query_selector("#sources mark"), "no supporting sentence was highlighted"
    page.netlog.check_only(server.origin, "chat")


def test_deleted_file_is_no_longer_retrievable(server, page):
    _open(page, server)
    _tab(page, "检索测试")
    page.fill("#search-question textarea", "星河公司年假需要提前几个工作日申请？")
    page.click("#search-btn")
    page.wait_for_selector("#search-results .zw-sources", timeout=120_000)
    assert DOC_NAME in page.inner_text("#search-results")

    _tab(page, "知识库管理")
    page.click("#file-select input")
    page.get_by_role("option", name=f"sources/{DOC_NAME}").click()
    page.keyboard.press("Escape")
    page.click("#remove-files")
    job = _wait_job_done(page, 120)
    assert "已删除" in job, job
    _shot(page, "4-file-deleted")
    page.wait_for_function(f"() => !document.querySelector('#file-table').innerText.includes('{DOC_NAME}')",
                           timeout=30_000)

    _tab(page, "检索测试")
    page.click("#search-btn")
    page.wait_for_function(
        "() => { const r = document.querySelector('#search-results'); return r && !r.innerText.includes('星河公司年假制度') "
        "&& r.querySelector('.zw-sources') }", timeout=120_000)
    results = page.inner_text("#search-results")
    _shot(page, "5-search-after-delete")
    assert DOC_NAME not in results and "十五天带薪年假" not in results and "三个工作日" not in results, results
    page.netlog.check_only(server.origin, "delete")


def test_login_is_enforced_on_page_and_api(browser, tmp_path):
    (tmp_path / "kb").mkdir()
    users = json.dumps([{"username": "alice"}])
    srv = AppServer("app-login", tmp_path / "kb", auth=("alice", "开门-123"), extra_env={
        "ZHIWEN_APP__AUTH_ENABLED": "true", "ZHIWEN_APP__USERS": users, "ZHIWEN_PASSWORD_ALICE": "开门-123"})
    context = browser.new_context(viewport={"width": 1200, "height": 800}, locale="zh-CN")
    net = NetLog()
    context.on("request", lambda r: net.urls.append(r.url))
    try:
        assert srv.api("/api/kbs")[0] == 401
        assert srv.api("/api/kbs", auth=("alice", "wrong"))[0] == 401
        assert srv.api("/api/kbs", auth=("alice", "开门-123")) == (200, "[]")
        pg = context.new_page()
        pg.goto(srv.origin + "/")
        pg.wait_for_selector("input[type=password]", timeout=60_000)
        assert not pg.query_selector("#status-line")
        _shot(pg, "6-login")
        inputs = pg.locator("input:not([type=password])")
        inputs.first.fill("alice")
        pg.fill("input[type=password]", "wrong")
        pg.keyboard.press("Enter")
        pg.wait_for_timeout(1500)
        assert not pg.query_selector("#status-line"), "a wrong password opened the page"
        inputs.first.fill("alice")
        pg.fill("input[type=password]", "开门-123")
        pg.keyboard.press("Enter")
        pg.wait_for_selector("#status-line", timeout=60_000)
        _shot(pg, "7-after-login")
        net.check_only(srv.origin, "login")
    finally:
        context.close()
        srv.stop()
