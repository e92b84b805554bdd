"""A local model folder run through transformers: GPU 4-bit/8-bit (bitsandbytes) or 16-bit, CPU bf16/fp32.

GLM models load through transformers' own classes (GlmForCausalLM for glm-4-9b-chat-hf / glm-edge,
Glm4ForCausalLM for GLM-4-0414) via AutoModelForCausalLM, like any other causal LM (the Qwen demo models).
Original chatglm3-6b folders carry their own modeling code and need llm.trust_remote_code: true.
Nothing is ever downloaded: HF_HUB_OFFLINE=1 and local_files_only=True on every from_pretrained.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.cpu import has_native_bf16
from llm.adapters import apply_adapter, check_combination, describe, prepare_base_config, read_adapter
from llm.locate import resolve_model_path
from llm.planner import MemoryPlan, plan_memory
from llm.streaming import stream_generate
from llm.types import (
    BackendUnavailableError,
    ChatModel,
    ChatTemplateMissingError,
    ContextTooLongError,
    GenerationOOMError,
    GenerationParams,
    InsufficientMemoryError,
    LLMError,
    ModelInfo,
    RemoteCodeRequiredError,
    normalize_messages,
)

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _offline() -> None:
    # Loading must never reach a model hub, even when a folder's config names a hub repo.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def configure_cuda_allocator() -> None:
    """Let PyTorch's CUDA caching allocator grow segments in place (expandable_segments) unless the user chose.

    Measured on an H100 with ChatGLM3-6B dimensions (docs/gpu.md): with fixed-size segments the bitsandbytes
    int8 path reserved up to 2 GiB more than it ever had allocated (fragmentation by its many odd-sized
    temporaries) — on a 6 GB card that is the difference between fitting and not. Only effective before the
    process's first CUDA allocation, which is why it runs before anything touches the GPU.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLMError(f"model folder {folder} has no config.json: point llm.model at a Hugging Face model folder "
                       f"(config.json, tokenizer files and *.safetensors)") from None
    except json.JSONDecodeError as e:
        raise LLMError(f"{path} is not valid JSON ({e}); the model folder looks damaged, copy it again") from None


def needs_remote_code(raw_config: dict[str, Any]) -> bool:
    """Original ChatGLM folders: model_type 'chatglm' or an auto_map pointing at modeling files in the folder."""
    return raw_config.get("model_type") == "chatglm" or bool(raw_config.get("auto_map"))


def check_remote_code(raw_config: dict[str, Any], folder: Path, trust_remote_code: bool) -> None:
    if needs_remote_code(raw_config) and not trust_remote_code:
        raise RemoteCodeRequiredError(
            f"model folder {folder} ships its own modeling code (config.json has "
            f"model_type={raw_config.get('model_type')!r} / auto_map), as original chatglm3-6b folders do. "
            f"If you trust the Python files in that folder, set llm.trust_remote_code: true in your config file "
            f"(or ZHIWEN_LLM__TRUST_REMOTE_CODE=true); or use a transformers-native GLM folder such as "
            f"glm-4-9b-chat-hf, which needs no remote code."
        )


def pick_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise LLMError("llm.device is 'cuda' but PyTorch sees no CUDA GPU here; set llm.device: auto or cpu "
                       "(or install a CUDA build of torch and the NVIDIA driver)")
    return "cpu"


def pick_dtype(requested: str, device: str, quantization: str = "none") -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    if device == "cuda":
        if quantization == "int8":
            # LLM.int8 kernels take fp16 inputs: bf16 activations would be cast (an extra copy) at every matmul.
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 only where the CPU computes it natively. Measured on a 2-core AVX2 machine with qwen2.5-1.5b: a 256-token
    # prefill took 21.6 CPU-s in fp32 and 85.1 in bf16 (emulated), and RAG prompts are long; fp32 costs 2x RAM.
    return torch.bfloat16 if has_native_bf16() else torch.float32




def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """BitsAndBytesConfig for nf4/int8 (bitsandbytes imported here: an optional package with an install hint)."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(
            f"llm.quantization is {quantization!r} but the bitsandbytes package is not installed; run "
            f"`pip install bitsandbytes==0.50.2` (needs an NVIDIA GPU), or set llm.quantization: none"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


class TransformersChatModel(ChatModel):
    """A loaded model + tokenizer. Thread-safe for concurrent stream() calls (each has its own stop event).

    On CUDA (llm.static_cache) every generation decodes into a static KV cache sized for the whole window
    (llm.max_context_tokens): fixed shapes, no per-token reallocation. Caches are pooled, one per generation running
    at once, so concurrent answers never share one. With llm.compile the decoding step (not the prefill, whose shape
    changes with every prompt) is compiled by torch.compile once per cache shape; a compile failure at load time turns
    it off with a note instead of failing.
    """

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, default_params: GenerationParams,
                 plan: MemoryPlan | None = None, *, static_cache: bool = False, compile_decoding: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.default_params = default_params
        self.plan = plan
        self.static_cache = static_cache
        self.compile_decoding = static_cache and compile_decoding
        self._free_caches: list[Any] = []
        self._cache_lock = threading.Lock()
        if self.compile_decoding:
            enable_compiled_decoding(model)

    # -- static KV caches --
    def _take_cache(self) -> Any:
        with self._cache_lock:
            cache = self._free_caches.pop() if self._free_caches else None
        if cache is None:
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=self.info.max_context_tokens)
        with torch.inference_mode():    # its tensors were made inside generate's inference mode
            cache.reset()
        return cache

    def _give_back(self, cache: Any) -> None:
        with self._cache_lock:
            self._free_caches.append(cache)

    # -- prompt side --
    def encode_messages(self, messages: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Token ids of the chat, rendered by the tokenizer's own chat template, ready for generation.

        Control tokens that appear inside messages (a document containing "<|user|>", say) are encoded as plain
        text, so retrieved text cannot forge a turn of the conversation.
        """
        msgs = normalize_messages(messages)
        kwargs = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True)
        try:
            enc = self.tokenizer.apply_chat_template(msgs, sanitize_control_tokens=True, **kwargs)
        except (TypeError, ValueError, NotImplementedError):
            enc = self.tokenizer.apply_chat_template(msgs, **kwargs)   # remote-code tokenizers without the option
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def render_prompt(self, messages: Sequence[Any]) -> str:
        """The exact prompt text the model sees (for logs and tests)."""
        return self.tokenizer.decode(self.encode_messages(messages)["input_ids"][0])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_prompt_tokens(self, messages: Sequence[Any]) -> int:
        return int(self.encode_messages(messages)["input_ids"].shape[1])

    # -- generation --
    def generation_config(self, params: GenerationParams, max_new_tokens: int) -> Any:
        cfg = copy.deepcopy(self.model.generation_config)
        cfg.max_new_tokens = max_new_tokens
        if self.compile_decoding:
            from transformers import CompileConfig

            # "default" mode: "reduce-overhead" (CUDA graphs) failed on an H200 with "accessing tensor output of
            # CUDAGraphs that has been overwritten" while streaming (docs/gpu.md).
            cfg.compile_config = CompileConfig(mode="default", fullgraph=False, dynamic=False)
        else:
            cfg.disable_compile = True     # a static cache alone must not switch transformers' auto-compile on
        cfg.repetition_penalty = params.repetition_penalty
        if params.temperature > 0:
            cfg.do_sample, cfg.temperature, cfg.top_p = True, params.temperature, params.top_p
        else:  # greedy: clear the sampling knobs so transformers does not warn about unused values
            cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        return cfg

    def stream(self, messages: Sequence[Any], params: GenerationParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        params = params or self.default_params
        inputs = self.encode_messages(messages)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.info.max_context_tokens - prompt_tokens
        if room <= 0:
            raise ContextTooLongError(
                f"the prompt has {prompt_tokens} tokens, which fills llm.max_context_tokens="
                f"{self.info.max_context_tokens}; lower prompt.context_tokens or prompt.history_turns, or raise "
                f"llm.max_context_tokens")
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        cfg = self.generation_config(params, min(params.max_new_tokens, room))
        if not self.static_cache:
            return stream_generate(self.model.generate, self.tokenizer, inputs, {"generation_config": cfg}, stop_event)
        return self._stream_static(inputs, cfg, stop_event)

    def _stream_static(self, inputs: dict[str, torch.Tensor], cfg: Any,
                       stop_event: threading.Event | None) -> Iterator[str]:
        cache = self._take_cache()
        try:
            yield from stream_generate(self.model.generate, self.tokenizer, inputs,
                                       {"generation_config": cfg, "past_key_values": cache}, stop_event)
        finally:
            self._give_back(cache)      # stream_generate has joined its worker: the cache is free again

    def warm_up_compiled_decoding(self) -> str:
        """Compile the decoding step now (a 4-token generation) so the first answer does not pay for it; on any
        failure turn compilation off and return a note saying so ("" when it worked or was not asked for)."""
        if not self.compile_decoding:
            return ""
        try:
            params = self.default_params.merged(max_new_tokens=4, temperature=0.0)
            for _ in self.stream([{"role": "user", "content": "你好"}], params):
                pass
        except GenerationOOMError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled instead
            disable_compiled_decoding(self.model)
            self.compile_decoding = False
            note = (f"llm.compile is on but torch.compile failed ({type(e).__name__}: {str(e)[:200]}); decoding "
                    f"without compilation (static KV cache only). / torch.compile 失败，已改为不编译解码。")
            log.warning(note)
            return note
        return ""


def enable_compiled_decoding(model: Any) -> None:
    """Let generate() compile the decoding step even for bitsandbytes models.

    transformers compiles decoding only when the model's quantizer declares itself compilable, which bitsandbytes'
    quantizers do not (yet) although torch.compile traces them (measured: nf4 decoding static 2x, compiled 3x plain
    on an H200, docs/gpu.md). Prefill stays uncompiled either way (transformers runs it through __call__)."""
    model._valid_auto_compile_criteria = lambda model_kwargs, generation_config: True
    # bitsandbytes' kernels break the graph inside every decoder layer, so dynamo compiles each layer's frame once
    # per layer index (an int attribute it treats as static): with the default limit of 8 recompilations the
    # layers past the 8th ran uncompiled (measured: int8 and bf16 gained nothing). Allow one per layer and some.
    import torch._dynamo

    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None) or 64
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 2 * layers + 16))


def disable_compiled_decoding(model: Any) -> None:
    model.__dict__.pop("_valid_auto_compile_criteria", None)
    model.__dict__.pop("_compiled_call", None)


def load_transformers_model(settings: Any) -> TransformersChatModel:
    """Resolve the folder (demo fallback), check remote code, plan memory, then load model and tokenizer."""
    _offline()
    configure_cuda_allocator()
    llm = settings.llm
    folder, is_demo, notice = resolve_model_path(settings)
    if folder.is_file():
        raise LLMError(f"llm.model points at the file {folder}; the transformers backend loads a model folder "
                       f"(config.json, tokenizer, *.safetensors). For a .gguf file set llm.backend: llamacpp or auto")
    raw = read_config_json(folder)
    check_remote_code(raw, folder, llm.trust_remote_code)
    notes: list[str] = [notice] if notice else []

    device = pick_device(llm.device)
    quant = llm.quantization if device == "cuda" else "none"
    dtype = pick_dtype(llm.dtype, device, quant)
    if device == "cpu" and llm.quantization != "none":
        notes.append(f"llm.quantization={llm.quantization!r} is ignored on CPU (bitsandbytes 4/8-bit needs an "
                     f"NVIDIA GPU); running {str(dtype).removeprefix('torch.')} weights instead. / "
                     f"CPU 模式不量化，使用 {str(dtype).removeprefix('torch.')} 权重。")
    for n in notes:
        log.warning(n)

    trust = llm.trust_remote_code
    adapter = read_adapter(settings.model_path(llm.adapter)) if llm.adapter else None
    if adapter is not None:  # refuse impossible combinations before the slow load (llm/adapters.py)
        check_combination(adapter, remote_code=needs_remote_code(raw), quantization=quant, merge=llm.adapter_merge)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    config = prepare_base_config(adapter, config)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)
    context = min(llm.max_context_tokens, max_pos) if max_pos else llm.max_context_tokens

    plan = plan_memory(config, device, quant, context, free_memory_bytes(device), dtype_bytes=dtype.itemsize)
    log.info("memory plan: %s", plan.summary())
    if not plan.fits:
        raise InsufficientMemoryError(f"model folder {folder}: {plan.advice}")

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissingError(
            f"the tokenizer in {folder} has no chat template (neither chat_template.jinja nor a 'chat_template' key "
            f"in tokenizer_config.json), so chat messages cannot be formatted for this model; use the model's "
            f"chat/instruct version, or add its chat template to that folder")

    qconfig = quantization_config(quant, dtype) if device == "cuda" else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=trust, dtype=dtype,
            quantization_config=qconfig,
            device_map={"": 0} if device == "cuda" else None,
        )
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise InsufficientMemoryError(
            f"the GPU ran out of memory while loading {folder} ({plan.summary()}); set llm.quantization: nf4, "
            f"lower llm.max_context_tokens, free the GPU of other programs, or set llm.device: cpu") from None
    except OSError as e:
        raise LLMError(f"could not load the weights in {folder}: {e}. Check that the folder holds the model's "
                       f"*.safetensors files (copy it again if a download was interrupted)") from None
    model.eval()
    name = folder.name
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=llm.adapter_merge)
        name += describe(adapter, merged=llm.adapter_merge)

    info = ModelInfo(
        name=name, backend="transformers", device=device, quantization=quant,
        dtype=str(dtype).removeprefix("torch."), is_demo=is_demo, weights_path=str(folder),
        max_context_tokens=context, notes=tuple(notes), context_tokens=llm.cpu_context_tokens if device == "cpu" else 0,
    )
    static = device == "cuda" and llm.static_cache
    # llm.compile auto: only where it measured faster (H200, ChatGLM3-6B shape, docs/gpu.md): nf4 4-5x plain decoding;
    # int8 slower than the static cache alone (bitsandbytes' int8 kernels break the graph), bf16 no gain.
    compile_decoding = static and (llm.compile is True or (llm.compile == "auto" and quant == "nf4")) \
        and (adapter is None or llm.adapter_merge)        # a peft wrapper's generate() is not ours to compile
    chat = TransformersChatModel(model, tokenizer, info, GenerationParams.from_settings(llm), plan,
                                 static_cache=static, compile_decoding=compile_decoding)
    note = chat.warm_up_compiled_decoding()
    if note:
        chat.info = replace(info, notes=(*info.notes, note))
    return chat
