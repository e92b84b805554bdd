"""The CUDA paths of the transformers backend: bitsandbytes 4-bit (nf4) and 8-bit loading, streaming and stop on the
GPU, and a CUDA out-of-memory during generation that leaves the model usable.

Runs only where PyTorch sees a CUDA GPU (CI has none: every test here is skipped there). The memory/speed numbers
for ChatGLM3-6B dimensions come from bench/gpu_memory.py (docs/gpu.md).
"""
from __future__ import annotations

import pytest
import torch

from configs import load_settings
from llm import GenerationOOMError, GenerationParams, load_llm
from tests.support.stopping import stream_then_stop
from tests.support.tiny_glm import build_tiny_glm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch"),
]

CHAT = [{"role": "user", "content": "北京是哪里？"}]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def needs_bitsandbytes():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")


@pytest.fixture(scope="module")
def glm_folder(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("gpu") / "tiny-glm", "glm")


def gpu_settings(folder, quantization, **llm):
    return load_settings(llm={"model": str(folder), "device": "cuda", "quantization": quantization, **llm})


@pytest.mark.parametrize("quantization,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_load_and_stream(glm_folder, quantization, layer):
    needs_bitsandbytes()
    model = load_llm(gpu_settings(glm_folder, quantization))
    assert model.info.device == "cuda" and model.info.quantization == quantization
    assert model.info.notice == ""                 # nothing ignored, no demo stand-in
    kinds = {type(m).__name__ for m in model.model.modules()}
    assert layer in kinds, kinds                    # the transformer Linear layers were replaced by bitsandbytes'
    assert model.model.lm_head.weight.dtype in (torch.bfloat16, torch.float16)   # lm_head stays 16-bit
    assert model.model.device.type == "cuda"
    pieces = list(model.stream(CHAT, GREEDY))
    assert pieces and all(isinstance(p, str) for p in pieces)
    if quantization == "nf4":
        q = model.model.config.quantization_config
        assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant


def test_unquantized_bf16_on_gpu(glm_folder):
    model = load_llm(gpu_settings(glm_folder, "none"))
    assert model.info.quantization == "none" and model.info.dtype in ("bfloat16", "float16")
    assert model.generate(CHAT, GREEDY)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_static_cache_is_the_default_on_cuda_and_answers_match(glm_folder, quantization):
    """llm.static_cache (default on): greedy answers start like the dynamic cache's (later tokens may differ by bf16
    rounding: the attention kernels differ), caches are pooled and reused, two answers at once get their own cache."""
    if quantization == "nf4":
        needs_bitsandbytes()
    static = load_llm(gpu_settings(glm_folder, quantization, max_context_tokens=512, compile=False))
    assert static.static_cache and not static.compile_decoding
    plain = load_llm(gpu_settings(glm_folder, quantization, max_context_tokens=512, static_cache=False))
    answer = static.generate(CHAT, GREEDY)
    assert answer and next(iter(plain.stream(CHAT, GREEDY))) == next(iter(static.stream(CHAT, GREEDY)))
    assert len(static._free_caches) == 1 and static._free_caches[0].max_cache_len == 512
    first, second = static.stream(CHAT, GREEDY), static.stream(CHAT, GREEDY)
    a, b = next(first), next(second)                 # both generating at once
    assert a + "".join(first) == b + "".join(second) == answer
    assert len(static._free_caches) == 2


def test_compile_auto_is_on_for_nf4_only(glm_folder):
    needs_bitsandbytes()
    assert load_llm(gpu_settings(glm_folder, "int8", max_context_tokens=512)).compile_decoding is False
    assert load_llm(gpu_settings(glm_folder, "none", max_context_tokens=512)).compile_decoding is False
    nf4 = load_llm(gpu_settings(glm_folder, "nf4", max_context_tokens=512))
    assert nf4.compile_decoding or "torch.compile failed" in nf4.info.notice


def test_compile_setting_compiles_decoding_or_falls_back_with_a_note(glm_folder):
    """llm.compile: either the compiled decoding streams (its first token, from the uncompiled prefill, is the
    reference's), or compilation failed at load time and the note says decoding runs without it. Never an error."""
    needs_bitsandbytes()
    model = load_llm(gpu_settings(glm_folder, "nf4", max_context_tokens=512, compile=True))
    reference = load_llm(gpu_settings(glm_folder, "nf4", max_context_tokens=512, static_cache=False))
    first = next(iter(reference.stream(CHAT, GREEDY)))
    if model.compile_decoding:
        assert model.info.notice == "" and hasattr(model.model, "_compiled_call")
    else:
        assert "torch.compile failed" in model.info.notice
    pieces = list(model.stream(CHAT, GREEDY))
    assert pieces and pieces[0] == first


def test_stop_event_on_gpu(glm_folder):
    needs_bitsandbytes()
    model = load_llm(gpu_settings(glm_folder, "nf4"))
    stopped, full = stream_then_stop(model, CHAT, GREEDY.merged(max_new_tokens=300), stop_after=1)
    assert model.count_tokens(stopped) < model.count_tokens(full) / 2


def test_cuda_oom_during_generation_is_a_clear_error_and_model_survives(tmp_path):
    """A model whose prefill activations are huge (FF 65,536 wide) under a memory cap: a long prompt runs out of
    GPU memory, the error is a sentence, the cache is emptied, and a short prompt right after still works."""
    from transformers import GlmConfig, GlmForCausalLM

    from tests.support.tiny_glm import build_tokenizer

    tok = build_tokenizer()
    folder = tmp_path / "wide-ff"
    config = GlmConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=65536, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    GlmForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_llm(gpu_settings(folder, "none", max_context_tokens=16384))
    weights = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # Allow the weights plus 512 MiB: 9k tokens × 65,536 × 2 bytes × several live tensors will not fit.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (weights + 512 * 2**20) / total))
    try:
        long_chat = [{"role": "user", "content": "长" * 3000}]
        with pytest.raises(GenerationOOMError, match="ran out of memory.*still loaded and usable"):
            list(model.stream(long_chat, GREEDY.merged(max_new_tokens=4)))
        assert torch.cuda.memory_allocated() < weights + 64 * 2**20   # the failed prefill's tensors are gone
        assert list(model.stream(CHAT, GREEDY.merged(max_new_tokens=4)))   # and the model still answers
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
