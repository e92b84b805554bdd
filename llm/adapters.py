"""Fine-tuned adapters on top of the base model: `llm.adapter` (a folder) and `llm.adapter_merge`.

Three formats, recognised from the folder's files:

- **LoRA** (peft: adapter_config.json with peft_type LORA + adapter_model.safetensors). Applied with
  `PeftModel.from_pretrained` on CPU and on CUDA, over bf16/fp16/fp32 weights or over bitsandbytes nf4/int8 weights
  (QLoRA-style inference: the LoRA matrices run in the compute dtype beside the quantized base).
  `llm.adapter_merge: true` folds the LoRA into the base weights (`merge_and_unload`: no extra matmuls per token);
  only possible on unquantized weights.
- **peft prefix tuning** (peft_type PREFIX_TUNING): learned key/value prefixes, for transformers-native classes
  (GlmForCausalLM, Glm4ForCausalLM, Qwen2...), which take them as a past-key-value cache.
- **P-Tuning v2** as the ChatGLM fine-tuning scripts save it (ptuning/main.py): config.json with `pre_seq_len`
  (and `prefix_projection`) + pytorch_model.bin or model.safetensors holding `transformer.prefix_encoder.*`.
  Only for original ChatGLM folders (`llm.trust_remote_code: true`), whose modeling code builds a prefix encoder
  when `config.pre_seq_len` is set before loading; the checkpoint is read with `torch.load(weights_only=True)`
  (tensors only, never arbitrary pickled objects).

Combinations that cannot work are refused before the base model is loaded, with the reason (merging into quantized
weights, merging a prefix, P-Tuning v2 on a native class, peft prefix tuning on remote code, a projected prefix
encoder under bitsandbytes); an adapter trained for another base model fails with one sentence naming the first
mismatching tensor.

    adapter = read_adapter(Path("lora-law"))                   # Adapter(kind="lora", ...)
    check_combination(adapter, remote_code=False, quantization="nf4", merge=False)
    config = prepare_base_config(adapter, config)              # P-Tuning v2: pre_seq_len before loading
    model = apply_adapter(model, adapter, merge=False)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm.types import LLMError

AdapterKind = Literal["lora", "prefix_tuning", "ptuning_v2"]
_PEFT_KINDS = {"LORA": "lora", "PREFIX_TUNING": "prefix_tuning"}
_PTUNING_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_PREFIX_KEY = "transformer.prefix_encoder."


class AdapterError(LLMError):
    """The adapter folder is unusable, does not fit the base model, or cannot work in this combination."""


@dataclass(frozen=True)
class Adapter:
    path: Path
    kind: AdapterKind
    config: dict[str, Any] = field(default_factory=dict)    # adapter_config.json, or the P-Tuning v2 config.json

    @property
    def label(self) -> str:
        return {"lora": "LoRA", "prefix_tuning": "prefix tuning", "ptuning_v2": "P-Tuning v2"}[self.kind]


def read_adapter(folder: Path) -> Adapter:
    """Recognise the adapter format of `folder` (no weights are read yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"llm.adapter: folder {folder} does not exist; set llm.adapter to the folder holding "
                           f"adapter_config.json (peft) or the P-Tuning v2 checkpoint, or to \"\" for none")
    peft_cfg = folder / "adapter_config.json"
    if peft_cfg.is_file():
        cfg = _read_json(peft_cfg)
        kind = _PEFT_KINDS.get(str(cfg.get("peft_type", "")).upper())
        if kind is None:
            raise AdapterError(f"llm.adapter: {peft_cfg} has peft_type {cfg.get('peft_type')!r}; supported are "
                               f"LORA and PREFIX_TUNING (and P-Tuning v2 checkpoints of the ChatGLM scripts)")
        if not any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
            raise AdapterError(f"llm.adapter: {folder} has adapter_config.json but no adapter_model.safetensors; "
                               f"copy the whole adapter folder that peft's save_pretrained wrote")
        return Adapter(folder, kind, cfg)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if cfg.get("pre_seq_len"):
            if not any((folder / n).is_file() for n in _PTUNING_WEIGHTS):
                raise AdapterError(f"llm.adapter: {folder} looks like a P-Tuning v2 checkpoint (config.json has "
                                   f"pre_seq_len) but holds neither pytorch_model.bin nor model.safetensors")
            return Adapter(folder, "ptuning_v2", cfg)
    raise AdapterError(f"llm.adapter: {folder} is neither a peft adapter (adapter_config.json) nor a P-Tuning v2 "
                       f"checkpoint (config.json with pre_seq_len + pytorch_model.bin); point it at such a folder")


def check_combination(adapter: Adapter, *, remote_code: bool, quantization: str, merge: bool) -> None:
    """Refuse what cannot work, before the (slow) base model load. `remote_code`: the folder ships its own code."""
    quantized = quantization in ("nf4", "int8")
    if merge and adapter.kind != "lora":
        raise AdapterError(f"llm.adapter_merge: a {adapter.label} adapter adds learned prefix tokens instead of "
                           f"changing weights, so there is nothing to merge; set llm.adapter_merge: false")
    if merge and quantized:
        raise AdapterError(f"llm.adapter_merge: a LoRA cannot be merged into {quantization} (bitsandbytes) weights "
                           f"without losing precision; set llm.quantization: none to merge, or llm.adapter_merge: "
                           f"false to run the LoRA beside the quantized weights (QLoRA-style)")
    if adapter.kind == "ptuning_v2" and not remote_code:
        raise AdapterError(f"llm.adapter: {adapter.path} is a P-Tuning v2 checkpoint, which needs the original "
                           f"ChatGLM modeling code (a folder with model_type chatglm and llm.trust_remote_code: true) "
                           f"to build its prefix encoder; for a transformers-native GLM folder train a peft "
                           f"prefix-tuning or LoRA adapter instead")
    if adapter.kind == "prefix_tuning" and remote_code:
        raise AdapterError(f"llm.adapter: {adapter.path} is a peft prefix-tuning adapter; it is supported on "
                           f"transformers-native model classes only, and this model folder runs its own code; use "
                           f"the model code's own P-Tuning v2 (pre_seq_len) checkpoint, a LoRA, or a native GLM folder")
    if adapter.kind == "ptuning_v2" and adapter.config.get("prefix_projection") and quantized:
        raise AdapterError(f"llm.adapter: the P-Tuning v2 checkpoint {adapter.path} has a prefix projection "
                           f"(prefix_projection: true), whose layers bitsandbytes would quantize before the checkpoint "
                           f"is loaded; set llm.quantization: none")


def prepare_base_config(adapter: Adapter | None, config: Any) -> Any:
    """The base model's config as the adapter needs it: P-Tuning v2 sets pre_seq_len / prefix_projection, which the
    ChatGLM code reads when it builds the model."""
    if adapter is not None and adapter.kind == "ptuning_v2":
        config.pre_seq_len = int(adapter.config["pre_seq_len"])
        config.prefix_projection = bool(adapter.config.get("prefix_projection", False))
    return config


def apply_adapter(model: Any, adapter: Adapter, *, merge: bool = False) -> Any:
    """The model with the adapter applied (a PeftModel, the merged base model, or the base with its prefix encoder
    loaded). Raises AdapterError with one sentence when the adapter does not fit this base model."""
    if adapter.kind == "ptuning_v2":
        return _load_ptuning_v2(model, adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError("llm.adapter is set but the peft package is not installed; run "
                           "`pip install peft==0.21.2` (pinned in requirements.txt)") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(_mismatch(adapter, model, e)) from None
    peft_model.eval()
    if adapter.kind == "prefix_tuning":
        _check_prefix_fits(peft_model, adapter)
    if merge:
        return peft_model.merge_and_unload()
    return peft_model


def describe(adapter: Adapter, merged: bool) -> str:
    """For ModelInfo.name: "+lora-law (LoRA, merged)"."""
    return f"+{adapter.path.name} ({adapter.label}{', merged' if merged else ''})"


# --- P-Tuning v2 ---------------------------------------------------------------------------------------------------
def _load_ptuning_v2(model: Any, adapter: Adapter) -> Any:
    encoder = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
    if encoder is None:
        raise AdapterError(f"llm.adapter: this model's code built no prefix encoder for pre_seq_len="
                           f"{adapter.config['pre_seq_len']} (no transformer.prefix_encoder), so the P-Tuning v2 "
                           f"checkpoint {adapter.path} cannot be applied; use the ChatGLM2/3 modeling code it was "
                           f"trained with")
    state = _read_prefix_state(adapter.path)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AdapterError(_mismatch(adapter, model, e)) from None
    encoder.float()                 # as the ChatGLM scripts do: the prefix encoder runs in fp32
    return model


def _read_prefix_state(folder: Path) -> dict[str, Any]:
    import torch

    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(folder / "model.safetensors"))
    else:
        try:
            raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable or non-tensor pickle: one sentence
            raise AdapterError(f"llm.adapter: {folder / 'pytorch_model.bin'} cannot be read as plain tensors "
                               f"({type(e).__name__}); only weight files are loaded, never pickled code") from None
    state = {k[len(_PREFIX_KEY):]: v for k, v in raw.items() if k.startswith(_PREFIX_KEY)}
    if not state:
        raise AdapterError(f"llm.adapter: the checkpoint in {folder} has no transformer.prefix_encoder.* tensors, so "
                           f"it is not a P-Tuning v2 checkpoint; its tensors start with "
                           f"{sorted({k.split('.')[0] for k in raw})[:3]}")
    return state


# --- checks and messages -------------------------------------------------------------------------------------------
def _check_prefix_fits(peft_model: Any, adapter: Adapter) -> None:
    """A prefix built for another base model loads without complaint and fails at the first question; run one token
    now so that the mismatch is reported at start."""
    import torch

    cfg = adapter.config
    expected = _expected_prefix_shape(peft_model, cfg)
    got = {k: cfg.get(k) for k in expected}
    if expected and got != expected:
        raise AdapterError(
            f"llm.adapter: the prefix-tuning adapter {adapter.path} does not fit this base model: it was made for "
            f"{got['num_layers']} layers × {got['token_dim']} key/value width ({got['num_attention_heads']} heads), "
            f"this model needs {expected['num_layers']} layers × {expected['token_dim']} "
            f"({expected['num_attention_heads']} heads); use an adapter trained on this base model")
    try:
        device = next(p.device for p in peft_model.parameters())
        with torch.no_grad():
            peft_model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    except (RuntimeError, ValueError, IndexError) as e:
        raise AdapterError(
            f"llm.adapter: the prefix-tuning adapter {adapter.path} does not fit this base model (it was made for "
            f"{cfg.get('num_layers')} layers × {cfg.get('token_dim')} key/value width; running it failed: "
            f"{_first_line(e)}); use an adapter trained on this base model") from None


def _expected_prefix_shape(peft_model: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """num_layers / token_dim / num_attention_heads that peft derives for this base model ({} when unknown).
    A prefix made for another depth or width loads silently and then changes answers in undefined ways."""
    try:
        from peft import PrefixTuningConfig
        from peft.utils.other import _prepare_prompt_learning_config

        fresh = PrefixTuningConfig(num_virtual_tokens=int(cfg.get("num_virtual_tokens") or 1), task_type="CAUSAL_LM")
        fresh = _prepare_prompt_learning_config(fresh, peft_model.get_base_model().config)
    except Exception:  # noqa: BLE001 - peft internals moved: fall back to the forward check alone
        return {}
    return {"num_layers": fresh.num_layers, "token_dim": fresh.token_dim,
            "num_attention_heads": fresh.num_attention_heads}


_SIZE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) from "
                   r"checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")


def _mismatch(adapter: Adapter, model: Any, e: BaseException) -> str:
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or "the base model"
    text = str(e)
    m = _SIZE.search(text)
    if m:
        name = m.group(1).replace("base_model.model.", "")
        return (f"llm.adapter: the {adapter.label} adapter {adapter.path} was trained for a different base model: "
                f"{name} has shape {_shape(m.group(2))} in the adapter but {_shape(m.group(3))} in {base}; use "
                f"the adapter made for this llm.model, or the base model it was made for "
                f"({adapter.config.get('base_model_name_or_path') or 'see its config'})")
    if "not found in the base model" in text or "Target module" in text:
        return (f"llm.adapter: the {adapter.label} adapter {adapter.path} targets layers that {base} does not have "
                f"({_first_line(e)}); it was trained for another model architecture")
    return f"llm.adapter: the {adapter.label} adapter {adapter.path} cannot be applied to {base}: {_first_line(e)}"


def _shape(torch_size: str) -> str:
    return "×".join(re.findall(r"\d+", torch_size)) or "()"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"llm.adapter: {path} cannot be read as JSON ({e}); copy the adapter folder again") \
            from None
    if not isinstance(data, dict):
        raise AdapterError(f"llm.adapter: {path} must hold a JSON object")
    return data
