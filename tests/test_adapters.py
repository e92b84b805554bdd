"""Fine-tuned adapters (llm/adapters.py) through the real loader: tiny random GLM folders (transformers' own
GlmForCausalLM) and a tiny folder with ChatGLM-style remote code (tests/support/tiny_chatglm.py: the real THUDM code
cannot be had here), adapters made in the test with the real peft library (LoRA, prefix tuning) or saved as ChatGLM's
P-Tuning v2 scripts save them. Every adapter must change the logits; a mismatched one must fail with one sentence.
GPU variants (nf4 / int8 / bf16, merged) run only where CUDA is present (marker gpu) and skip cleanly elsewhere.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import load_settings
from llm import load_llm
from llm.adapters import Adapter, AdapterError, check_combination, read_adapter
from tests.support.tiny_chatglm import build_tiny_chatglm, save_ptuning_v2_checkpoint
from tests.support.tiny_glm import build_tiny_glm, build_tokenizer, tiny_config

CHAT = [{"role": "user", "content": "北京是中华人民共和国的首都吗？"}]


# --- adapters made with peft ---------------------------------------------------------------------------------------
def _glm(**changes):
    from transformers import GlmForCausalLM

    cfg = tiny_config("glm", build_tokenizer())
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return GlmForCausalLM(cfg)


def _base_model(folder: Path, trust: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, local_files_only=True,
                                                dtype=torch.float32)


def make_lora(model, out: Path, targets: list[str], seed: int = 1) -> Path:
    """A LoRA with random (non-zero) B matrices, so that it changes the output as a trained one would."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False, task_type=TaskType.CAUSAL_LM))
    peft_model.save_pretrained(out)
    return out


def make_prefix(model, out: Path, tokens: int = 4, seed: int = 2) -> Path:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    peft_model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=tokens, task_type=TaskType.CAUSAL_LM))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    glm = build_tiny_glm(root / "glm", "glm")
    chatglm = build_tiny_chatglm(root / "chatglm")
    return {
        "root": root, "glm": glm, "chatglm": chatglm,
        "lora": make_lora(_base_model(glm), root / "lora", ["q_proj", "v_proj", "down_proj"]),
        "prefix": make_prefix(_base_model(glm), root / "prefix"),
        "chatglm_lora": make_lora(_base_model(chatglm, trust=True), root / "chatglm-lora", ["query_key_value"]),
        "ptuning": save_ptuning_v2_checkpoint(chatglm, root / "ptuning"),
        "ptuning_proj": save_ptuning_v2_checkpoint(chatglm, root / "ptuning-proj", prefix_projection=True,
                                                   safetensors=True),
    }


def load(model: Path, adapter: Path | str = "", **llm):
    settings = load_settings(llm={"model": str(model), "device": "cpu", "dtype": "float32", "adapter": str(adapter),
                                  "trust_remote_code": "chatglm" in Path(model).name, **llm})
    return load_llm(settings)


def logits(chat_model) -> torch.Tensor:
    ids = chat_model.encode_messages(CHAT)["input_ids"].to(chat_model.model.device)
    with torch.no_grad():
        return chat_model.model(input_ids=ids).logits.float().cpu()


def greedy_ids(chat_model, n: int = 6) -> list[int]:
    ids = {k: v.to(chat_model.model.device) for k, v in chat_model.encode_messages(CHAT).items()}
    with torch.no_grad():
        out = chat_model.model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def base_logits(world):
    return {"glm": logits(load(world["glm"])), "chatglm": logits(load(world["chatglm"]))}


# --- each format changes the output --------------------------------------------------------------------------------
def test_lora_changes_logits_and_streams(world, base_logits):
    from peft import PeftModel

    m = load(world["glm"], world["lora"])
    assert isinstance(m.model, PeftModel) and m.info.name == "glm+lora (LoRA)"
    with_lora = logits(m)
    assert (with_lora - base_logits["glm"]).abs().max() > 1e-3
    # generation runs through the PeftModel and picks other tokens than the base model
    assert greedy_ids(m) != greedy_ids(load(world["glm"]))
    list(m.stream(CHAT, m.default_params.merged(max_new_tokens=6, temperature=0.0)))


def test_lora_merged_gives_the_same_logits_as_unmerged(world):
    from peft import PeftModel

    unmerged = logits(load(world["glm"], world["lora"]))
    m = load(world["glm"], world["lora"], adapter_merge=True)
    assert not isinstance(m.model, PeftModel) and type(m.model).__name__ == "GlmForCausalLM"
    assert m.info.name == "glm+lora (LoRA, merged)"
    torch.testing.assert_close(logits(m), unmerged, rtol=1e-4, atol=1e-4)


def test_peft_prefix_tuning_on_native_glm(world, base_logits):
    m = load(world["glm"], world["prefix"])
    assert m.info.name == "glm+prefix (prefix tuning)"
    assert (logits(m) - base_logits["glm"]).abs().max() > 1e-3
    assert greedy_ids(m) != greedy_ids(load(world["glm"]))


def test_lora_on_remote_code_chatglm(world, base_logits):
    m = load(world["chatglm"], world["chatglm_lora"])
    assert (logits(m) - base_logits["chatglm"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ptuning", "ptuning_proj"])
def test_ptuning_v2_checkpoint_on_remote_code_chatglm(world, base_logits, name):
    adapter = read_adapter(world[name])
    assert adapter.kind == "ptuning_v2" and adapter.config["pre_seq_len"] == 4
    m = load(world["chatglm"], world[name])
    encoder = m.model.transformer.prefix_encoder
    assert m.info.name.endswith("(P-Tuning v2)") and encoder.embedding.weight.dtype == torch.float32
    saved = torch.load(world["ptuning"] / "pytorch_model.bin", weights_only=True) if name == "ptuning" else None
    if saved is not None:          # the checkpoint's values were loaded, not the random init
        torch.testing.assert_close(encoder.embedding.weight, saved["transformer.prefix_encoder.embedding.weight"])
    assert (logits(m) - base_logits["chatglm"]).abs().max() > 1e-3


# --- mismatches: one sentence --------------------------------------------------------------------------------------
def test_lora_for_another_base_shape_is_one_sentence(world):
    other = make_lora(_glm(hidden_size=32, head_dim=8), world["root"] / "lora-small", ["q_proj", "v_proj"])
    with pytest.raises(AdapterError) as e:
        load(world["glm"], other)
    msg = str(e.value)
    assert "trained for a different base model" in msg and "\n" not in msg
    assert "32 in the adapter but" in msg and "64 in" in msg and "q_proj" in msg


def test_lora_for_another_architecture_names_the_layers(world):
    with pytest.raises(AdapterError, match="targets layers that .* does not have"):
        load(world["glm"], world["chatglm_lora"])


def test_prefix_for_another_depth_fails_at_load(world):
    other = make_prefix(_glm(num_hidden_layers=3), world["root"] / "prefix-3layers")
    with pytest.raises(AdapterError, match="does not fit this base model: it was made for 3 layers .* needs 2 layers"):
        load(world["glm"], other)


def test_ptuning_for_another_depth_is_one_sentence(world):
    deeper = build_tiny_chatglm(world["root"] / "chatglm-3", num_layers=3)
    ck = save_ptuning_v2_checkpoint(deeper, world["root"] / "ptuning-3")
    with pytest.raises(AdapterError) as e:
        load(world["chatglm"], ck)
    assert "trained for a different base model" in str(e.value) and "embedding.weight" in str(e.value)


# --- refusals with the reason, before the model loads --------------------------------------------------------------
def test_impossible_combinations_are_refused(world):
    with pytest.raises(AdapterError, match="needs the original ChatGLM modeling code"):
        load(world["glm"], world["ptuning"])
    with pytest.raises(AdapterError, match="transformers-native model classes only"):
        load(world["chatglm"], world["prefix"])
    with pytest.raises(AdapterError, match="nothing to merge"):
        load(world["glm"], world["prefix"], adapter_merge=True)
    lora = read_adapter(world["lora"])
    for quant in ("nf4", "int8"):
        with pytest.raises(AdapterError, match=f"cannot be merged into {quant}"):
            check_combination(lora, remote_code=False, quantization=quant, merge=True)
        check_combination(lora, remote_code=False, quantization=quant, merge=False)    # QLoRA-style: fine
    with pytest.raises(AdapterError, match="prefix_projection"):
        check_combination(read_adapter(world["ptuning_proj"]), remote_code=True, quantization="nf4", merge=False)


def test_adapters_need_the_transformers_backend(world, tmp_path):
    from llm.loader import choose_backend

    both = tmp_path / "both"                       # like the demo pack: transformers weights and a GGUF side by side
    both.mkdir()
    for f in world["glm"].iterdir():
        (both / f.name).symlink_to(f)
    (both / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    with_adapter = load_settings(llm={"model": str(both), "device": "cpu", "adapter": str(world["lora"])})
    assert choose_backend(with_adapter) == "transformers"          # auto never picks an engine that would drop it
    for backend in ("llamacpp", "openai"):
        with pytest.raises(AdapterError, match=f"resolves to '{backend}'"):
            load_llm(load_settings(llm={"model": str(both), "backend": backend, "adapter": str(world["lora"]),
                                        "openai_base_url": "http://127.0.0.1:9/v1"}))


def test_unusable_folders(world, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load(world["glm"], tmp_path / "nope")
    with pytest.raises(AdapterError, match="neither a peft adapter"):
        load(world["glm"], world["glm"])                       # a model folder, not an adapter
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "adapter_config.json").write_text('{"peft_type": "IA3"}', encoding="utf-8")
    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        read_adapter(tmp_path / "weird")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"pre_seq_len": 4}', encoding="utf-8")
    torch.save({"transformer.prefix_encoder.embedding.weight": Adapter}, pickled / "pytorch_model.bin")
    with pytest.raises(AdapterError, match="cannot be read as plain tensors"):
        load(world["chatglm"], pickled)


# --- GPU: QLoRA-style inference and 16-bit, merged --------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("quantization,merge", [("nf4", False), ("int8", False), ("none", False), ("none", True)])
def test_lora_on_cuda(world, quantization, merge):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = dict(device="cuda", dtype="bfloat16" if quantization != "int8" else "float16", quantization=quantization)
    base = load_llm(load_settings(llm={"model": str(world["glm"]), **cuda}))
    assert base.info.quantization == quantization
    ref = logits(base)
    del base
    m = load_llm(load_settings(llm={"model": str(world["glm"]), "adapter": str(world["lora"]),
                                    "adapter_merge": merge, **cuda}))
    assert m.model.device.type == "cuda" and m.info.quantization == quantization
    assert (logits(m) - ref).abs().max() > 1e-2
    list(m.stream(CHAT, m.default_params.merged(max_new_tokens=6, temperature=0.0)))    # generates on the GPU


@pytest.mark.gpu
def test_prefix_tuning_and_ptuning_on_cuda(world):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pairs = ((world["glm"], world["prefix"], False), (world["chatglm"], world["ptuning"], True))
    for model, adapter, remote in pairs:
        cuda = {"model": str(model), "device": "cuda", "dtype": "bfloat16", "quantization": "nf4",
                "trust_remote_code": remote}
        ref = logits(load_llm(load_settings(llm=cuda)))
        m = load_llm(load_settings(llm={**cuda, "adapter": str(adapter)}))
        assert m.info.quantization == "nf4" and (logits(m) - ref).abs().max() > 1e-2
