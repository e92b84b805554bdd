"""Concurrency bench: N simultaneous chats + 1 upload-and-ingest against the running app, over the HTTP API.

    .venv/bin/python -m bench.concurrency                       # starts its own app on the sample KB (docs/guide)
    .venv/bin/python -m bench.concurrency --url http://127.0.0.1:7860 --kb 使用指南 --user alice --password ...
    .venv/bin/python -m bench.concurrency --chats 8 --profile ""       # the default 1.5B demo model (README numbers)

Every chat asks a question whose answer is in the user guide; an answer counts as correct when it is not a refusal
and its text holds one of the question's references (quotes and spaces ignored). Citing the right file is reported
apart and is not enough. Prints one line per chat and a summary; exit code 1 on any error or wrong answer.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from configs import PROJECT_ROOT as ROOT
from prompts import is_refusal

GUIDE = ROOT / "docs" / "guide"

# (question, texts of which a right answer contains at least one, the guide file that holds the answer).
# Compared with quotes and spaces removed (「停止」按钮 = “停止”按钮 = 停止按钮). 回答很慢 has three right answers in
# the
# guide (smaller model or fewer max_new_tokens; use the GPU; raise concurrency_limit when many people ask).
QUESTIONS: list[tuple[str, tuple[str, ...], str]] = [
    ("如何上传文件？", ("开始导入",), "02-导入文件.md"),
    ("如何开启登录？", ("auth_enabled",), "05-配置说明.md"),
    ("回答很慢怎么办？", ("max_new_tokens", "更小的模型", "concurrency_limit", "cuda"), "06-常见问题.md"),
    ("怎样删除一个知识库？", ("确认删除",), "04-知识库管理.md"),
    ("答案太长时怎样停止生成？", ("点击停止", "停止按钮"), "03-提问.md"),
    ("环境已经安装好时怎样只启动网页？", ("app.py",), "01-安装与启动.md"),
    ("zip 压缩包里的文件数上限是多少？", ("2000",), "02-导入文件.md"),
    ("相关度阈值的默认值是多少？", ("0.86",), "05-配置说明.md"),
]
_QUOTES = str.maketrans("", "", "「」『』“”‘’\"'`")


def _norm(text: str) -> str:
    return "".join(text.translate(_QUOTES).split())
INGEST_DOC = ("星河公司年假制度.md",
              "# 星河公司年假制度\n\n星河公司的正式员工每年享有十五天带薪年假。"
              "年假需要提前三个工作日在办公系统中申请。\n")


@dataclass
class ChatResult:
    question: str
    ok: bool = False
    correct: bool = False      # not a refusal, and the answer text holds one of the references
    contains_ref: bool = False  # the answer text holds one of the references
    right_source: bool = False  # the guide file that holds the answer is among the cited sources
    refused: bool = False      # the model (or the service) said it cannot answer
    error: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    pieces: int = 0
    answer: str = ""
    sources: list[str] = field(default_factory=list)


class Client:
    def __init__(self, origin: str, auth: tuple[str, str] | None = None) -> None:
        self.origin = origin.rstrip("/")
        self.auth = auth

    def request(self, path: str, data: bytes | None = None, ctype: str = "application/json",
                timeout: float = 1800) -> urllib.request.Request:
        req = urllib.request.Request(self.origin + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"content-type": ctype} if data is not None else {})
        if self.auth:
            req.add_header("Authorization", "Basic " + b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode())
        return req

    def get_json(self, path: str) -> object:
        with urllib.request.urlopen(self.request(path), timeout=60) as r:
            return json.loads(r.read())

    def ask(self, question: str, kb: str, expected: tuple[tuple[str, ...], str], params: dict) -> ChatResult:
        res = ChatResult(question)
        body = json.dumps({"question": question, "kb": kb, **params}).encode()
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(self.request("/api/ask", body), timeout=3600) as r:
                for line in r:
                    msg = json.loads(line)
                    if msg["type"] == "token":
                        res.pieces += 1
                        if res.pieces == 1:
                            res.ttft_s = time.perf_counter() - t0
                    elif msg["type"] == "done":
                        res.answer, res.error = msg["answer"], msg["error"]
                        res.sources = [s["source"] for s in msg["sources"]]
                    elif msg["type"] == "error":
                        res.error = msg["error"]
        except (urllib.error.URLError, OSError, ValueError) as e:
            res.error = f"{type(e).__name__}: {e}"
        res.total_s = time.perf_counter() - t0
        res.ok = not res.error and bool(res.answer)
        refs, source = expected
        res.contains_ref = res.ok and any(_norm(r) in _norm(res.answer) for r in refs)
        res.right_source = any(s.endswith("/" + source) for s in res.sources)
        # A refusal is never correct here: every question's answer is in the guide; the answer text must hold it.
        res.refused = is_refusal(res.answer)
        res.correct = res.ok and not res.refused and res.contains_ref
        return res

    def upload(self, kb: str, name: str, content: bytes) -> str:
        boundary = "----zhiwen-bench"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() \
            + content + f"\r\n--{boundary}--\r\n".encode()
        with urllib.request.urlopen(self.request(f"/api/kbs/{urllib.request.quote(kb)}/files", body,
                                                 f"multipart/form-data; boundary={boundary}"), timeout=120) as r:
            return json.loads(r.read())["job_id"]

    def wait_job(self, job_id: str, timeout: float = 1800) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get_json(f"/api/jobs/{job_id}")
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"ingestion job {job_id} did not finish in {timeout} s")


@dataclass
class BenchResult:
    chats: list[ChatResult]
    ingest_job: dict
    ingest_s: float
    wall_s: float

    @property
    def passed(self) -> bool:
        return (all(c.ok and c.correct for c in self.chats) and self.ingest_job.get("state") == "done"
                and all(f["status"] in ("ok", "unchanged") for f in self.ingest_job.get("files", [])))


def run_bench(client: Client, kb: str, chats: int, params: dict) -> BenchResult:
    """Start `chats` chats and one upload at the same moment; wait for all of them."""
    results: list[ChatResult | None] = [None] * chats
    ingest: dict = {}
    ingest_s = 0.0
    barrier = threading.Barrier(chats + 1)

    def chat(i: int) -> None:
        q, refs, src = QUESTIONS[i % len(QUESTIONS)]
        barrier.wait()
        results[i] = client.ask(q, kb, (refs, src), params)

    def upload() -> None:
        nonlocal ingest, ingest_s
        barrier.wait()
        t0 = time.perf_counter()
        try:
            ingest = client.wait_job(client.upload(kb, INGEST_DOC[0], INGEST_DOC[1].encode()))
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
            ingest = {"state": "failed", "error": f"{type(e).__name__}: {e}", "files": []}
        ingest_s = time.perf_counter() - t0

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chats)] + [threading.Thread(target=upload)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return BenchResult([r for r in results if r is not None], ingest, ingest_s, time.perf_counter() - t0)


def print_report(r: BenchResult) -> None:
    for c in r.chats:
        mark = "OK " if c.ok and c.correct else ("WRONG" if c.ok else "ERROR")
        print(f"{mark} ttft {c.ttft_s:6.1f}s total {c.total_s:6.1f}s pieces {c.pieces:4d}  {c.question}"
              f"  -> sources {sorted({Path(s).name for s in c.sources})}  {c.error}")
        print(f"      answer: {c.answer[:120]!r}")
    files = [(f["name"], f["status"]) for f in r.ingest_job.get("files", [])]
    print(f"ingest: {r.ingest_job.get('state')} in {r.ingest_s:.1f}s {files} {r.ingest_job.get('error', '')}")
    ok = [c for c in r.chats if c.ok]
    if ok:
        ttft = sorted(c.ttft_s for c in ok)
        total = sorted(c.total_s for c in ok)
        pieces = sum(c.pieces for c in ok)
        print(f"chats: {len(r.chats)}, errors {sum(not c.ok for c in r.chats)}, "
              f"correct {sum(c.correct for c in r.chats)} "
              f"(answer text holds a reference: {sum(c.contains_ref for c in r.chats)}, "
              f"right file among the sources: {sum(c.right_source for c in r.chats)}, "
              f"refusals: {sum(c.refused for c in r.chats)}); "
              f"ttft median {ttft[len(ttft) // 2]:.1f}s max {ttft[-1]:.1f}s; "
              f"total median {total[len(total) // 2]:.1f}s "
              f"max {total[-1]:.1f}s; wall {r.wall_s:.1f}s; aggregate {pieces / r.wall_s:.2f} pieces/s")
    print("PASS" if r.passed else "FAIL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_app(workdir: Path, kb: str, env_overrides: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Ingest docs/guide into a fresh KB root and start `python app.py` on a free port (models warmed up)."""
    env = {**os.environ, "ZHIWEN_PATHS__KB_ROOT": str(workdir / "kb"), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           **env_overrides}
    subprocess.run([sys.executable, "ingest.py", str(GUIDE), "--kb", kb, "--quiet"], cwd=ROOT, env=env, check=True)
    port = _free_port()
    log = (workdir / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    origin = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}; see {workdir / 'app.log'}")
        try:
            with urllib.request.urlopen(origin + "/api/health", timeout=5):
                return proc, origin
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the app did not start within 900 s; see {workdir / 'app.log'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running app; default: start one on the sample KB in a temporary folder")
    ap.add_argument("--kb", default="使用指南")
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--profile", default="test", help="ZHIWEN_PROFILE for a self-started app (test = 0.5B demo)")
    ap.add_argument("--dtype", default="float32", help="llm.dtype for a self-started app (float32 is fastest on CPU)")
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args(argv)
    params = {"max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "temperature": 0}
    proc = None
    with tempfile.TemporaryDirectory(prefix="zhiwen-bench-") as tmp:
        try:
            if args.url:
                origin = args.url
            else:
                proc, origin = start_local_app(Path(tmp), args.kb, {"ZHIWEN_PROFILE": args.profile,
                                                                    "ZHIWEN_LLM__DTYPE": args.dtype})
            client = Client(origin, (args.user, args.password) if args.user else None)
            print(f"app {origin}: {json.dumps(client.get_json('/api/health'), ensure_ascii=False)[:300]}")
            result = run_bench(client, args.kb, args.chats, params)
            print_report(result)
            return 0 if result.passed else 1
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
