"""Patch an unpacked llama-cpp-python source tree so llama.cpp's AMX kernels survive torch in the same process.

scripts/setup.sh runs this on the sdist before it builds the wheel (python scripts/llama_cpp_amx_patch.py SRC_DIR).
llama.cpp loads the AMX tile configuration once per thread (ggml-cpu/amx/mmq.cpp, ggml_tile_config_init, a
thread_local "done" flag). In Zhiwen the e5 embedder's bf16 matrices run through torch's oneDNN AMX kernels on the
same threads, and oneDNN releases the tile state when it is done, so llama.cpp's next prompt executes tile
instructions on an unconfigured unit and the process dies with SIGILL (docs/benchmarks.md §8b). The patch loads the
configuration at the start of every AMX matrix product (one `ldtilecfg` per thread per product: nanoseconds) and
exports the marker zhiwen_amx_tile_reload, by which llm/llamacpp_backend.py knows the build is safe to run AMX in.
It fails loudly when the source no longer looks as expected (a new llama-cpp-python version needs a look).
"""
from __future__ import annotations

import sys
from pathlib import Path

ONCE = """    static thread_local bool done = false;

    if (done) {
        return;
    }
"""
EVERY_CALL = """    // zhiwen (scripts/llama_cpp_amx_patch.py): configure on every call; torch's oneDNN may have
    // released the tile state on this thread since the last one
"""
END = "    _tile_loadconfig(&tc);\n    done = true;\n}\n"
MARKER = ('    _tile_loadconfig(&tc);\n}\n\nextern "C" __attribute__((visibility("default"))) '
          "int zhiwen_amx_tile_reload(void) { return 1; }\n")


def patch(src: Path) -> None:
    path = src / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    text = path.read_text(encoding="utf-8")
    if "zhiwen_amx_tile_reload" in text:
        return
    if text.count(ONCE) != 1 or text.count(END) != 1:
        sys.exit(f"llama_cpp_amx_patch: {path} no longer has the expected ggml_tile_config_init; update the patch")
    path.write_text(text.replace(ONCE, EVERY_CALL).replace(END, MARKER), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/llama_cpp_amx_patch.py UNPACKED_LLAMA_CPP_PYTHON_SDIST")
    patch(Path(sys.argv[1]))
