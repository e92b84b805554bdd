"""llm.cpu_prefill: prompts read by transformers (bf16), answers written by llama.cpp.

On a CPU the two halves of an answer favour different engines. Reading the prompt (prefill) is matrix-matrix work:
torch's oneDNN bf16 kernels on AVX-512 BF16 / AMX read a 1,000-token prompt 1.5-2x faster than llama.cpp's best
file (docs/benchmarks.md §8c-§8g). Writing the answer (decode) reads every weight once per token: llama.cpp's
4-bit file writes 5-6x faster than transformers' bf16 weights. So when the model's transformers folder sits beside
its GGUF (the demo pack has both), this module reads the prompt with transformers and hands the keys and values to
llama.cpp, which then answers from them as if it had read the prompt itself.

The hand-over is llama.cpp's own sequence-state format (llama_state_seq_get_data / set_data). Its layout is not
assumed: at load, llama.cpp reads a short probe text and this module parses the state llama.cpp wrote for it
(header, per-cell positions, per-layer key rows, value rows or columns, element types) and writes states the same
way. The same probe, read by transformers, must give the same keys and values (cosine per layer); a GGUF and a
folder of different models, an unsupported cache type or layout, or a model class with another cache leave the
feature off with a note, and llama.cpp reads prompts itself. Only the prompt's last token is left to llama.cpp, so
the first answer token is sampled from llama.cpp's own logits with its own sampler.

When llama.cpp already holds the start of the prompt (the previous question's system text, llm.prompt_cache_mb),
those keys and values go the other way first, into transformers' cache, so only the rest is read.
"""
from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GGML_TYPE_F16 = 1
MIN_TOKENS = 64             # shorter remainders: llama.cpp reads them itself (no hand-over cost)
CHUNK = 512                 # prefill step: bounded attention memory, stop checked between steps
PROBE_TEXT = "知问：公司文档问答。The quick brown fox 2026 年 12 月。"
MIN_COSINE = 0.95           # per-layer mean cosine of the probe's keys/values between the two engines


_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])   # a cell's metadata in a state


def shared_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def worst_cosine(ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray], rows: int | None = None) -> float:
    """The lowest per-layer mean cosine between two lists of key/value arrays ([tokens, width]), first `rows`."""
    worst = 1.0
    for x, y in zip(ours, theirs, strict=True):
        a, b = x[:rows].astype(np.float32), y[:rows].astype(np.float32)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-9)
        worst = min(worst, float(cos.mean()))
    return worst


class StateFormatError(ValueError):
    """A llama.cpp sequence state this module cannot read or write."""


@dataclass(frozen=True)
class StateLayout:
    """How this llama.cpp build writes a one-sequence KV state (learned from a real state, see parse_state)."""

    header: bytes           # magic + sequence id + number of streams (12 bytes)
    n_layer: int
    k_width: int            # key elements per token and layer (kv heads x head dim)
    v_width: int
    v_trans: bool           # values stored per element across tokens (llama.cpp without flash attention)


@dataclass
class KVState:
    positions: np.ndarray   # int32 [cells]
    keys: list[np.ndarray]  # per layer float16 [cells, k_width]
    values: list[np.ndarray]


def _take(data: memoryview, off: int, fmt: str) -> tuple[tuple[Any, ...], int]:
    size = struct.calcsize(fmt)
    if off + size > len(data):
        raise StateFormatError("state ends early")
    return struct.unpack_from(fmt, data, off), off + size


def parse_state(data: bytes, n_layer: int) -> tuple[StateLayout, KVState]:
    """Read a llama.cpp sequence state of one sequence, one stream, f16 keys and values (llama-kv-cache.cpp
    state_write). Raises StateFormatError for anything else, or when the bytes are not consumed exactly."""
    view = memoryview(data)
    (magic, seq, n_stream), off = _take(view, 0, "<IiI")
    if n_stream != 1:
        raise StateFormatError(f"{n_stream} KV streams (only one is handled)")
    (cells,), off = _take(view, off, "<I")
    if cells == 0:
        raise StateFormatError("empty state")
    meta = np.frombuffer(data, dtype=_CELL, count=cells, offset=off)
    if not (meta["n_seq"] == 1).all():
        raise StateFormatError("cells of several sequences, or cells with extra data (M-RoPE ...)")
    off += meta.nbytes
    (v_trans, layers), off = _take(view, off, "<II")
    if v_trans not in (0, 1) or layers != n_layer:
        raise StateFormatError(f"unexpected layout (v_trans {v_trans}, {layers} layers, expected {n_layer})")
    keys, values = [], []
    k_width = v_width = 0
    for _ in range(layers):
        (k_type, row), off = _take(view, off, "<iQ")
        if k_type != GGML_TYPE_F16:
            raise StateFormatError(f"key cache type {k_type} (only f16, llama.cpp's default, is handled)")
        k_width = row // 2
        keys.append(np.frombuffer(data, dtype=np.float16, count=cells * k_width, offset=off).reshape(cells, k_width))
        off += cells * row
    for _ in range(layers):
        if v_trans:
            (v_type, el, width), off = _take(view, off, "<iII")
            if v_type != GGML_TYPE_F16 or el != 2:
                raise StateFormatError(f"value cache type {v_type} (only f16 is handled)")
            v_width = width
            cols = np.frombuffer(data, dtype=np.float16, count=cells * width, offset=off).reshape(width, cells)
            values.append(cols.T)
            off += cells * width * 2
        else:
            (v_type, row), off = _take(view, off, "<iQ")
            if v_type != GGML_TYPE_F16:
                raise StateFormatError(f"value cache type {v_type} (only f16 is handled)")
            v_width = row // 2
            values.append(np.frombuffer(data, dtype=np.float16, count=cells * v_width, offset=off)
                          .reshape(cells, v_width))
            off += cells * row
    if off != len(data):
        raise StateFormatError(f"{len(data) - off} bytes left after the last layer")
    layout = StateLayout(header=struct.pack("<IiI", magic, seq, n_stream), n_layer=layers, k_width=k_width,
                         v_width=v_width, v_trans=bool(v_trans))
    return layout, KVState(positions=meta["pos"].astype(np.int32), keys=keys, values=values)


def build_state(layout: StateLayout, keys: list[np.ndarray], values: list[np.ndarray]) -> bytes:
    """A state in `layout` for cells at positions 0..n-1 of sequence 0 (keys/values: per layer [n, width])."""
    n = keys[0].shape[0]
    meta = np.zeros(n, dtype=_CELL)
    meta["pos"] = np.arange(n, dtype=np.int32)
    meta["n_seq"] = 1
    parts = [layout.header, struct.pack("<I", n), meta.tobytes(), struct.pack("<II", int(layout.v_trans),
                                                                               layout.n_layer)]
    for k in keys:
        parts += [struct.pack("<iQ", GGML_TYPE_F16, layout.k_width * 2), np.ascontiguousarray(k, np.float16).tobytes()]
    for v in values:
        if layout.v_trans:
            parts += [struct.pack("<iII", GGML_TYPE_F16, 2, layout.v_width),
                      np.ascontiguousarray(v.T, np.float16).tobytes()]
        else:
            parts += [struct.pack("<iQ", GGML_TYPE_F16, layout.v_width * 2),
                      np.ascontiguousarray(v, np.float16).tobytes()]
    return b"".join(parts)


# --- llama.cpp side -----------------------------------------------------------------------------------------------
def get_state(llama: Any) -> bytes:
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llama._ctx.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llama._ctx.ctx, buf, size, 0)
    if written <= 0:
        raise StateFormatError("llama.cpp wrote no state")
    return bytes(buf)[:written]


def clear(llama: Any) -> None:
    """Empty llama.cpp's KV cache and llama-cpp-python's record of it."""
    import llama_cpp

    llama.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama._ctx.ctx), True)


def set_state(llama: Any, data: bytes, tokens: list[int]) -> None:
    """Replace llama.cpp's KV cache by `data` (the keys/values of `tokens`); llama-cpp-python's generate() then
    sees `tokens` as already read."""
    import llama_cpp

    clear(llama)
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(data), 0) != len(data):
        clear(llama)
        raise StateFormatError("llama.cpp did not accept the state")
    llama.input_ids[:len(tokens)] = tokens
    llama.n_tokens = len(tokens)
    llama._requires_eval = True


# --- transformers side --------------------------------------------------------------------------------------------
def transformers_folder(gguf_folder: Path) -> Path | None:
    """The transformers weights of the same model beside the GGUF (config.json + safetensors), if any."""
    if (gguf_folder / "config.json").is_file() and any(gguf_folder.glob("*.safetensors")):
        return gguf_folder
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def cpu_reads_bf16_fast(flags: set[str]) -> bool:
    """oneDNN's bf16 matrix kernels need AVX-512 BF16 or AMX; elsewhere bf16 is emulated and slower than llama.cpp."""
    return bool({"avx512_bf16", "amx_bf16"} & flags)


class TransformersPrefill:
    """The transformers model (bf16, base model without the LM head) that reads prompts for a llama.cpp model."""

    def __init__(self, model: Any, layout: StateLayout, folder: Path, threads: int, head_dim: int):
        self.model = model
        self.layout = layout
        self.head_dim = head_dim
        self.folder = folder
        self.threads = threads
        self.tokens_read = 0            # counters for logs and benchmarks
        self.seconds = 0.0
        self.fallbacks = 0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, llama: Any, dims: dict[str, int], threads: int) -> TransformersPrefill:
        """Load the folder's weights in bf16 and check, on a probe text, that they are the GGUF's model and that
        this llama.cpp writes states this module understands. Raises ValueError/StateFormatError with the reason."""
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        n_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if (config.num_hidden_layers, n_kv, head_dim) != (dims["layers"], dims["kv_heads"], dims["head_dim"]):
            raise ValueError(f"{folder.name}'s config ({config.num_hidden_layers} layers, {n_kv} KV heads of "
                             f"{head_dim}) is not the GGUF's ({dims['layers']}, {dims['kv_heads']} of "
                             f"{dims['head_dim']})")
        if layer_types != {"full_attention"}:
            raise ValueError(f"{folder.name} has {sorted(layer_types)} layers (only full attention is handed over)")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()       # its load report lists the LM head this base model does not need
        try:
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16, config=config)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.eval()
        probe = llama.tokenize(PROBE_TEXT.encode("utf-8"), add_bos=False, special=False)
        llama.reset()
        llama.eval(probe)
        try:
            layout, theirs = parse_state(get_state(llama), dims["layers"])
        finally:
            clear(llama)
        if layout.k_width != n_kv * head_dim or layout.v_width != n_kv * head_dim:
            raise StateFormatError(f"llama.cpp's cache rows ({layout.k_width}/{layout.v_width}) are not "
                                   f"{n_kv} x {head_dim}")
        self = cls(model, layout, folder, threads, head_dim)
        keys, values = self._forward(probe, None)
        worst = worst_cosine([*keys, *values], [*theirs.keys, *theirs.values])
        if worst < MIN_COSINE:
            raise ValueError(f"{folder.name}'s weights do not give the GGUF's keys and values (cosine {worst:.2f} "
                             f"on a probe text): not the same model")
        log.info("transformers reads prompts for llama.cpp: %s, probe cosine %.4f", folder, worst)
        return self

    def _forward(self, tokens: list[int], past: KVState | None,
                 stop: threading.Event | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Keys/values (per layer float16 [n, width]) of past + tokens, reading `tokens` in CHUNK steps."""
        import torch
        from transformers import DynamicCache

        k_width, v_width = self.layout.k_width, self.layout.v_width
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            if past is not None and len(past.positions):
                for i, (k, v) in enumerate(zip(past.keys, past.values, strict=True)):
                    kt = torch.from_numpy(np.ascontiguousarray(k)).to(torch.bfloat16)
                    vt = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                    shape = (1, kt.shape[0], -1, self.head_dim)
                    cache.update(kt.view(shape).transpose(1, 2), vt.view(shape).transpose(1, 2), i)
            for start in range(0, len(tokens), CHUNK):
                if stop is not None and stop.is_set():
                    raise InterruptedError
                ids = torch.tensor([tokens[start:start + CHUNK]], dtype=torch.long)
                self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            keys = [layer.keys[0].transpose(0, 1).reshape(-1, k_width).to(torch.float16).numpy()
                    for layer in cache.layers]
            values = [layer.values[0].transpose(0, 1).reshape(-1, v_width).to(torch.float16).numpy()
                      for layer in cache.layers]
        return keys, values

    def read(self, llama: Any, tokens: list[int], stop: threading.Event | None = None) -> int:
        """Read all prompt tokens but the last into llama.cpp's cache; returns how many transformers read (0: left to
        llama.cpp — a short remainder, or a failure, which is logged and counted, never raised)."""
        import torch

        target = len(tokens) - 1
        have = shared_start(llama.input_ids[:llama.n_tokens].tolist(), tokens[:target])
        if target - have < MIN_TOKENS:
            return 0
        started = time.perf_counter()
        threads = torch.get_num_threads()
        try:
            with self._lock:
                torch.set_num_threads(self.threads)
                past = None
                if have:
                    _, state = parse_state(get_state(llama), self.layout.n_layer)
                    order = np.argsort(state.positions)
                    if not np.array_equal(state.positions[order][:have], np.arange(have)):
                        raise StateFormatError("llama.cpp's cells are not the prompt's positions")
                    keep = order[:have]
                    past = KVState(state.positions[keep], [k[keep] for k in state.keys],
                                   [v[keep] for v in state.values])
                keys, values = self._forward(tokens[have:target], past, stop)
                set_state(llama, build_state(self.layout, keys, values), tokens[:target])
        except InterruptedError:
            clear(llama)
            return 0
        except Exception as e:  # noqa: BLE001 - llama.cpp reads the prompt itself; the answer must not fail for this
            self.fallbacks += 1
            log.warning("transformers could not read the prompt for llama.cpp (%s: %s); llama.cpp reads it",
                        type(e).__name__, e)
            clear(llama)
            return 0
        finally:
            torch.set_num_threads(threads)
        self.tokens_read += target - have
        self.seconds += time.perf_counter() - started
        return target - have

    def close(self) -> None:
        self.model = None
