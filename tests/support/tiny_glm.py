"""Tiny random GLM chat models built in code, saved as ordinary Hugging Face folders.

No GLM weights can be downloaded here, so the tests build models with the real transformers classes
(GlmForCausalLM, as in glm-4-9b-chat-hf / glm-edge; Glm4ForCausalLM, as in GLM-4-0414) at a few hundred
thousand parameters, plus a small byte-level BPE tokenizer trained in code (tokenizers library) that carries a
GLM-style chat template ([gMASK]<sop><|user|>\n...<|assistant|>\n). The folder then goes through the same
`load_llm` path as a real model folder: AutoConfig → AutoModelForCausalLM → AutoTokenizer → chat template.

    folder = build_tiny_glm(tmp_path / "tiny-glm", kind="glm")
    settings = load_settings(llm={"model": str(folder), "device": "cpu"})
    model = load_llm(settings)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

# GLM-4's control tokens; the role tokens double as stop tokens, as in the real models' generation_config.
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# The chat template of glm-4-9b-chat-hf, reduced to plain text messages.
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A little Chinese and English so that the BPE learns some merges beyond raw bytes.
_CORPUS = [
    "根据已知信息，简洁和专业地回答用户的问题。如果无法从中得到答案，请说“根据已知信息无法回答该问题”。",
    "知问是一个离线的中文文档问答系统，支持 PDF、Word、Excel 等格式。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "The quick brown fox jumps over the lazy dog. Question answering over documents.",
    "已知信息：第一章 总则。第二章 附则。问题：本办法自何时起施行？",
] * 4


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string encodes; no unknown token) with GLM's control tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = GLM_CHAT_TEMPLATE
    return fast


def tiny_config(kind: Literal["glm", "glm4"], tokenizer: PreTrainedTokenizerFast) -> GlmConfig | Glm4Config:
    """2 layers, hidden 64, 4 query heads sharing 2 KV heads (GQA like the real GLMs)."""
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, tie_word_embeddings=False,
    )
    return GlmConfig(**common) if kind == "glm" else Glm4Config(**common)


def build_tiny_glm(folder: Path, kind: Literal["glm", "glm4"] = "glm", *, seed: int = 0,
                   chat_template: bool = True) -> Path:
    """Save a tiny random GLM (`kind` "glm" → GlmForCausalLM, "glm4" → Glm4ForCausalLM) with its tokenizer.

    The weights come from a fixed seed, so generation is the same on every run (greedy decoding).
    `chat_template=False` leaves the template out, to test the loader's error for such folders.
    """
    folder = Path(folder)
    tokenizer = build_tokenizer()
    config = tiny_config(kind, tokenizer)
    torch.manual_seed(seed)
    model = (GlmForCausalLM if kind == "glm" else Glm4ForCausalLM)(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    if not chat_template:
        # save_pretrained may also write chat_template.jinja; a folder "without a template" has neither.
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def make_remote_code_folder(folder: Path) -> Path:
    """A config.json shaped like the original THUDM/chatglm3-6b (model_type chatglm + auto_map), no weights.

    Enough for the loader's trust_remote_code check, which must fire before anything is imported or loaded.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "padded_vocab_size": 65024, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
        "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 128, "ffn_hidden_size": 13696,
        "seq_length": 8192, "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
