"""Parser processes die with the process that started them (Linux), so that `kill -9` of an ingest, or of the
app during one, leaves no forkserver or parse worker behind (they would otherwise live on, idle, forever).

Imported by the parse pool's forkserver (in its preload list, see ingest/parse_pool.py) and called by each
worker's initializer: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). Importing this
module anywhere else does nothing.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _in_forkserver() -> bool:
    return "multiprocessing.forkserver import main" in " ".join(getattr(sys, "orig_argv", []))


if _in_forkserver():
    die_with_parent()
