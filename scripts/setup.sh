#!/usr/bin/env bash
# Create .venv with the pinned dependencies, the llama.cpp engine and the model pack. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0

# llama.cpp engine (llm.backend: llamacpp / auto). llama-cpp-python ships only as source: build its wheel once
# (7–15 min on 2 cores) and keep it in ~/.cache/zhiwen/wheels, keyed by the CMake flags and this CPU's instruction
# set, so later runs, other clones and CI on this machine install it in seconds. GGML_NATIVE uses every instruction
# this CPU has (AVX-512, AMX...); for a wheel to copy to other machines set ZHIWEN_LLAMA_CMAKE_ARGS, e.g.
# "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" (longer build), or add -DGGML_CUDA=on for GPUs.
# OpenMP threads the matrix kernels; no BLAS: llama.cpp's own quantized kernels beat it for Q4/Q8 weights.
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${ZHIWEN_LLAMA_CMAKE_ARGS:-"-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=ON"}
if [ "$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" != "$LLAMA_CPP_VERSION" ]; then
  key=$(printf '%s\n%s\n%s\n' "$LLAMA_CMAKE_ARGS" "$(uname -m)" "$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)" \
        | sha256sum | cut -c1-12)
  wheel_dir="${ZHIWEN_WHEEL_CACHE:-$HOME/.cache/zhiwen/wheels}/llama-cpp-python-$LLAMA_CPP_VERSION-$key"
  if ! ls "$wheel_dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION once (7–15 min on 2 cores; cached in $wheel_dir) …"
    start=$(date +%s)
    tmp=$(mktemp -d)
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
    mkdir -p "$wheel_dir" && mv "$tmp"/llama_cpp_python-*.whl "$wheel_dir"/ && rmdir "$tmp"
    echo "built in $(( $(date +%s) - start )) s"
  fi
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "$wheel_dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
fi

.venv/bin/pip install -q --disable-pip-version-check -r "${REQUIREMENTS:-requirements.txt}"
.venv/bin/python -m modelpack pull "${ZHIWEN_MODEL_PACK:-demo}"
