"""A GGUF file run by llama.cpp (llama-cpp-python): the fast engine for CPU-only servers.

    llm.backend: llamacpp        (or auto: a .gguf model goes here)
    llm.model: qwen2.5-coder-1.5b-instruct      a folder holding one .gguf file (the demo pack links its GGUF there)
    llm.model: /data/glm-4-9b-chat-Q4_K_M.gguf  or the file itself (chatglm / glm4 / qwen2 / llama ... architectures)

The chat template comes from the file's `tokenizer.chat_template` metadata; only a file without one gets a named
fallback format (chosen by architecture), and ModelInfo.notes says so. The prompt is tokenized piece by piece:
template text with special tokens, message contents without, so a document containing "<|im_start|>" cannot forge a
turn of the conversation (the transformers path's sanitize_control_tokens does the same).

One llama.cpp context serves one generation at a time (a lock; a queued caller's stop event is honoured while it
waits). llama.cpp keeps the KV cache of the previous prompt, so a prompt that starts like the last one (the same
system text and template) skips that part of the prefill.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.cpu import cpu_flags
from common.gguf_copy import AMX_FORMAT, cpu_copy_format
from llm.locate import cpu_copy_for, resolve_model_path
from llm.openmp import configure_openmp_waits
from llm.planner import MemoryPlan, plan_gguf_memory
from llm.prefill import cpu_reads_bf16_fast, folder_bytes, shared_start, transformers_folder
from llm.types import (
    BackendUnavailableError,
    ChatModel,
    ContextTooLongError,
    GenerationParams,
    InsufficientMemoryError,
    LLMError,
    ModelInfo,
    normalize_messages,
)

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"           # the version scripts/setup.sh builds (requirements.txt pins it)
INSTALL_HINT = (f"run `bash scripts/setup.sh` (it builds llama-cpp-python=={LLAMA_CPP_VERSION} once, about 7–15 "
                f"minutes on 2 cores, and caches the wheel in ~/.cache/zhiwen/wheels), or set "
                f"llm.backend: transformers")

# llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers (general.file_type) -> the names people know from file names.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 28: "IQ4_XS", 32: "BF16"}

# Named chat formats for GGUF files that carry no template (Jinja, the same variables as a tokenizer's template).
FALLBACK_TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "chatglm3": ("[gMASK]sop{% for m in messages %}<|{{ m.role }}|>\n {{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
    "glm4": ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
FALLBACK_BY_ARCH = {"chatglm": "chatglm3", "glm4": "glm4", "qwen2": "chatml", "qwen3": "chatml"}

# Special-token-looking text inside message contents, removed only when a template rewrites contents so that they
# cannot be tokenized apart from the template (see _render_pieces).
_CONTROL_TEXT = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|\[gMASK\]|<sop>|<eop>|</s>|<s>")


# --- llama.cpp's log: kept, so a failed load can say what llama.cpp said ------------------------------------------
_LOG_LINES: deque[str] = deque(maxlen=400)
_LOG_LOCK = threading.Lock()
_log_callback: Any = None              # the ctypes callback must stay referenced for as long as llama.cpp may call it


def _install_log_capture(llama_cpp: Any) -> None:
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 1:                 # GGML_LOG_LEVEL_DEBUG (one line per repacked tensor...): not kept
            return
        line = text.decode("utf-8", errors="replace")
        with _LOG_LOCK:
            _LOG_LINES.append(line)
        if level == 4:                 # GGML_LOG_LEVEL_ERROR (3 is WARN, 2 INFO, 5 a continued line)
            log.warning("llama.cpp: %s", line.rstrip())

    _log_callback = on_log
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))


def _recent_log(since: int) -> str:
    with _LOG_LOCK:
        lines = list(_LOG_LINES)[since:] if since < len(_LOG_LINES) else []
    return "".join(lines)


def _log_mark() -> int:
    with _LOG_LOCK:
        _LOG_LINES.clear()
    return 0


def import_llama_cpp() -> Any:
    configure_openmp_waits()           # short spin, then sleep (llm/openmp.py); no-op when already set
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendUnavailableError(
            f"llm.backend is 'llamacpp' (or auto chose it for a GGUF model) but the llama-cpp-python package is not "
            f"installed ({e}); {INSTALL_HINT}.") from None
    _install_log_capture(llama_cpp)
    return llama_cpp


# --- the file -----------------------------------------------------------------------------------------------------
def find_gguf(path: Path) -> Path:
    """The .gguf file that `path` names: the file itself, or the only .gguf in a folder (first shard of a split)."""
    if path.is_file():
        return path
    ggufs = sorted(p for p in path.glob("*.gguf") if not re.search(r"-0000[2-9]-of-|-000[1-9]\d-of-", p.name))
    if not ggufs:
        raise LLMError(f"model folder {path} holds no .gguf file, so llama.cpp cannot load it; point llm.model at a "
                       f"GGUF file (or its folder), or set llm.backend: transformers for a transformers folder")
    if len(ggufs) > 1:
        raise LLMError(f"model folder {path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); set "
                       f"llm.model to the path of the one to use")
    return ggufs[0]


def check_gguf_file(path: Path) -> None:
    """A clear sentence for a file that is not a GGUF model at all (before llama.cpp reads it)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LLMError(f"cannot read the model file {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise LLMError(f"{path} is not a GGUF model file (it does not start with the GGUF signature); it may be "
                       f"damaged, or another format — llm.backend: llamacpp needs a .gguf file")


def explain_load_failure(path: Path, llama_log: str, size: int) -> str:
    """One sentence from what llama.cpp logged while failing to load `path`."""
    unknown = re.search(r"unknown model architecture: '([^']*)'", llama_log)
    if unknown:
        return (f"{path.name} is a model of architecture '{unknown.group(1)}', which the installed llama.cpp "
                f"(llama-cpp-python {LLAMA_CPP_VERSION}) does not know; convert the model with a llama.cpp that "
                f"supports it, or use llm.backend: transformers with the model's original folder")
    if re.search(r"not within the file bounds|unexpectedly reached end of file|failed to read|truncat", llama_log):
        return (f"{path} is incomplete ({size:,} bytes: its tensors run past the end of the file); the copy or "
                f"download was probably interrupted — copy the file again")
    if "missing tensor" in llama_log or "wrong shape" in llama_log or "tensor" in llama_log and "error" in llama_log:
        detail = next((ln.strip() for ln in llama_log.splitlines() if "tensor" in ln), "")
        return f"{path} is damaged or was converted wrongly ({detail}); convert or copy it again"
    last = next((ln.strip() for ln in reversed(llama_log.splitlines()) if "error" in ln.lower() or "failed" in ln),
                "no details")
    return f"llama.cpp could not load {path} ({last}); check that it is a complete GGUF model file"


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's vector units and slow llama.cpp)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
        logical = psutil.cpu_count(logical=True) or usable
        physical = max(1, min(physical, round(usable * physical / logical)))
    except AttributeError:             # not on Linux
        pass
    return physical


def cpu_has_amx() -> bool:
    return "amx_tile" in cpu_flags()


def amx_kernels_safe(llama_cpp: Any) -> bool:
    """Whether this llama.cpp build can run its AMX kernels (and so its extra weight buffers) on an AMX CPU.

    Two faults kill the process (SIGSEGV / SIGILL inside llama_decode) with a stock build:
    1. GCC before 13.2 compiles llama.cpp's AMX tile set-up wrongly (scripts/llama_cpp_amx_fix.h says how);
    2. llama.cpp loads the AMX tile configuration once per thread (ggml-cpu/amx/mmq.cpp, ggml_tile_config_init) and
       never again; in this process torch's oneDNN runs its own AMX kernels (the bf16 e5 embedder) on the same
       threads and releases or replaces that configuration afterwards, so llama.cpp's next prompt executes tile
       instructions on an unconfigured unit (SIGILL).
    scripts/setup.sh patches both and marks the build with the symbol zhiwen_amx_tile_reload; any other build keeps
    its AMX kernels unused on AMX CPUs."""
    return hasattr(llama_cpp.llama_cpp._lib, "zhiwen_amx_tile_reload")


def extra_buffers_wanted(llama_cpp: Any) -> bool:
    """llama.cpp's extra weight buffers (AMX tiles on AMX CPUs, repacked Q4/IQ4 blocks for AVX2/AVX-512 elsewhere)
    make prompt processing faster; they stay off only where they would crash (amx_kernels_safe)."""
    return not cpu_has_amx() or amx_kernels_safe(llama_cpp)


_PARAMS_LOCK = threading.Lock()


def open_llama(llama_cpp: Any, path: Path, *, extra_buffers: bool, **kwargs: Any) -> Any:
    """llama_cpp.Llama(path, **kwargs), optionally without llama.cpp's extra weight buffers (use_extra_bufts).

    llama-cpp-python exposes no argument for this model parameter, so the default-parameter factory is wrapped while
    the model loads (under a lock). See extra_buffers_wanted for when they are off."""
    if extra_buffers:
        return llama_cpp.Llama(str(path), **kwargs)
    module = llama_cpp.llama_cpp
    with _PARAMS_LOCK:
        original = module.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        module.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        finally:
            module.llama_model_default_params = original


_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=\s*([\d.]+) MiB")


def weight_buffers(llama_log: str) -> dict[str, float]:
    """{buffer type: MiB} of the loaded weights, from llama.cpp's load log: "AMX" (AMX tile layout), "CPU_REPACK"
    (interleaved blocks for AVX2/AVX-512 kernels), "CPU_Mapped" (the file as it is, memory-mapped), "CUDA0" ..."""
    out: dict[str, float] = {}
    for name, mib in _BUFFER_LINE.findall(llama_log):
        out[name] = out.get(name, 0.0) + float(mib)
    return out


def _int(meta: dict[str, str], key: str, default: int = 0) -> int:
    try:
        return int(float(meta.get(key, default)))
    except ValueError:
        return default


def gguf_dims(meta: dict[str, str], n_vocab: int) -> dict[str, int]:
    """The shapes the memory planner needs, from llama.cpp's metadata dictionary of the file."""
    arch = meta.get("general.architecture", "")
    hidden = _int(meta, f"{arch}.embedding_length")
    heads = _int(meta, f"{arch}.attention.head_count", 1) or 1
    kv_heads = _int(meta, f"{arch}.attention.head_count_kv", heads) or heads
    head_dim = _int(meta, f"{arch}.attention.key_length", hidden // heads if heads else 0)
    return {"layers": _int(meta, f"{arch}.block_count"), "hidden": hidden, "kv_heads": kv_heads,
            "head_dim": head_dim, "ff": _int(meta, f"{arch}.feed_forward_length", 4 * hidden),
            "vocab": n_vocab, "context_train": _int(meta, f"{arch}.context_length")}


# --- the model ----------------------------------------------------------------------------------------------------
class PromptStates:
    """llm.prompt_cache_mb: the KV cache of recent prompts, kept in RAM, least recently used out first.

    llama.cpp keeps one KV cache, so only a prompt that starts like the one just before it skips reading the shared
    part. This keeps the KV state of the last prompts (`llama_state_seq_get_data`: the tokens' keys and values, about
    29 KB a token for Qwen2.5-1.5B or ChatGLM3-6B) and, before a new prompt, brings back the one that shares the
    longest start with it when that saves at least `min_gain` tokens of reading over what is loaded now; llama-cpp-
    python's generate() then reads only the rest and decodes the last prompt token again before sampling, so the
    answer is the same as from an empty cache. Not llama-cpp-python's LlamaRAMCache: its states also copy the
    logits buffer (n_batch × vocabulary floats, 311 MB for a 152k vocabulary) that its capacity does not count."""

    def __init__(self, capacity_bytes: int, min_gain: int = 64):
        from collections import OrderedDict

        self.capacity_bytes = capacity_bytes
        self.min_gain = min_gain
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.hits = 0

    @property
    def size_bytes(self) -> int:
        return sum(len(v) + 4 * len(k) for k, v in self._states.items())

    def restore(self, llama: Any, tokens: Sequence[int]) -> int:
        """Load the kept state that shares the longest start with `tokens` when it beats the live cache by
        min_gain tokens; returns how many prompt tokens it brings back (0: nothing loaded)."""
        import llama_cpp

        if not self._states:
            return 0
        live = shared_start(llama.input_ids[:llama.n_tokens].tolist(), tokens)
        key, shared = max(((k, shared_start(k, tokens)) for k in self._states), key=lambda kv: kv[1])
        if shared - live < self.min_gain:
            return 0
        data = self._states[key]
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(data), 0) != len(data):
            llama.reset()                     # a state that does not load: read the prompt from the start
            del self._states[key]
            return 0
        llama.input_ids[:len(key)] = key
        llama.n_tokens = len(key)
        llama._requires_eval = True           # restored, not decoded: generate() decodes again before sampling
        self._states.move_to_end(key)
        self.hits += 1
        return shared

    def save(self, llama: Any) -> None:
        """Keep the live KV state (the prompt and the answer read so far) under its tokens."""
        import llama_cpp

        n = llama.n_tokens
        if n <= self.min_gain:
            return
        key = tuple(llama.input_ids[:n].tolist())
        size = llama_cpp.llama_state_seq_get_size(llama._ctx.ctx, 0)
        if size <= 0 or size + 4 * n > self.capacity_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llama._ctx.ctx, buf, size, 0)
        if written <= 0:
            return
        self._states.pop(key, None)
        for k in [k for k in self._states if key[:len(k)] == k]:     # a state this one extends adds nothing
            del self._states[k]
        self._states[key] = bytes(buf)[:written]
        while self.size_bytes > self.capacity_bytes:
            self._states.popitem(last=False)

    def clear(self) -> None:
        self._states.clear()


class LlamaCppChatModel(ChatModel):
    """A loaded GGUF model. stream() calls are served one at a time (one llama.cpp context)."""

    def __init__(self, llama: Any, info: ModelInfo, default_params: GenerationParams, template: str,
                 plan: MemoryPlan | None = None, prompt_states: PromptStates | None = None):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.llama = llama
        self.info = info
        self.default_params = default_params
        self.plan = plan
        self.prompt_states = prompt_states       # llm.prompt_cache_mb; None = off
        self.prefill: Any = None                 # llm.cpu_prefill: llm.prefill.TransformersPrefill, None = off
        self.template_source = template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message: str) -> None:
            raise LLMError(f"the model's chat template refused the conversation: {message}")

        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        self._special = {"bos_token": self._token_text(llama.token_bos()),
                         "eos_token": self._token_text(llama.token_eos())}
        self._lock = threading.Lock()
        self.weight_buffers: dict[str, float] = {}   # {llama.cpp buffer type: MiB} of the weights (weight_buffers)

    def _token_text(self, token: int) -> str:
        if token is None or token < 0:
            return ""
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    # -- prompt side --
    def _render(self, msgs: list[dict[str, str]]) -> str:
        return self.template.render(messages=msgs, add_generation_prompt=True, **self._special)

    def _render_pieces(self, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_template) pieces: message contents are marked so they are tokenized
        without special-token parsing. A template that rewrites contents (so the marks are lost) is rendered with
        special-token text removed from the contents instead."""
        marks = [f"\x00ZW{i}\x00" for i in range(len(msgs))]
        marked = self._render([{**m, "content": mark} for m, mark in zip(msgs, marks, strict=True)])
        if all(marked.count(mark) == 1 for mark in marks):
            pieces: list[tuple[str, bool]] = []
            rest = marked
            for m, mark in zip(msgs, marks, strict=True):
                before, rest = rest.split(mark, 1)
                pieces += [(before, True), (m["content"], False)]
            return [*pieces, (rest, True)]
        cleaned = [{**m, "content": _CONTROL_TEXT.sub("", m["content"])} for m in msgs]
        return [(self._render(cleaned), True)]

    def encode_messages(self, messages: Sequence[Any]) -> list[int]:
        tokens: list[int] = []
        for text, is_template in self._render_pieces(normalize_messages(messages)):
            if text:
                tokens += self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=is_template)
        return tokens

    def render_prompt(self, messages: Sequence[Any]) -> str:
        """The exact prompt text the model sees (for logs and tests)."""
        return self.llama.detokenize(self.encode_messages(messages), special=True).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

    def count_prompt_tokens(self, messages: Sequence[Any]) -> int:
        return len(self.encode_messages(messages))

    # -- generation --
    def stream(self, messages: Sequence[Any], params: GenerationParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        params = params or self.default_params
        tokens = self.encode_messages(messages)
        room = self.info.max_context_tokens - len(tokens)
        if room <= 0:
            raise ContextTooLongError(
                f"the prompt has {len(tokens)} tokens, which fills llm.max_context_tokens="
                f"{self.info.max_context_tokens}; lower prompt.context_tokens or prompt.history_turns, or raise "
                f"llm.max_context_tokens")
        return self._generate(tokens, params, min(params.max_new_tokens, room), stop_event)

    def _generate(self, tokens: list[int], params: GenerationParams, max_new: int,
                  stop_event: threading.Event | None) -> Iterator[str]:
        stop = stop_event or threading.Event()
        while not self._lock.acquire(timeout=0.1):   # another answer is being generated: wait, unless stopped
            if stop.is_set():
                return
        try:
            if stop.is_set():
                return
            greedy = params.temperature <= 0
            if self.prompt_states is not None:
                self.prompt_states.restore(self.llama, tokens)
            if self.prefill is not None:
                self.prefill.read(self.llama, tokens, stop)
                if stop.is_set():
                    return
            chunks = self.llama.create_completion(
                tokens, max_tokens=max_new, stream=True, temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else 50, min_p=0.0,
                repeat_penalty=params.repetition_penalty,
                stopping_criteria=self._stop_criteria(stop),
            )
            try:
                for chunk in chunks:
                    text = chunk["choices"][0]["text"]
                    if text:
                        yield text
                    if stop.is_set():
                        break
            except ValueError as e:        # llama-cpp-python's own checks (context window)
                raise LLMError(f"llama.cpp refused the prompt: {e}") from None
            finally:
                chunks.close()
                if self.prompt_states is not None:
                    self.prompt_states.save(self.llama)
        finally:
            self._lock.release()

    @staticmethod
    def _stop_criteria(stop: threading.Event) -> Any:
        from llama_cpp import StoppingCriteriaList

        return StoppingCriteriaList([lambda _ids, _logits: stop.is_set()])   # checked after every token

    def close(self) -> None:
        if self.prefill is not None:
            self.prefill.close()
        self.llama.close()


def _template_for(meta: dict[str, str], path: Path) -> tuple[str, str]:
    """(template, note): the file's own template, or a named fallback and a note saying so."""
    own = meta.get("tokenizer.chat_template")
    if own:
        return own, ""
    arch = meta.get("general.architecture", "?")
    name = FALLBACK_BY_ARCH.get(arch, "chatml")
    note = (f"{path.name} carries no chat template (tokenizer.chat_template), so the named format '{name}' is used "
            f"for architecture '{arch}'; if answers look malformed, convert the model again with its template. / "
            f"该 GGUF 文件没有对话模板，改用内置格式 {name}。")
    return FALLBACK_TEMPLATES[name], note


def load_llamacpp_model(settings: Any) -> LlamaCppChatModel:
    """Resolve the GGUF (demo fallback), plan memory for the window, then load it with llama.cpp."""
    llm = settings.llm
    if llm.adapter:
        raise LLMError(f"llm.adapter={llm.adapter!r} is applied by the transformers backend only; for a GGUF model "
                       f"convert the adapter with llama.cpp (or merge it first), or set llm.backend: transformers")
    path, is_demo, notice = resolve_model_path(settings)
    gguf = find_gguf(path)
    check_gguf_file(gguf)
    llama_cpp = import_llama_cpp()
    threads = llm.threads or physical_cores()
    size = gguf.stat().st_size

    # 1. the vocabulary and metadata only (fast): architecture, shapes, template; fails early on unknown files
    mark = _log_mark()
    try:
        vocab = llama_cpp.Llama(str(gguf), vocab_only=True, n_ctx=16, verbose=False)
    except (ValueError, RuntimeError, OSError):
        raise LLMError(explain_load_failure(gguf, _recent_log(mark), size)) from None
    meta, n_vocab = dict(vocab.metadata), vocab.n_vocab()
    n_params = int(llama_cpp.llama_model_n_params(vocab.model))     # the tensor directory is read even vocab-only
    vocab.close()
    dims = gguf_dims(meta, n_vocab)
    context = min(llm.max_context_tokens, dims["context_train"]) if dims["context_train"] else llm.max_context_tokens
    file_type = FILE_TYPES.get(_int(meta, "general.file_type", -1), "gguf")
    import psutil
    cache_bytes = llm.prompt_cache_mb * 2**20
    prefill_folder, prefill_bytes, prefill_note = _prefill_folder(llm, path, gguf, dims, size, context, file_type,
                                                                  cache_bytes)

    copy, copy_note, why = None, "", ""   # llm.use_cpu_copy: the file's copy in this CPU's fastest format
    fmt = None
    if llm.use_cpu_copy and llm.n_gpu_layers == 0:
        fmt, why = cpu_copy_format(cpu_flags(), n_params)
        if prefill_folder is not None and fmt != AMX_FORMAT:
            fmt = None       # the BF16 copy reads prompts faster but writes answers slower: transformers reads them
        if fmt is not None and fmt != file_type and (fmt != AMX_FORMAT or amx_kernels_safe(llama_cpp)):
            copy, copy_note = cpu_copy_for(gguf, fmt, settings.models_dir)

    cache_bytes += prefill_bytes
    plan = plan_gguf_memory(dims, size, context, file_type, psutil.virtual_memory().available, cache_bytes)
    log.info("memory plan: %s", plan.summary())
    if copy is not None:       # the copy (same model, same metadata) when it fits too; it is the larger file
        copy_plan = plan_gguf_memory(dims, copy.stat().st_size, context, fmt, psutil.virtual_memory().available,
                                     cache_bytes)
        if copy_plan.fits:
            log.info("%s: answering from the %s copy %s of %s (llm.use_cpu_copy); memory plan: %s",
                     why, fmt, copy, gguf.name, copy_plan.summary())
            gguf, size, file_type, plan = copy, copy.stat().st_size, fmt, copy_plan
        else:
            copy_note = (f"the {fmt} copy {copy.name} does not fit the free memory ({copy_plan.summary()}), so the "
                         f"engine answers from {gguf.name}")
    if not plan.fits:
        raise InsufficientMemoryError(f"model file {gguf}: {plan.advice}")

    # 2. the weights (memory-mapped) and a context of llm.max_context_tokens
    mark = _log_mark()
    try:
        llama = open_llama(llama_cpp, gguf, extra_buffers=extra_buffers_wanted(llama_cpp), n_ctx=context,
                           n_batch=512, n_threads=threads, n_threads_batch=threads, n_gpu_layers=llm.n_gpu_layers,
                           verbose=False)
    except (ValueError, RuntimeError, OSError):
        raise LLMError(explain_load_failure(gguf, _recent_log(mark), size)) from None
    buffers = weight_buffers(_recent_log(mark))
    prefill = None
    if prefill_folder is not None:
        from llm.prefill import TransformersPrefill

        try:
            prefill = TransformersPrefill.load(prefill_folder, llama, dims, threads)
        except Exception as e:  # noqa: BLE001 - llama.cpp reads prompts itself; the reason is shown
            prefill_note = (f"llm.cpu_prefill: transformers cannot read prompts for this GGUF ({e}); llama.cpp "
                            f"reads them itself")

    template, template_note = _template_for(meta, gguf)
    notes = [n for n in (notice, copy_note, prefill_note, template_note) if n]
    for n in notes:
        log.warning(n)
    offload = llm.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
    if llm.n_gpu_layers != 0 and not offload:
        notes.append(f"llm.n_gpu_layers={llm.n_gpu_layers} is ignored: this llama-cpp-python build has no GPU "
                     f"support (build it with CMAKE_ARGS=-DGGML_CUDA=on); running on the CPU.")
    info = ModelInfo(
        name=gguf.stem if gguf.parent != path else path.name, backend="llamacpp",
        device="cuda" if offload else "cpu", quantization=file_type, dtype="", is_demo=is_demo,
        weights_path=str(gguf), max_context_tokens=context, notes=tuple(notes),
        context_tokens=0 if offload else llm.cpu_context_tokens,
        prefill="transformers bf16" if prefill is not None else "",
    )
    log.info("llama.cpp: %s, %d threads, context %d, weights in %s, %s", gguf.name, threads, context,
             ", ".join(f"{k} {v:.0f} MiB" for k, v in buffers.items()) or "?", meta.get("general.name", ""))
    model = LlamaCppChatModel(llama, info, GenerationParams.from_settings(llm), template, plan,
                              PromptStates(cache_bytes) if cache_bytes else None)
    model.weight_buffers = buffers
    model.prefill = prefill
    return model


PREFILL_ACTIVATION_BYTES = 512 * 2**20   # transformers reading one 512-token step (attention, FF intermediates)


def _prefill_folder(llm: Any, path: Path, gguf: Path, dims: dict[str, int], size: int, context: int,
                    file_type: str, cache_bytes: int) -> tuple[Path | None, int, str]:
    """llm.cpu_prefill: the transformers folder that will read prompts for this GGUF and the memory it needs, or
    (None, 0) and why not (a note only where the user asked for it, or where auto would have used it but memory is
    short)."""
    import psutil

    mode = llm.cpu_prefill
    if mode == "llamacpp" or llm.n_gpu_layers != 0:
        return None, 0, ""
    folder = transformers_folder(path if path.is_dir() else gguf.parent)
    if folder is None:
        return None, 0, ("" if mode == "auto" else
                         f"llm.cpu_prefill: transformers needs the model's transformers folder (config.json and "
                         f"*.safetensors) beside {gguf.name}; llama.cpp reads prompts itself")
    if mode == "auto" and not cpu_reads_bf16_fast(cpu_flags()):
        return None, 0, ""
    need = folder_bytes(folder) + PREFILL_ACTIVATION_BYTES
    plan = plan_gguf_memory(dims, size, context, file_type, psutil.virtual_memory().available, cache_bytes + need)
    if not plan.fits:
        return None, 0, (f"llm.cpu_prefill: not enough free memory for transformers to read prompts as well "
                         f"({need / 2**30:.1f} GiB more; {plan.summary()}); llama.cpp reads them itself")
    return folder, need, ""
