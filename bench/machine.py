"""One line describing the machine a number was measured on (for reports and docs/benchmarks.md)."""
from __future__ import annotations

import platform

import psutil


def describe_machine() -> str:
    """e.g. "Linux x86_64, 2 CPU threads, 23 GiB RAM, Python 3.11.9, torch 2.13.0 (4 threads), no CUDA"."""
    parts = [f"{platform.system()} {platform.machine()}", f"{psutil.cpu_count(logical=True)} CPU threads",
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        parts.append(f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA")
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        if model:
            parts.insert(1, model)
    except OSError:
        pass
    # The development machine is shared: a number taken under load says so.
    load1, _, load15 = psutil.getloadavg()
    parts.append(f"load average {load1:.1f} (15 min {load15:.1f}) at measurement")
    return ", ".join(parts)
