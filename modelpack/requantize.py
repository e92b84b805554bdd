"""A GGUF re-quantised for this CPU with llama.cpp's own quantiser (`python -m modelpack requantize`).

    python -m modelpack requantize qwen-1.5b                 # the demo GGUF -> models/qwen2.5-coder-1.5b-instruct-q8_0/
    python -m modelpack requantize /data/glm-4-9b-chat-Q4_K_M.gguf --format Q8_0 --out /data/glm-4-9b-chat-Q8_0.gguf

Why (docs/benchmarks.md §8c/§8d): on an Intel Xeon with AMX, llama.cpp has AMX int8 kernels for Q8_0 (and Q4_0,
Q4_K …) but none for q5_0, the type most of the demo GGUFs' tensors have, so the same model re-quantised to Q8_0
reads a prompt 1.3x (1.5B) to 2.4x (0.5B) faster, decodes as fast or faster, and answers with the same F1, at
0.5-1.5 GB more memory. On CPUs without AMX the shipped Q4_K_M is the better file. Q8_0 made from a 4/5-bit file
holds its values to within Q8_0's rounding; Q4_0 made from one loses precision (`--allow-lossy`).

The new file goes into its own folder under models_dir (so `llm.model: <folder>` picks it, and `llm.backend: auto`
sends it to llama.cpp), written to a temporary name and renamed when complete. The quantiser runs in a child
process: llama.cpp logs a line per tensor, and a crash there cannot take this process with it. Beside the file,
`<file>.source.json` records which file it was made from (name, size, a fingerprint of its first and last MiB;
common.gguf_copy), so that the llama.cpp engine can answer from the copy in place of its source on a CPU where the
copy's format is the faster one (`llm.use_cpu_copy`, llm.locate.cpu_copy_for: Q8_0 on AMX, BF16 for models up to
1B on AVX-512 BF16 without AMX) and ignore a copy that belongs to another version of the file.
`python -m modelpack pull` makes the copies of the demo GGUFs itself on such CPUs (`ensure_cpu_copy`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common.cpu import cpu_flags
from common.gguf_copy import copy_path, cpu_copy_format, made_from, n_params, write_sidecar
from modelpack.pack import MODELS, ModelPackError

# llama.h's LLAMA_FTYPE_MOSTLY_* values
FORMATS = {"Q8_0": 7, "Q4_0": 2, "BF16": 32, "F16": 1}
LOSSY_FROM_QUANTIZED = {"Q4_0"}


class RequantizeError(ModelPackError):
    """A sentence for the user: what could not be re-quantised and why."""


def source_gguf(name_or_path: str, models_dir: Path) -> Path:
    """The GGUF to re-quantise: a pack model key (qwen-0.5b, qwen-1.5b), a folder inside models_dir or anywhere
    holding one .gguf, or a .gguf file."""
    model = MODELS.get(name_or_path)
    if model is not None:
        ggufs = [s.name for s in model.sources if s.name.endswith(".gguf")]
        if not ggufs:
            raise RequantizeError(f"{name_or_path} has no GGUF file (it is {model.description})")
        path = models_dir / ".sources" / ggufs[0]
        if not path.is_file():
            raise RequantizeError(f"{path} is missing: run `python -m modelpack pull {name_or_path}` first")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists() and (models_dir / name_or_path).exists():
        path = models_dir / name_or_path
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf"))
        if len(found) != 1:
            raise RequantizeError(f"{path} holds {len(found)} .gguf files; name the one to re-quantise")
        path = found[0]
    if not path.is_file():
        raise RequantizeError(f"{name_or_path}: no such GGUF file, folder or pack model (qwen-0.5b, qwen-1.5b)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RequantizeError(f"{path} is not a GGUF file (it does not start with the GGUF signature)")
    return path


def requantize(src: Path, dst: Path, fmt: str, *, threads: int = 0) -> None:
    """Write `src` re-quantised to `fmt` at `dst`, in this process (see requantize_in_child)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FORMATS[fmt]
    params.allow_requantize = True
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RequantizeError(f"llama.cpp's quantiser failed on {src.name} (return code {rc})")


def requantize_in_child(src: Path, dst: Path, fmt: str) -> float:
    """requantize() in a child process, into a temporary file renamed to `dst` when complete: the seconds it took."""
    if fmt not in FORMATS:
        raise RequantizeError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    part.unlink(missing_ok=True)
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "modelpack", "_requantize", str(src), str(part), fmt],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        last = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RequantizeError(f"re-quantising {src.name} to {fmt} failed (exit {proc.returncode}): "
                              + " / ".join(last))
    write_sidecar(dst, src, fmt)           # before the file appears: never a copy without its record
    os.replace(part, dst)
    return time.monotonic() - t


def requantize_child(argv: list[str]) -> int:
    src, dst, fmt = argv
    try:
        requantize(Path(src), Path(dst), fmt)
    except RequantizeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def run(name_or_path: str, fmt: str, out: Path | None, models_dir: Path, *, force: bool, allow_lossy: bool) -> Path:
    """The `requantize` command: returns the written file."""
    fmt = fmt.upper()
    if fmt not in FORMATS:
        raise RequantizeError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    src = source_gguf(name_or_path, models_dir)
    if fmt in LOSSY_FROM_QUANTIZED and not allow_lossy:
        raise RequantizeError(f"{fmt} made from an already quantised file loses precision (answers change); "
                              f"use Q8_0, or add --allow-lossy to make it anyway")
    dst = (out.expanduser() if out else copy_path(src, fmt, models_dir)).resolve()
    if dst == src.resolve():
        raise RequantizeError("the output would overwrite the source; give another --out")
    if dst.exists() and not force:
        raise RequantizeError(f"{dst} exists already (--force replaces it)")
    seconds = requantize_in_child(src, dst, fmt)
    size = dst.stat().st_size / 2**20
    print(f"wrote {dst} ({size:.0f} MiB, {fmt}, from {src.name}) in {seconds:.1f} s")
    use = dst.parent.name if dst.parent.parent == models_dir.resolve() else str(dst)
    print(f"use it with: llm.model: {use}   (or ZHIWEN_LLM__MODEL={use})")
    return dst


def count_params(src: Path) -> int:
    """common.gguf_copy.n_params without llama.cpp's loader line on the terminal: this is a command-line process
    (pull, list), where nothing else writes to stderr meanwhile; the engine's own log capture keeps it quiet there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            return n_params(src)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def ensure_cpu_copy(src: Path, models_dir: Path) -> Path | None:
    """`pull`: the copy of a pulled demo GGUF in this CPU's fastest format (common.gguf_copy.cpu_copy_format), made
    when missing or made from another file; None where the file itself is the fastest. Prints what it does; a
    failure is a warning (the shipped file still answers), never an error of the pull."""
    try:
        fmt, why = cpu_copy_format(cpu_flags(), count_params(src))
    except (ImportError, OSError, ValueError) as e:
        print(f"warning: no copy of {src.name} for this CPU: {e}", file=sys.stderr, flush=True)
        return None
    if fmt is None:
        return None
    dst = copy_path(src, fmt, models_dir)
    if dst.is_file() and made_from(dst, src):
        return dst
    try:
        seconds = requantize_in_child(src, dst, fmt)
    except RequantizeError as e:
        print(f"warning: no {fmt} copy of {src.name} for this CPU: {e}", file=sys.stderr, flush=True)
        return None
    print(f"{why}: wrote the {fmt} copy {dst} ({dst.stat().st_size / 2**20:.0f} MiB) in {seconds:.1f} s; "
          f"llama.cpp answers from it (reads prompts faster here: docs/benchmarks.md §8c-§8g; "
          f"llm.use_cpu_copy: false turns it off)", flush=True)
    return dst
