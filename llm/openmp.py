"""How the OpenMP threads of llama.cpp (and torch) wait between pieces of work: spin briefly, then sleep.

llama.cpp's CPU kernels run on OpenMP, and every barrier between two operations of a token is an OpenMP barrier,
so the runtime's wait policy decides decode speed. There is one OpenMP runtime per process (torch's and llama.cpp's
libgomp.so.1 is the same library once loaded), and it reads its policy from the environment once, when it is first
loaded — so this runs when the `llm` package is imported, before torch or llama.cpp can load it.

Measured on the 2-core AMX Xeon (0.5B Q4_K_M, 311-token prompt, 64 tokens, torch in the process; docs/benchmarks.md
§8), decode tokens/s idle / beside two busy processes:
    OMP_WAIT_POLICY=PASSIVE (sleep at once)      15.7 / 12.2
    libgomp's default (spin 300,000 rounds)      24.5 /  3.2
    OMP_WAIT_POLICY=ACTIVE (spin forever)        24.8 /  6.7
    GOMP_SPINCOUNT=10000 (spin ~10 µs, sleep)    24.4 /  9.4     <- chosen: full speed idle, no collapse when busy
    ggml's own thread pool (GGML_OPENMP=OFF)     24.3 /  3.5
An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment is left alone.
"""
from __future__ import annotations

import os

SPIN_COUNT = "10000"


def configure_openmp_waits() -> None:
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
