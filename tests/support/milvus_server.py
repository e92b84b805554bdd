"""A real Milvus-protocol server on loopback for tests of `store.uri: http://…`: milvus-lite's own gRPC server
(`python -m milvus_lite server`), run as a separate process with its own data folder.

It is the same engine as a `*.db` file (milvus-lite 3.2, pure Python) behind the same gRPC API a Milvus
standalone/cluster serves, so the product's server path (no Lite file lock, no Lite flush, AUTOINDEX, several
processes sharing one store) runs for real; what only a C++ Milvus server does (its own index builds, scale) is
for `bench.scale_milvus --uri` against one.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from configs import PROJECT_ROOT
from tests.support.app_server import free_port, stop_process


class MilvusLiteServer:
    """`python -m milvus_lite server` on 127.0.0.1:<free port>; `uri` is what store.uri takes."""

    def __init__(self, data_dir: Path, timeout: float = 60) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"milvus-server-{self.port}.log"
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(self.port)], cwd=PROJECT_ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus_lite server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"milvus_lite server did not listen on {self.uri} within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def __enter__(self) -> MilvusLiteServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
