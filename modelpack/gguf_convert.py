"""Convert a GGUF checkpoint (qwen2 architecture) once into a bf16 safetensors Hugging Face folder.

transformers can load GGUF directly (`from_pretrained(dir, gguf_file=...)`) but dequantizes the whole model on every
load (over a minute for 0.5B) and peaks at many GB. Here the conversion is done once, tensor by tensor:

  * config and tokenizer come from transformers' own GGUF reader (metadata only, cheap), so the chat template,
    special tokens and rope settings are exactly what transformers would use;
  * tensor names are mapped with gguf-py's TensorNameMap (the same table transformers uses); qwen2 needs no q/k
    permutation (transformers' TENSOR_PROCESSORS only un-permutes the `llama` architecture);
  * each tensor is dequantized in row slices from the memory-mapped file, cast to bf16 and written into shards of
    at most `max_shard_bytes`, so peak memory is about one shard plus one tensor, whatever the model size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_ARCHITECTURES = ("qwen2",)
DEFAULT_SHARD_BYTES = 1_000_000_000     # "≤ 1 GB" shards: bounds peak memory during conversion and loading
ROWS_PER_SLICE = 4096           # rows dequantized at once: bounds the float32 temporaries (~25 MB at hidden 1536)


class GGUFConvertError(ValueError):
    """The GGUF file cannot be converted; the message names the file and the reason."""


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    nbytes: int


def _architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFConvertError("the GGUF file has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def dequantize_rows(tensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a GGUF tensor (as laid out by gguf's reader: rows first) as float32."""
    from gguf import dequantize
    arr = np.asarray(dequantize(tensor.data[start:stop], tensor.tensor_type), dtype=np.float32)
    return arr if arr.flags.writeable else arr.copy()       # F32 tensors come back as read-only views of the file


def _load_meta(gguf_path: Path):
    """(config, tokenizer, meta-device model) built by transformers from the GGUF metadata only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, tokenizer, model


def plan_tensors(reader, model, n_layers: int) -> list[_Planned]:
    """GGUF tensor -> HF parameter (name, shape), checked against the model built from the same config."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    name_map = get_tensor_name_map(MODEL_ARCH.QWEN2, n_layers)
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gguf_to_hf = {}
    for hf_name in hf_shapes:
        base, _, suffix = hf_name.rpartition(".")
        g = name_map.get_name(base)
        if g is not None:
            gguf_to_hf[f"{g}.{suffix}"] = hf_name
    plan, seen = [], set()
    for t in reader.tensors:
        hf = gguf_to_hf.get(t.name)
        if hf is None:
            raise GGUFConvertError(f"GGUF tensor {t.name!r} has no counterpart in {type(model).__name__}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))     # GGUF lists dims innermost first
        if len(shape) == 2 and shape[0] == 1 and len(hf_shapes[hf]) == 1:
            shape = shape[1:]
        if shape != hf_shapes[hf]:                                         # a transposed tensor fails here too
            raise GGUFConvertError(f"GGUF tensor {t.name} has shape {shape}, {hf} expects {hf_shapes[hf]}")
        plan.append(_Planned(t.name, hf, hf_shapes[hf], int(np.prod(hf_shapes[hf])) * 2))
        seen.add(hf)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(hf_shapes) - seen - tied)
    if missing:
        raise GGUFConvertError(f"the GGUF file lacks tensors for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return plan


def _shards(plan: list[_Planned], max_bytes: int) -> list[list[_Planned]]:
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def convert_gguf(gguf_path: Path, out_dir: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 show_progress: bool = True) -> Path:
    """Write config.json, generation_config.json, tokenizer files (with the chat template) and bf16 safetensors
    shards for `gguf_path` into out_dir (created; the caller renames it into place)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    gguf_path = Path(gguf_path)
    reader = GGUFReader(gguf_path)           # memory-mapped: tensors are read only when sliced
    arch = _architecture(reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConvertError(f"{gguf_path}: architecture {arch!r} is not supported (only {SUPPORTED_ARCHITECTURES})")
    config, tokenizer, meta_model = _load_meta(gguf_path)
    plan = plan_tensors(reader, meta_model, config.num_hidden_layers)
    del meta_model
    tensors = {t.name: t for t in reader.tensors}

    out_dir.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.bfloat16
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings     # GGUF carries no limit; the model's own
    tokenizer.save_pretrained(out_dir)
    eos = [i for i in dict.fromkeys([tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
                                    + [tokenizer.eos_token_id]) if isinstance(i, int) and i != tokenizer.unk_token_id]
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[-1]
                     ).save_pretrained(out_dir)

    shards = _shards(plan, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    bar = tqdm(total=sum(p.nbytes for p in plan), desc=f"converting {gguf_path.name}", unit="B", unit_scale=True,
               leave=False, disable=not show_progress or None)
    for shard, fname in zip(shards, names, strict=False):
        state = {}
        for p in shard:
            t = tensors[p.gguf_name]
            rows = t.data.shape[0] if t.data.ndim > 1 else None
            if rows is None:
                arr = dequantize_rows(t, 0, t.data.shape[0]).reshape(p.shape)
                state[p.hf_name] = torch.from_numpy(arr).to(torch.bfloat16)
            else:
                out = torch.empty(p.shape, dtype=torch.bfloat16)
                flat = out.view(rows, -1)
                for s in range(0, rows, ROWS_PER_SLICE):
                    e = min(s + ROWS_PER_SLICE, rows)
                    flat[s:e] = torch.from_numpy(dequantize_rows(t, s, e).reshape(e - s, -1))
                state[p.hf_name] = out
            weight_map[p.hf_name] = fname
            total += p.nbytes
            bar.update(p.nbytes)
        save_file(state, str(out_dir / fname), metadata={"format": "pt"})
        del state
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out_dir / "README.md").write_text(
        f"# {out_dir.name.removesuffix('.part')} (Zhiwen model pack)\n\n"
        f"Converted by `python -m modelpack pull` from `{gguf_path.name}` (Q4_K_M GGUF, architecture {arch}),\n"
        "dequantized to bf16. The weights are Qwen2.5-Coder-Instruct (Apache-2.0). Load with\n"
        "`AutoModelForCausalLM.from_pretrained(folder)`; the chat template is in the tokenizer files.\n",
        encoding="utf-8",
    )
    return out_dir


# ------------------------------------------------------------------------------------------- checks (verify --deep)
CAPITAL_QUESTION = "中国的首都是哪里？"
REFERENCE_MAX_BYTES = 700 << 20     # transformers' own GGUF loading of bigger files needs more RAM than we allow


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy reply to `question` through the folder's own chat template."""
    import torch
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def compare_with_transformers_gguf(folder: Path, gguf_path: Path, prompt: str = CAPITAL_QUESTION) -> dict:
    """Load `folder` and transformers' own `from_pretrained(dir, gguf_file=...)` (both bf16) and compare every
    weight, the prompt's logits and the greedy continuation. Returns the numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(folder)
    ref_sd = ref.state_dict()
    weight_mismatch = [k for k, v in ours.state_dict().items() if not torch.equal(v, ref_sd[k])]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        a = ours(**ids).logits.float()
        b = ref(**ids).logits.float()
    text_ours = greedy_answer(ours, tok, prompt)
    text_ref = greedy_answer(ref, tok, prompt)
    return {"weights_differing": weight_mismatch, "max_abs_logit_diff": float((a - b).abs().max()),
            "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
            "greedy_ours": text_ours, "greedy_reference": text_ref}


def deep_check(folder: Path, sources: list[Path]) -> tuple[bool, str]:
    """`verify --deep` for a converted qwen folder: the capital question, plus (for GGUF files small enough)
    an exact comparison with transformers' own GGUF loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines, ok = [], True
    gguf_path = sources[0]
    if gguf_path.is_file() and gguf_path.stat().st_size <= REFERENCE_MAX_BYTES:
        r = compare_with_transformers_gguf(folder, gguf_path)
        same = not r["weights_differing"] and r["same_argmax"] and r["greedy_ours"] == r["greedy_reference"]
        ok &= same
        lines.append(f"vs transformers' GGUF loader: {'identical' if same else 'DIFFERENT'} — weights differing "
                     f"{len(r['weights_differing'])}, max |logit diff| {r['max_abs_logit_diff']:.4g}, "
                     f"same argmax {r['same_argmax']}, greedy {r['greedy_ours']!r} vs {r['greedy_reference']!r}")
    else:
        lines.append(f"comparison with transformers' GGUF loader skipped ({gguf_path.name} over "
                     f"{REFERENCE_MAX_BYTES >> 20} MB or missing: that loader would need several GB)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(folder)
    answer = greedy_answer(model, tok, CAPITAL_QUESTION)
    has = "北京" in answer
    lines.append(f"{CAPITAL_QUESTION} -> {answer!r} ({'contains' if has else 'does NOT contain'} 北京)")
    ok &= has
    return ok, "\n".join(lines)
