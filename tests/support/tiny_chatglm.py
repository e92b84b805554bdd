"""A tiny random model folder that ships its own modeling code the way original ChatGLM2/3 folders do.

The real THUDM modeling_chatglm.py cannot be obtained here (no model hub) and may not be copied into this project, so
this writes a small stand-in with the parts of ChatGLM's interface that the loader and llm/adapters.py rely on:
config.json with model_type "chatglm" and an auto_map (loaded only with trust_remote_code), ChatGLM's config names
(num_layers, kv_channels, multi_query_group_num, padded_vocab_size, seq_length, pre_seq_len, prefix_projection),
ChatGLM's module names (transformer.embedding.word_embeddings, transformer.encoder.layers[i].self_attention.
query_key_value, transformer.output_layer) and P-Tuning v2 as ChatGLM implements it: when config.pre_seq_len is set
before loading, `transformer.prefix_encoder` (an Embedding of pre_seq_len × num_layers·2·groups·kv_channels, or with
prefix_projection an Embedding + 2-layer MLP) gives every layer learned key/value prefixes.

It computes logits (forward); it has no generation cache, so tests use it for logits only.

    folder = build_tiny_chatglm(tmp_path / "tiny-chatglm")
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support.tiny_glm import build_tokenizer

CONFIG_PY = '''
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=2, padded_vocab_size=600, hidden_size=64, num_attention_heads=4, kv_channels=16,
                 multi_query_group_num=2, ffn_hidden_size=128, seq_length=512, layernorm_epsilon=1e-5,
                 pre_seq_len=None, prefix_projection=False, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.multi_query_group_num = multi_query_group_num
        self.ffn_hidden_size = ffn_hidden_size
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        super().__init__(**kwargs)
'''

MODELING_PY = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_chatglm import ChatGLMConfig


class PrefixEncoder(nn.Module):
    """ChatGLM2/3's P-Tuning v2 prefix: (pre_seq_len) -> (pre_seq_len, num_layers * 2 * kv_width)."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
            self.trans = nn.Sequential(nn.Linear(kv_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)

    def forward(self, prefix):
        return self.trans(self.embedding(prefix)) if self.prefix_projection else self.embedding(prefix)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.groups, self.d = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
        self.query_key_value = nn.Linear(config.hidden_size, (self.heads + 2 * self.groups) * self.d)
        self.dense = nn.Linear(self.heads * self.d, config.hidden_size, bias=False)

    def forward(self, x, prefix_kv=None):
        b, t, _ = x.shape
        q, k, v = self.query_key_value(x).split([self.heads * self.d, self.groups * self.d, self.groups * self.d], -1)
        q = q.view(b, t, self.heads, self.d).transpose(1, 2)
        k = k.view(b, t, self.groups, self.d).transpose(1, 2)
        v = v.view(b, t, self.groups, self.d).transpose(1, 2)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if prefix_kv is not None:
            pk, pv = (p.to(x.dtype).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1) for p in prefix_kv)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            mask = torch.cat([torch.ones(t, pk.shape[2], dtype=torch.bool, device=x.device), mask], 1)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_hidden_size), nn.GELU(),
                                 nn.Linear(config.ffn_hidden_size, config.hidden_size))

    def forward(self, x, prefix_kv=None):
        x = x + self.self_attention(self.input_layernorm(x), prefix_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLMModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)

    def get_prompt(self, device):
        c = self.config
        kv = self.prefix_encoder(torch.arange(self.pre_seq_len, device=device))
        kv = kv.view(self.pre_seq_len, c.num_layers * 2, c.multi_query_group_num * c.kv_channels)
        kv = kv.view(self.pre_seq_len, c.num_layers * 2, c.multi_query_group_num, c.kv_channels)
        return [(kv[:, 2 * i], kv[:, 2 * i + 1]) for i in range(c.num_layers)]

    def forward(self, input_ids):
        x = self.embedding.word_embeddings(input_ids)
        prompts = self.get_prompt(input_ids.device) if self.pre_seq_len else [None] * len(self.encoder.layers)
        for layer, prefix in zip(self.encoder.layers, prompts):
            x = layer(x, prefix)
        return self.output_layer(self.encoder.final_layernorm(x))


class ChatGLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.transformer(input_ids))
'''


def build_tiny_chatglm(folder: Path, *, seed: int = 0, num_layers: int = 2) -> Path:
    """Write the code files, a config.json with auto_map, random weights (fixed seed) and a GLM-style tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_chatglm.py").write_text(CONFIG_PY, encoding="utf-8")
    (folder / "modeling_chatglm.py").write_text(MODELING_PY, encoding="utf-8")
    tokenizer = build_tokenizer()
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": num_layers, "padded_vocab_size": len(tokenizer), "hidden_size": 64, "num_attention_heads": 4,
        "kv_channels": 16, "multi_query_group_num": 2, "ffn_hidden_size": 128, "seq_length": 512,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_ptuning_v2_checkpoint(base: Path, out: Path, *, pre_seq_len: int = 4, prefix_projection: bool = False,
                               seed: int = 1, safetensors: bool = False) -> Path:
    """A checkpoint as ChatGLM's ptuning/main.py saves it: the model's config.json with pre_seq_len and
    prefix_projection, and a weights file holding only transformer.prefix_encoder.* (random here, fixed seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base, trust_remote_code=True, local_files_only=True)
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, prefix_projection
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k.startswith("transformer.prefix_encoder.")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"))
    else:
        torch.save(state, out / "pytorch_model.bin")
    return out
