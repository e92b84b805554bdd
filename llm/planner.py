"""Will this model fit? A memory estimate from the model's config, made before any weight is loaded.

    plan = plan_memory(config, "cuda", "nf4", context_tokens=4096, free_bytes=6 * 2**30)
    plan.fits, plan.advice        # False / True, and a sentence saying what to change

The estimate has four terms (calibrated on an H100 with ChatGLM3-6B's shapes; docs/gpu.md has the measurements):
  weights      from the parameter count: embeddings, per layer (attention with GQA KV heads, gated FF, norms), lm_head.
               bitsandbytes quantizes only the Linear layers inside the transformer blocks; the token embedding and
               lm_head stay 16-bit. nf4 = 4 bits a parameter + its quantization state (one absmax per 64-weight
               block; with double quantization that absmax is itself 8-bit, with fp32 scales per 256 blocks); int8
               (LLM.int8) = 1 byte a parameter + one fp32 scale per output row. Matches the measured bytes to 0.1 %.
  kv_cache     2 (K and V) × layers × kv_heads × head_dim × tokens × 2 bytes (16-bit cache).
  activations  the prefill of the whole context is the peak. Per token, 16-bit: the residual stream and its normed
               copy (2 × hidden) and the gated FF's gate/up output, activation and product (3.6 × FF measured for
               nf4 and 16-bit; 5.1 × FF for int8, which also holds int8 copies of the inputs and int32 matmul
               outputs). Fixed: nf4 dequantizes one weight at a time to 16 bits (the largest, gate_up: 2·hidden·FF
               elements); int8 keeps ~9 bytes per hidden·FF of outlier/matmul buffers (measured 0.47 GiB).
  overhead     the CUDA caching allocator's reserve above what is allocated: 128 MiB + 3 % (nf4, 16-bit) or 7 %
               (int8, many odd-sized temporaries), with expandable segments on (the loader sets them).
The CUDA context itself (~0.5 GiB) is not counted: `free_bytes` from torch.cuda.mem_get_info() is read after it exists.
Loading peaks below generation (measured: nf4 4.09 GiB, int8 7.33 GiB reserved), so generation sizes the plan.
16-bit (quantization none) uses the nf4 per-token terms without the dequantization buffer (measured: +1.4..+3.0 %).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

GiB = 1024**3

# Calibration constants (docs/gpu.md has the measurements behind them).
ACT_HIDDEN_PER_TOKEN = 2.0                                  # residual + normed copy, 16-bit elements per token
ACT_FF_PER_TOKEN = {"nf4": 3.6, "none": 3.6, "int8": 5.1}    # × intermediate_size, 16-bit elements per token
INT8_FIXED_BYTES_PER_HIDDEN_FF = 9.0                        # int8 outlier/matmul buffers: 0.47 GiB at 4096 × 13696
ALLOCATOR_FIXED_BYTES = 128 * 1024**2                       # allocator reserve + cuBLAS workspace
ALLOCATOR_FRACTION = {"nf4": 0.03, "none": 0.03, "int8": 0.07}
NF4_BLOCK = 64                                                 # bitsandbytes' default blocksize for 4-bit
NF4_DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class ModelDims:
    """The shapes that decide memory. Read from a transformers config or an original chatglm config."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @property
    def embedding_params(self) -> int:
        """Token embedding + lm_head (one matrix when tied): never quantized by bitsandbytes."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def linear_params_per_layer(self) -> int:
        """The matrices bitsandbytes replaces: q, k, v, o and the gated FF (gate, up, down)."""
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        ff = 3 * self.hidden_size * self.intermediate_size
        return q + kv + o + ff

    @property
    def small_params_per_layer(self) -> int:
        """Norm weights and attention biases: kept 16-bit."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return 2 * self.hidden_size + bias

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer

    @property
    def total_params(self) -> int:
        return (self.embedding_params + self.linear_params
                + self.num_layers * self.small_params_per_layer + self.hidden_size)


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def model_dims(config: Any) -> ModelDims:
    """ModelDims from a transformers PretrainedConfig, its to_dict(), a raw config.json mapping (or ModelDims).

    Understands the transformers-native names (GlmConfig, Qwen2Config, LlamaConfig, ...) and the original
    chatglm3-6b names (padded_vocab_size, num_layers, multi_query_group_num, kv_channels, ffn_hidden_size).
    """
    if isinstance(config, ModelDims):
        return config
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    heads = _get(cfg, "num_attention_heads", "n_head")
    layers = _get(cfg, "num_hidden_layers", "num_layers", "n_layer")
    if not (hidden and heads and layers):
        raise ValueError(
            "the model's config.json lacks hidden_size / num_attention_heads / num_hidden_layers, "
            "so its memory cannot be estimated; check that the folder holds a causal language model"
        )
    if cfg.get("multi_query_attention") and cfg.get("multi_query_group_num"):
        kv_heads = cfg["multi_query_group_num"]          # original ChatGLM: MQA groups are the KV heads
    else:
        kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    return ModelDims(
        vocab_size=_get(cfg, "vocab_size", "padded_vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_get(cfg, "head_dim", "kv_channels", default=hidden // heads),
        intermediate_size=_get(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(_get(cfg, "attention_bias", "add_qkv_bias", default=False)),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes needed to run one generation of `context_tokens` tokens, and whether that fits `free_bytes`."""

    device: str
    quantization: str
    context_tokens: int
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    free_bytes: int | None
    fits: bool
    advice: str

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes

    def summary(self) -> str:
        free = f"{self.free_bytes / GiB:.2f} GiB free" if self.free_bytes is not None else "free memory unknown"
        size = f"{self.params / 1e9:.2f}B params, " if self.params else ""
        return (f"{size}{self.quantization} on {self.device}: weights "
                f"{self.weights_bytes / GiB:.2f} GiB + KV cache {self.kv_cache_bytes / GiB:.2f} GiB + activations "
                f"{self.activation_bytes / GiB:.2f} GiB + overhead {self.overhead_bytes / GiB:.2f} GiB = "
                f"{self.total_bytes / GiB:.2f} GiB for {self.context_tokens} tokens ({free})")


def weights_bytes(dims: ModelDims, quantization: str, dtype_bytes: int = 2) -> int:
    """Bytes of the loaded weights. `dtype_bytes` is the unquantized dtype's size (2 for bf16/fp16, 4 for fp32)."""
    small = (dims.num_layers * dims.small_params_per_layer + dims.hidden_size) * dtype_bytes
    embed = dims.embedding_params * dtype_bytes
    lin = dims.linear_params
    if quantization == "nf4":
        # 0.5 B/param + double-quantized absmax (1 byte per 64-block) + fp32 scale per 256 absmax + fp32 offset.
        n_blocks = lin / NF4_BLOCK
        linear = lin * 0.5 + n_blocks * 1 + (n_blocks / NF4_DOUBLE_QUANT_BLOCK) * 4
    elif quantization == "int8":
        # LLM.int8: int8 weights + one fp32 row scale per output feature (≈ rows of each matrix).
        rows = dims.num_layers * (dims.num_heads * dims.head_dim + 2 * dims.num_kv_heads * dims.head_dim
                                  + dims.hidden_size + 2 * dims.intermediate_size + dims.hidden_size)
        linear = lin * 1 + rows * 4
    elif quantization == "none":
        linear = lin * dtype_bytes
    else:
        raise ValueError(f"llm.quantization must be nf4, int8 or none, got {quantization!r}")
    return int(embed + small + linear)


def kv_cache_bytes(dims: ModelDims, tokens: int, dtype_bytes: int = 2) -> int:
    """2 (K, V) × layers × kv_heads × head_dim × tokens × bytes."""
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * tokens * dtype_bytes


def activation_bytes(dims: ModelDims, tokens: int, quantization: str, dtype_bytes: int = 2) -> int:
    """Peak prefill activations for one `tokens`-long prompt (see the module docstring)."""
    per_token = ACT_HIDDEN_PER_TOKEN * dims.hidden_size + ACT_FF_PER_TOKEN[quantization] * dims.intermediate_size
    act = tokens * per_token * dtype_bytes
    if quantization == "nf4":     # one weight dequantized at a time; the biggest is the fused gate_up (hidden × 2·FF)
        fixed = 2 * dims.hidden_size * dims.intermediate_size * dtype_bytes
    elif quantization == "int8":
        fixed = INT8_FIXED_BYTES_PER_HIDDEN_FF * dims.hidden_size * dims.intermediate_size
    else:
        fixed = 0
    logits = dims.vocab_size * 4 * 2   # last-position logits in fp32 (generate keeps only the last position's)
    return int(act + fixed + logits)


def _estimate(dims: ModelDims, device: str, quant: str, tokens: int, dtype_bytes: int) -> tuple[int, int, int, int]:
    """(weights, kv_cache, activations, overhead) bytes."""
    w = weights_bytes(dims, quant, dtype_bytes)
    kv = kv_cache_bytes(dims, tokens, 2 if device == "cuda" else dtype_bytes)
    act = activation_bytes(dims, tokens, quant, dtype_bytes)
    overhead = int(ALLOCATOR_FIXED_BYTES + ALLOCATOR_FRACTION[quant] * (w + kv + act)) if device == "cuda" else 0
    return w, kv, act, overhead


def plan_memory(
    config: Any,
    device: Literal["cuda", "cpu"] | str,
    quantization: Literal["nf4", "int8", "none"] | str,
    context_tokens: int,
    free_bytes: int | None = None,
    *,
    dtype_bytes: int = 2,
) -> MemoryPlan:
    """Estimate the memory of a generation of `context_tokens` (prompt + answer) and check it against `free_bytes`.

    On CPU quantization does not apply (bitsandbytes needs CUDA here), so the weights count at `dtype_bytes`.
    `free_bytes` None means "unknown": the plan then says it fits and gives the total only.
    """
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
    dims = model_dims(config)
    quant = quantization if device == "cuda" else "none"
    w, kv, act, overhead = _estimate(dims, device, quant, context_tokens, dtype_bytes)
    total = w + kv + act + overhead
    fits = free_bytes is None or total <= free_bytes
    advice = "" if fits else _advice(dims, device, quant, context_tokens, free_bytes, dtype_bytes, total)
    return MemoryPlan(device=device, quantization=quant, context_tokens=context_tokens, params=dims.total_params,
                      weights_bytes=w, kv_cache_bytes=kv, activation_bytes=act, overhead_bytes=overhead,
                      free_bytes=free_bytes, fits=fits, advice=advice)


def max_context_that_fits(config: Any, device: str, quantization: str, free_bytes: int, dtype_bytes: int = 2) -> int:
    """The longest context (tokens, a multiple of 256, up to 1M) that fits `free_bytes`; 0 if not even 256 fit."""
    dims = model_dims(config)
    quant = quantization if device == "cuda" else "none"
    lo, hi = 0, 1 << 20
    while hi - lo > 256:
        mid = max(256, (lo + hi) // 2 // 256 * 256)
        if sum(_estimate(dims, device, quant, mid, dtype_bytes)) <= free_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def _advice(dims: ModelDims, device: str, quant: str, tokens: int, free: int, dtype_bytes: int, total: int) -> str:
    need = f"needs about {total / GiB:.1f} GiB but only {free / GiB:.1f} GiB is free on {device}"
    tips: list[str] = []
    if device == "cuda" and quant != "nf4":
        nf4 = sum(_estimate(dims, device, "nf4", tokens, dtype_bytes))
        tips.append(f"set llm.quantization: nf4 (4-bit, about {nf4 / GiB:.1f} GiB)")
    shorter = max_context_that_fits(dims, device, quant, free, dtype_bytes)
    if shorter >= 512:
        tips.append(f"lower llm.max_context_tokens from {tokens} to {shorter} or less")
    if device == "cuda":
        tips.append("set llm.device: cpu (slower; uses system memory)")
    else:
        tips.append("use a smaller model (llm.model) or close other programs to free memory")
    return f"the model {need}: " + "; or ".join(tips) + "."


# --- llama.cpp (a GGUF file) ---------------------------------------------------------------------------------------
LLAMACPP_UBATCH = 512                  # tokens a prefill step computes at once (llama.cpp's n_ubatch default)


def plan_gguf_memory(dims: Mapping[str, int], file_bytes: int, context_tokens: int, file_type: str,
                     free_bytes: int | None, extra_bytes: int = 0) -> MemoryPlan:
    """Memory of a GGUF model run by llama.cpp on the CPU, before it is loaded.

    weights      the file's size: llama.cpp memory-maps it and touches every tensor while generating.
    kv_cache     2 × layers × kv_heads × head_dim × context × 2 bytes (llama.cpp's default f16 cache), allocated
                 for the whole window when the context is created.
    activations  the compute buffer of one 512-token prefill step: fp32 logits for the step (vocab × 4 bytes a
                 token) and the FF intermediates (3 × FF × 4 bytes a token).
    overhead     `extra_bytes`: the prompt cache (llm.prompt_cache_mb), at most that much.
    `dims` holds layers, hidden, kv_heads, head_dim, ff and vocab (llm.llamacpp_backend.gguf_dims).
    """
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be > 0, got {context_tokens}")

    def terms(tokens: int) -> tuple[int, int, int]:
        kv = 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * tokens * 2
        act = min(LLAMACPP_UBATCH, tokens) * (dims["vocab"] * 4 + 3 * dims["ff"] * 4)
        return file_bytes, kv, act

    w, kv, act = terms(context_tokens)
    total = w + kv + act + extra_bytes
    fits = free_bytes is None or total <= free_bytes
    advice = ""
    if not fits:
        shorter = 0
        for tokens in range(context_tokens - 256, 255, -256):
            if sum(terms(tokens)) + extra_bytes <= free_bytes:
                shorter = tokens
                break
        tips = [f"lower llm.max_context_tokens from {context_tokens} to {shorter} or less"] if shorter >= 512 else []
        if extra_bytes:
            tips.append(f"lower llm.prompt_cache_mb ({extra_bytes // 2**20})")
        tips.append("use a smaller or more strongly quantized GGUF file (e.g. Q4_K_M), or close other programs")
        advice = (f"the model needs about {total / GiB:.1f} GiB but only {free_bytes / GiB:.1f} GiB is free on cpu: "
                  + "; or ".join(tips) + ".")
    return MemoryPlan(device="cpu", quantization=file_type, context_tokens=context_tokens, params=0,  # not in the file
                      weights_bytes=w, kv_cache_bytes=kv, activation_bytes=act, overhead_bytes=extra_bytes,
                      free_bytes=free_bytes, fits=fits, advice=advice)
