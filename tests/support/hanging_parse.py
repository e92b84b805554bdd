"""Parse functions for ingest tests that run in the pipeline's worker processes (forkserver workers import them by
module name, so they live here rather than in a test module)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

GIVE_UP_S = 600  # a pipeline without a parse timeout makes the test fail after this long instead of hanging forever


def parse_or_hang(path: str, ingest_settings) -> tuple:
    """The real parser, except for three kinds of file:

    *hang*: never finishes, like a parser stuck in a loop (gives up after GIVE_UP_S). It first writes its pid to
    the hidden file `.<name>.pid` beside it, so a test can check that the process is gone afterwards.
    *slow*: takes 40 % of ingest.parse_timeout_s, so that a *wait* file behind it on the same worker starts late.
    *wait*: appends a line to `.<name>.runs`, then waits until that hanging process is dead: it is still running
    when the hanging file times out (though not yet for long: it started after a slow file), so it must be run
    again after the pool is torn down.
    """
    from ingest.parse_pool import parse_in_worker

    p = Path(path)
    if "hang" in p.name:
        p.with_name(f".{p.name}.pid").write_text(str(os.getpid()))
        time.sleep(GIVE_UP_S)
    elif "slow" in p.name:
        time.sleep(0.4 * ingest_settings.parse_timeout_s)
    elif "wait" in p.name:
        with open(p.with_name(f".{p.name}.runs"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline and not _hanging_parse_is_gone(p.parent):
            time.sleep(0.05)
    return parse_in_worker(path, ingest_settings)


def _hanging_parse_is_gone(folder: Path) -> bool:
    try:
        pids = [int(f.read_text()) for f in folder.glob(".*hang*.pid")]
    except ValueError:  # being written
        return False
    return bool(pids) and not any(is_alive(pid) for pid in pids)


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
