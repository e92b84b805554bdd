"""Start `python -m llama_cpp.server` (llama-cpp-python's OpenAI-compatible server) for the tests, with one fix:
llama.cpp's extra weight buffers (AMX / repacked weights) are switched off where they would crash.

Why: llama.cpp's AMX kernels compiled by GCC < 13.2 die with SIGSEGV at their first AMX instruction (ldtilecfg in
ggml_backend_amx_mul_mat loads a tile configuration whose stores the compiler removed: scripts/llama_cpp_amx_fix.h).
A wheel built by scripts/setup.sh carries the fix; llm.llamacpp_backend.extra_buffers_wanted decides, for this
server as for the in-process engine. llama-cpp-python has no server flag for this model parameter, so the
default-parameter factory is wrapped before the server's own main() runs. Everything else is the unmodified server.

    python -m tests.support.llama_server --model FILE.gguf --host 127.0.0.1 --port 8000 ...
"""
from __future__ import annotations

import runpy
import sys


def _without_extra_buffers() -> None:
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def main() -> None:
    import llama_cpp

    from llm.llamacpp_backend import extra_buffers_wanted
    if not extra_buffers_wanted(llama_cpp):
        _without_extra_buffers()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
