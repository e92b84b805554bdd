"""Re-quantised copies of GGUF files: where a copy of a file goes and how it records what it was made from.

One format, two rooms: `modelpack.requantize` writes copies (`python -m modelpack requantize`, and `pull` on CPUs
where a copy is faster), `llm.locate.cpu_copy_for` finds the copy the llama.cpp engine answers from
(llm.use_cpu_copy). Which format is faster on which CPU is decided here, once, for both (`cpu_copy_format`).

    copy_path(Path("m/x-Q4_K_M.gguf"), "Q8_0", models)  ->  models/x-q8_0/x-q8_0.gguf
    sidecar(copy)                                      ->  models/x-q8_0/x-q8_0.gguf.source.json
    made_from(copy, source)                            ->  True when the sidecar names this very source file
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

AMX_FORMAT = "Q8_0"      # the format with an AMX int8 kernel for every matrix of the demo models (docs/benchmarks §8d)
BF16_FORMAT = "BF16"     # AVX-512 BF16 dot products (vdpbf16ps): the fastest prompt reading without AMX (§8c)
# A BF16 file is 2.6x the Q4_K_M one, and decoding reads all of it per token: up to ~1B parameters the faster prompt
# reading wins (0.5B: prefill 2.0x, decode 0.85x), above it the slower decoding loses (1.5B: 1.2x / 0.4x; §8c, §8g).
BF16_MAX_PARAMS = 1_000_000_000
SIDECAR_SUFFIX = ".source.json"
_QUANT_SUFFIX = re.compile(r"[-_.](q\d(_[a-z0-9]+)*|iq\d\w*|bf16|f16|f32)$", re.IGNORECASE)
_FINGERPRINT_BYTES = 1 << 20


def cpu_copy_format(flags: frozenset[str] | set[str], n_params: int) -> tuple[str | None, str]:
    """(the format in which a GGUF of `n_params` parameters answers fastest on a CPU with these /proc/cpuinfo flags,
    or None when it is the shipped file itself; why, in words). AMX int8 -> Q8_0 (llama.cpp's AMX kernels cover
    Q8_0 but not the q5_0 tensors of most Q4_K_M files); AVX-512 BF16 without AMX -> BF16 for models up to
    BF16_MAX_PARAMS; anything else -> the file as it is."""
    if "amx_int8" in flags:
        return AMX_FORMAT, "this CPU has AMX int8"
    if "avx512_bf16" in flags and n_params <= BF16_MAX_PARAMS:
        return BF16_FORMAT, f"this CPU has AVX-512 BF16 and the model is small ({n_params / 1e9:.2f}B parameters)"
    return None, ""


def n_params(path: Path) -> int:
    """The parameter count of a GGUF file, from its tensor directory: llama.cpp reads the header only (vocab_only),
    ~0.3 s for the 1.5B demo file, where the gguf package's reader parses every metadata array in Python (~8 s)."""
    import llama_cpp
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp cannot read {path.name} as a GGUF model")
    try:
        return int(llama_cpp.llama_model_n_params(model))
    finally:
        llama_cpp.llama_model_free(model)


def copy_path(src: Path, fmt: str, models_dir: Path) -> Path:
    """models_dir/<name>-<fmt>/<name>-<fmt>.gguf, <name> being the source's name without its quantisation suffix."""
    name = f"{_QUANT_SUFFIX.sub('', src.stem)}-{fmt.lower()}"
    return models_dir / name / f"{name}.gguf"


def fingerprint(path: Path) -> dict:
    """What identifies a GGUF file cheaply: name, size, sha256 of its first and last MiB (the header with every
    tensor's name, type and offset, and the last tensor's data)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        h.update(f.read(_FINGERPRINT_BYTES))
    return {"name": path.name, "size": size, "head_tail_sha256": h.hexdigest()}


def sidecar(copy: Path) -> Path:
    return copy.with_name(copy.name + SIDECAR_SUFFIX)


def write_sidecar(copy: Path, src: Path, fmt: str) -> None:
    record = {"source": fingerprint(src), "format": fmt, "made_by": "python -m modelpack requantize"}
    sidecar(copy).write_text(json.dumps(record, indent=1), encoding="utf-8")


def made_from(copy: Path, src: Path) -> bool:
    """True when the sidecar of the re-quantised `copy` says it was made from this very `src` file."""
    try:
        record = json.loads(sidecar(copy).read_text(encoding="utf-8"))
        return record.get("source") == fingerprint(src)
    except (OSError, ValueError, AttributeError):
        return False
