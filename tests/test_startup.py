"""The three entry points (app.py, ingest.py, cli.py) run as real subprocesses: a settings mistake is one sentence
naming the variable or file, exit status 2, no traceback; app.py on a port in use says so and never claims to have
started."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from configs import PROJECT_ROOT


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    # ZHIWEN_* of the calling shell would mix in; keep only the test's models folder (CI sets it).
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ZHIWEN_")}
    if "ZHIWEN_PATHS__MODELS_DIR" in os.environ:
        base["ZHIWEN_PATHS__MODELS_DIR"] = os.environ["ZHIWEN_PATHS__MODELS_DIR"]
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, env={**base, **env}, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


ENTRY_POINTS = {
    "app.py": lambda tmp: ["app.py", "--no-warm-up", "--port", "1"],
    "ingest.py": lambda tmp: ["ingest.py", str(tmp), "--kb", "t", "--quiet"],
    "cli.py": lambda tmp: ["cli.py", "--kb", "t", "--question", "问"],
}
BAD = {
    "unknown variable": ({"ZHIWEN_INGEST__CHUNK_SISE": "300"}, [], "ZHIWEN_INGEST__CHUNK_SISE names no setting"),
    "section not a dict": ({"ZHIWEN_LLM": "notadict"}, [], "ZHIWEN_LLM must be a JSON object"),
    "malformed users": ({"ZHIWEN_APP__USERS": "[{username: alice"}, [], "ZHIWEN_APP__USERS must be a JSON list"),
    "config is a folder": ({}, ["--config", "{tmp}"], "--config: {tmp} is a folder"),
    "bad value": ({"ZHIWEN_LLM__QUANTIZATION": "fp8"}, [], "llm.quantization: Input should be 'nf4', 'int8' or"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_settings_mistake_is_one_sentence_and_exit_2(tmp_path: Path, entry, case):
    env, extra, needle = BAD[case]
    args = ENTRY_POINTS[entry](tmp_path) + [a.format(tmp=tmp_path) for a in extra]
    r = _run(args, {"ZHIWEN_PATHS__KB_ROOT": str(tmp_path / "kb"), **env})
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle.format(tmp=tmp_path) in lines[0], r.stderr
    assert not (tmp_path / "kb").exists()  # nothing was started or written


def test_app_on_a_port_in_use_says_so_and_does_not_claim_to_start(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        r = _run(["app.py", "--no-warm-up", "--host", "127.0.0.1", "--port", str(port)],
                 {"ZHIWEN_PATHS__KB_ROOT": str(tmp_path / "kb")})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "知问已启动" not in r.stdout + r.stderr
    assert f"端口 {port} 已被占用" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr


def test_app_flag_out_of_range_is_a_settings_error(tmp_path: Path):
    """--port is merged as a keyword override, so it is validated like every other source."""
    r = _run(["app.py", "--no-warm-up", "--port", "70000"], {"ZHIWEN_PATHS__KB_ROOT": str(tmp_path / "kb")})
    assert r.returncode == 2 and "app.port: Input should be less than 65536 (got 70000)" in r.stderr, r.stderr
