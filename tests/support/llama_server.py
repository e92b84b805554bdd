"""Start `python -m llama_cpp.server` (llama-cpp-python's OpenAI-compatible server) for the tests, with one fix:
on CPUs that report AMX, llama.cpp's extra weight buffers (AMX / repacked weights) are switched off.

Why: on this project's Xeon VMs the llama-cpp-python 0.3.36 wheel built with GGML_NATIVE dies with a general
protection fault at its first AMX instruction (ldtilecfg in ggml_backend_amx_mul_mat: the VM does not grant the
process AMX tile state), on the first decode. llm/llamacpp_backend.py does the same for the in-process engine.
llama-cpp-python has no server flag for this model parameter, so the default-parameter factory is wrapped before the
server's own main() runs. Everything else is the unmodified server.

    python -m tests.support.llama_server --model FILE.gguf --host 127.0.0.1 --port 8000 ...
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _without_extra_buffers() -> None:
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def main() -> None:
    try:
        amx = "amx_tile" in Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        amx = False
    if amx:
        _without_extra_buffers()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
