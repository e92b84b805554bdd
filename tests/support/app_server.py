"""`python app.py` in a subprocess on a free loopback port, for tests that drive the real app with real requests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path

from configs import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """The real app (no model warm-up) with its own knowledge-base root; stdout and stderr go to `log_path`."""

    def __init__(self, kb_root: Path, env: dict[str, str] | None = None, ready_auth: tuple[str, str] | None = None,
                 timeout: float = 240) -> None:
        self.kb_root = kb_root
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.log_path = kb_root.parent / f"app-{self.port}.log"
        full_env = {**os.environ, "ZHIWEN_PROFILE": "test", "ZHIWEN_PATHS__KB_ROOT": str(kb_root),
                    "ZHIWEN_INGEST__WORKERS": "1", **(env or {})}
        if "GRADIO_TEMP_DIR" not in (env or {}):  # the app then uses its own folder under kb_root
            full_env.pop("GRADIO_TEMP_DIR", None)
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(self.port), "--no-warm-up"],
            cwd=PROJECT_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.request("GET", "/api/kbs", auth=ready_auth)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the app did not answer on {self.origin} within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(self, method: str, path: str, body: bytes | dict | None = None, *, auth: tuple[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one real HTTP request; a dict body is sent as JSON."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        path = urllib.parse.quote(path, safe="/?=&%")  # Chinese KB names in the path, percent-encoded
        req = urllib.request.Request(self.origin + path, method=method, data=data, headers=headers or {})
        if isinstance(body, dict):
            req.add_header("content-type", "application/json")
        if auth:
            req.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: bytes | dict | None = None, **kw) -> tuple[int, dict | list]:
        status, _headers, raw = self.request(method, path, body, **kw)
        return status, json.loads(raw.decode("utf-8")) if raw else {}

    def wait_job(self, job_id: str, timeout: float = 300, **kw) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/api/jobs/{job_id}", **kw)
            assert status == 200, job
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s")

    def kill(self) -> None:
        """kill -9: no shutdown code runs, as when the machine or the OOM killer ends the app."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        stop_process(self.proc)
        if not self._log.closed:
            self._log.close()


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a started app process, killing it if it has not exited 15 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with these (filename, bytes) files; returns (body, content-type)."""
    boundary = "zhiwen-test-boundary-7d1f"
    out = b""
    for name, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
