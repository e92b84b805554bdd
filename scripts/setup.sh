#!/usr/bin/env bash
# Create .venv with the pinned dependencies, the llama.cpp engine and the model pack. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0

# llama.cpp engine (llm.backend: llamacpp / auto). llama-cpp-python ships only as source: build its wheel once
# (about 5 min on an idle 2-core machine) and keep it in ~/.cache/zhiwen/wheels, keyed by the CMake flags, the
# compiler, this CPU's instruction set and the AMX fix header, so later runs, other clones and CI on this machine
# install it in seconds, and a wheel built for one CPU is never installed on another. GGML_NATIVE uses every
# instruction this CPU has (AVX-512, AMX...); for a wheel to copy to other machines set ZHIWEN_LLAMA_CMAKE_ARGS,
# e.g. "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" (longer build), or add -DGGML_CUDA=on for
# GPUs. OpenMP threads the matrix kernels; no BLAS: llama.cpp's own quantized kernels beat it for Q4/Q8 weights.
# Two fixes make llama.cpp's AMX kernels safe on AMX Xeons (docs/benchmarks.md §8b): scripts/llama_cpp_amx_fix.h is
# force-included into the C++ sources (GCC < 13.2, Debian 12's 12.2, miscompiles the tile set-up: SIGSEGV), and
# scripts/llama_cpp_amx_patch.py patches the unpacked sdist so the tile configuration is loaded on every matrix
# product (torch's oneDNN releases it on the same threads: SIGILL).
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${ZHIWEN_LLAMA_CMAKE_ARGS:-"-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=ON"}
LLAMA_FIX=scripts/llama_cpp_amx_fix.h
LLAMA_PATCH=scripts/llama_cpp_amx_patch.py
llama_key=$(printf '%s\n%s\n%s\n%s\n%s\n' "$LLAMA_CMAKE_ARGS" "$(uname -m)" "$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)" \
            "$(${CXX:-c++} --version 2>/dev/null | head -1)" "$(cat "$LLAMA_FIX" "$LLAMA_PATCH" | sha256sum)" | sha256sum | cut -c1-12)
# the installed wheel must be this version *and* this build (an older build of the same version is replaced)
if [ "$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" != "$LLAMA_CPP_VERSION" ] \
   || [ "$(cat .venv/.zhiwen-llama-build 2>/dev/null)" != "$llama_key" ]; then
  wheel_dir="${ZHIWEN_WHEEL_CACHE:-$HOME/.cache/zhiwen/wheels}/llama-cpp-python-$LLAMA_CPP_VERSION-$llama_key"
  if ! ls "$wheel_dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION once (about 5 min on 2 idle cores; cached in $wheel_dir) …"
    start=$(date +%s)
    tmp=$(mktemp -d)
    cp "$LLAMA_FIX" "$tmp/zhiwen_amx_fix.h"
    case "$LLAMA_CMAKE_ARGS" in
      *CMAKE_CXX_FLAGS*) cmake_args="$LLAMA_CMAKE_ARGS" ;;        # the caller's own C++ flags win (add the -include)
      *) cmake_args="$LLAMA_CMAKE_ARGS -DCMAKE_CXX_FLAGS=-include$tmp/zhiwen_amx_fix.h" ;;
    esac
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$tmp/sdist" "llama-cpp-python==$LLAMA_CPP_VERSION"
    tar -xzf "$tmp"/sdist/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$tmp"
    .venv/bin/python "$LLAMA_PATCH" "$tmp/llama_cpp_python-$LLAMA_CPP_VERSION"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$tmp" "$tmp/llama_cpp_python-$LLAMA_CPP_VERSION"
    mkdir -p "$wheel_dir" && mv "$tmp"/llama_cpp_python-*.whl "$wheel_dir"/ && rm -rf "$tmp"
    echo "built in $(( $(date +%s) - start )) s"
  fi
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall \
    "$wheel_dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  echo "$llama_key" > .venv/.zhiwen-llama-build
fi

.venv/bin/pip install -q --disable-pip-version-check -r "${REQUIREMENTS:-requirements.txt}"
.venv/bin/python -m modelpack pull "${ZHIWEN_MODEL_PACK:-demo}"
