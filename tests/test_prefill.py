"""llm.cpu_prefill: transformers reads the prompt, llama.cpp writes the answer (llm/prefill.py).

Real llama.cpp, real transformers, the demo pack's Qwen2.5-Coder-0.5B (its bf16 transformers folder and its Q4_K_M
GGUF, the same model) and tiny random GGUF files. Which engine is faster is measured, not asserted
(docs/benchmarks.md §8h); what is tested is that the hand-over gives llama.cpp exactly what it would have read
itself, that a wrong folder or a failure falls back to llama.cpp with a reason, and that the answer never breaks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from configs import load_settings
from llm import GenerationParams, load_llm
from llm.prefill import shared_start
from tests.conftest import require_model
from tests.support.tiny_gguf import GLM4_TEMPLATE, write_tiny_glm_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")

GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
MODEL = "qwen2.5-coder-0.5b-instruct"


def chat(passage: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "你是知问助手，只根据已知信息回答。"},
            {"role": "user", "content": f"已知信息：\n{passage}\n\n根据上述已知信息，简洁地回答问题。"
                                        f"问题是：{question}"}]


def answer(model, messages) -> str:
    return "".join(model.stream(messages, GREEDY))


def same_answer(a: str, b: str) -> bool:
    """The greedy answers of one model from two prompt readings: bf16 and llama.cpp's own arithmetic differ in the
    last bits, so a near-tie far into an answer may go either way (on another CPU's kernels too); the start and
    most characters agree."""
    from bench.eval.metrics import char_f1

    return bool(a.strip()) and a[:4] == b[:4] and char_f1(a, ((b,),)) >= 0.6


def prompt_cosine(handed, plain, n: int) -> float:
    """The worst per-layer mean cosine between the keys/values of the first n prompt tokens in the two contexts."""
    from llm.prefill import get_state, parse_state, worst_cosine

    layers = handed.prefill.layout.n_layer
    _, ours = parse_state(get_state(handed.llama), layers)
    _, theirs = parse_state(get_state(plain.llama), layers)
    return worst_cosine([*ours.keys, *ours.values], [*theirs.keys, *theirs.values], n)


@pytest.fixture(scope="module")
def passages(cmrc_trial):
    data = json.loads(cmrc_trial.read_text(encoding="utf-8"))["data"]
    return [(a["paragraphs"][0]["context"], a["paragraphs"][0]["qas"][0]["question"]) for a in data[:3]]


@pytest.fixture(scope="module")
def engines(models_dir):
    """The same GGUF twice: llama.cpp reading prompts itself, and transformers reading them for it."""
    require_model(models_dir, MODEL)

    def load(mode: str):
        return load_llm(load_settings(paths={"models_dir": str(models_dir)},
                                      llm={"model": MODEL, "backend": "llamacpp", "max_context_tokens": 2048,
                                           "cpu_prefill": mode, "use_cpu_copy": False, "prompt_cache_mb": 0}))

    plain, handed = load("llamacpp"), load("transformers")
    yield plain, handed
    plain.close()
    handed.close()


def test_state_format_round_trips_a_real_llama_cpp_state(tmp_path):
    """parse_state reads what llama.cpp wrote (GLM-4 architecture here), and build_state writes it back byte for
    byte: the format is learned from llama.cpp, not assumed."""
    from llm.prefill import build_state, get_state, parse_state

    model = load_llm(load_settings(llm={"model": str(write_tiny_glm_gguf(tmp_path / "t.gguf", "glm4",
                                                                          chat_template=GLM4_TEMPLATE)),
                                        "backend": "llamacpp", "max_context_tokens": 256, "threads": 1}))
    llama = model.llama
    tokens = llama.tokenize("hello tiny glm, 你好".encode(), add_bos=False, special=False)
    llama.eval(tokens)
    data = get_state(llama)
    layout, state = parse_state(data, n_layer=2)
    assert list(state.positions) == list(range(len(tokens)))
    assert layout.k_width == layout.v_width == 2 * 16 and len(state.keys) == len(state.values) == 2
    assert build_state(layout, state.keys, state.values) == data
    with pytest.raises(ValueError):
        parse_state(data + b"\0", n_layer=2)                  # bytes left over: not the layout it thinks
    with pytest.raises(ValueError):
        parse_state(data, n_layer=3)
    model.close()


def test_llama_cpp_answers_the_same_from_a_prompt_read_by_transformers(engines, passages):
    """llama.cpp's cache after the hand-over holds the keys and values llama.cpp computes itself for the prompt
    (bf16 of the same model, handed over as f16 as llama.cpp stores its own), and the greedy answers agree; the
    page says which engine read the prompt."""
    plain, handed = engines
    assert handed.prefill is not None and handed.info.prefill == "transformers bf16"
    assert "transformers" in handed.info.engine and plain.info.engine == "llama.cpp"
    assert plain.prefill is None
    (p1, q1), (p2, q2), _ = passages
    previous: list[int] = []
    for messages in (chat(p1, q1), chat(p2, q2)):
        before = handed.prefill.tokens_read
        ours = answer(handed, messages)
        tokens = handed.encode_messages(messages)
        n, shared = len(tokens), shared_start(previous, tokens)     # the system text stays in llama.cpp's cache
        assert handed.prefill.tokens_read - before == n - 1 - shared
        previous = tokens
        assert same_answer(ours, answer(plain, messages))
        assert prompt_cosine(handed, plain, n - 1) > 0.99
    assert handed.prefill.fallbacks == 0


def test_a_prompt_that_starts_like_the_last_one_reads_only_the_rest(engines, passages):
    """The start llama.cpp already holds goes back into transformers' cache, so only the rest is read — and the
    answer is still llama.cpp's own."""
    plain, handed = engines
    (p1, q1), (p2, _), (p3, q3) = passages
    first = chat(p1 + "\n\n" + p2, q1)
    answer(handed, first)
    follow = chat(p1 + "\n\n" + p3, q3)                           # same system text and first passage
    shared = shared_start(handed.encode_messages(first), handed.encode_messages(follow))
    assert shared > 100
    before = handed.prefill.tokens_read
    ours = answer(handed, follow)
    n = handed.count_prompt_tokens(follow)
    assert handed.prefill.tokens_read - before == n - 1 - shared
    assert same_answer(ours, answer(plain, follow))
    assert prompt_cosine(handed, plain, n - 1) > 0.99


def test_a_failed_hand_over_falls_back_to_llama_cpp(engines, passages, monkeypatch):
    """Whatever goes wrong in the hand-over (here llama.cpp refuses the state), llama.cpp reads the prompt itself
    and the answer is the same; the failure is counted and logged, never raised."""
    import llm.prefill as prefill

    plain, handed = engines
    monkeypatch.setattr(prefill, "build_state", lambda layout, k, v: b"not a state")
    p, q = passages[2]
    before = handed.prefill.fallbacks
    assert answer(handed, chat(p, q)) == answer(plain, chat(p, q))      # llama.cpp read both: the same arithmetic
    assert handed.prefill.fallbacks == before + 1


def test_a_folder_of_another_model_is_not_used(models_dir, tmp_path, monkeypatch):
    """The transformers folder beside the GGUF must give the GGUF's keys and values on a probe text: here the
    same weights with another rotary base (so other keys) — the engine says why and llama.cpp reads prompts. And
    auto leaves it off on a CPU without bf16 units (flags replaced here: CI's CPU may have them or not)."""
    import llm.llamacpp_backend as backend

    src = require_model(models_dir, MODEL)
    other = tmp_path / "models" / MODEL
    other.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (other / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["rope_theta"] = 10.0
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"]["rope_theta"] = 10.0
    (other / "config.json").write_text(json.dumps(config), encoding="utf-8")

    def load(mode: str):
        return load_llm(load_settings(paths={"models_dir": str(tmp_path / "models")},
                                      llm={"model": MODEL, "backend": "llamacpp", "max_context_tokens": 512,
                                           "cpu_prefill": mode, "use_cpu_copy": False}))

    model = load("transformers")
    assert model.prefill is None and model.info.engine == "llama.cpp"
    assert any("not the same model" in n for n in model.info.notes)
    assert answer(model, chat("知问是一个问答系统。", "知问是什么？")).strip()
    model.close()

    monkeypatch.setattr(backend, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    model = load("auto")
    assert model.prefill is None and not model.info.notes            # auto: silently off without bf16 units
    model.close()


def test_no_folder_or_no_memory_gives_a_reason(models_dir, tmp_path, monkeypatch):
    """cpu_prefill: transformers without a transformers folder beside the GGUF, or without the memory for its
    weights, says so and answers with llama.cpp alone."""
    import llm.llamacpp_backend as backend

    src = require_model(models_dir, MODEL)
    lone = tmp_path / "lone"
    lone.mkdir()
    gguf = next(src.glob("*.gguf"))
    (lone / gguf.name).symlink_to(gguf)
    settings = {"backend": "llamacpp", "max_context_tokens": 512, "cpu_prefill": "transformers",
                "use_cpu_copy": False}
    model = load_llm(load_settings(llm={"model": str(lone), **settings}))
    assert model.prefill is None and any("config.json and *.safetensors" in n for n in model.info.notes)
    model.close()

    monkeypatch.setattr(backend, "PREFILL_ACTIVATION_BYTES", 1 << 50)
    model = load_llm(load_settings(paths={"models_dir": str(models_dir)}, llm={"model": MODEL, **settings}))
    assert model.prefill is None and any("not enough free memory" in n for n in model.info.notes)
    model.close()


def test_the_state_codec_handles_both_value_layouts():
    """Values stored per token (llama.cpp with flash attention) or per element across tokens (without): both
    round-trip, and a cache type other than f16 is refused with the reason."""
    import struct

    from llm.prefill import StateFormatError, StateLayout, build_state, parse_state

    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((5, 8)).astype(np.float16) for _ in range(3)]
    values = [rng.standard_normal((5, 8)).astype(np.float16) for _ in range(3)]
    for trans in (True, False):
        layout = StateLayout(header=struct.pack("<IiI", 0xAF143CD8, 0, 1), n_layer=3, k_width=8, v_width=8,
                             v_trans=trans)
        data = build_state(layout, keys, values)
        back_layout, state = parse_state(data, 3)
        assert back_layout == layout and list(state.positions) == [0, 1, 2, 3, 4]
        assert all(np.array_equal(a, b) for a, b in zip(state.values, values, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(state.keys, keys, strict=True))
    bad = bytearray(data)
    off = 16 + 12 * 5 + 8
    bad[off:off + 4] = struct.pack("<i", 0)                         # an f32 key cache
    with pytest.raises(StateFormatError, match="key cache type"):
        parse_state(bytes(bad), 3)
