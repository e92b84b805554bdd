"""What this CPU can do, from the `flags` line of Linux's /proc/cpuinfo (empty elsewhere): one reader for the
embedder's and the LLM's precision choice, llama.cpp's AMX buffers and the model pack's AMX hint.

    "amx_tile" in cpu_flags()      has_native_bf16()
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (avx512_bf16, amx_tile, amx_int8 …); empty when /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): bf16 is then faster than fp32.
    Elsewhere bf16 is emulated and slower, so the "auto" precisions keep fp32 there."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
