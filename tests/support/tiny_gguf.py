"""Tiny random GGUF files of the GLM architectures, written with the `gguf` package, for llama.cpp tests.

No GLM weights exist here, so the tests prove llama.cpp's chatglm (ChatGLM3-6B, glm-4-9b-chat, glm-edge) and glm4
(GLM-4-0414) paths on files of the same layout: fused QKV with bias, a fused gate+up FF (SwiGLU), RMS norms, GLM-4's
extra post-attention / post-FF norms, partial rotary embeddings, a byte-level BPE tokenizer with GLM's control tokens
("chatglm-bpe" pre-tokenizer, as glm-4-9b-chat and glm-edge GGUF files have). About 200 KB each.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GLM_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
               "<|assistant|>", "<|observation|>"]
GLM4_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one token per byte value, so any text tokenizes."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_glm_gguf(path: Path, arch: str = "chatglm", *, chat_template: str | None = None, seed: int = 0,
                        hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ff: int = 128,
                        context: int = 512) -> Path:
    """Write a random-weight GGUF of architecture `arch` ("chatglm" or "glm4", or any name to test refusals)."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    byte_tokens = _byte_tokens()
    merges = ["Ġ t", "Ġ a", "h e", "i n"]
    tokens = byte_tokens + [a + b for a, b in (m.split() for m in merges)] + GLM_SPECIAL
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(GLM_SPECIAL)) + [gguf.TokenType.CONTROL] * len(GLM_SPECIAL)
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-test")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim // 2)          # GLM rotates half of each head
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)                                  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("chatglm-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<sop>"))
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def add(name: str, *shape: int, scale: float = 0.3, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, data)

    qkv = hidden + 2 * kv_heads * head_dim
    add("token_embd.weight", vocab, hidden, scale=1.0)
    add("output_norm.weight", hidden, ones=True)
    add("output.weight", vocab, hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, ones=True)
        add(f"blk.{i}.attn_qkv.weight", qkv, hidden)
        add(f"blk.{i}.attn_qkv.bias", qkv, scale=0.1)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden, ones=True)
        add(f"blk.{i}.ffn_up.weight", 2 * ff, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ff)
        if arch == "glm4":
            add(f"blk.{i}.post_attention_norm.weight", hidden, ones=True)
            add(f"blk.{i}.post_ffw_norm.weight", hidden, ones=True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
