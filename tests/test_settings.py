"""Settings: defaults visible in configs/default.yaml, profiles, env overrides, and errors that name the key."""
from pathlib import Path

import pytest
import yaml

from configs import PROJECT_ROOT, Settings, SettingsError, load_settings


def test_defaults_come_from_default_yaml():
    s = load_settings(profile="")
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
    assert s.ingest.chunk_size == raw["ingest"]["chunk_size"]
    assert s.embedding.model == raw["embedding"]["model"]
    assert s.llm.quantization == raw["llm"]["quantization"]
    assert s.kb_root == PROJECT_ROOT / raw["paths"]["kb_root"]


def test_every_field_has_a_default_in_yaml():
    """One source of truth: every setting of the model appears in configs/default.yaml."""
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
    for section, model in Settings.model_fields.items():
        sub = model.annotation.model_fields
        missing = set(sub) - set(raw.get(section, {}))
        assert not missing, f"{section}: {sorted(missing)} missing from default.yaml"


def test_env_overrides_yaml(monkeypatch):
    monkeypatch.setenv("ZHIWEN_LLM__DEVICE", "cpu")
    monkeypatch.setenv("ZHIWEN_INGEST__CHUNK_SIZE", "300")
    s = load_settings()
    assert s.llm.device == "cpu"
    assert s.ingest.chunk_size == 300


def test_profile_merges_over_defaults():
    s = load_settings(profile="test")
    assert s.llm.demo_model == "qwen2.5-coder-0.5b-instruct"
    assert s.llm.quantization == "nf4"  # untouched keys keep their defaults


def test_config_file(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("retrieval:\n  top_k: 9\n", encoding="utf-8")
    assert load_settings(path=f).retrieval.top_k == 9


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"ZHIWEN_LLM__QUANTIZATION": "fp8"}, "llm.quantization: Input should be 'nf4', 'int8' or 'none' (got 'fp8')"),
        ({"ZHIWEN_RETRIEVAL__TOP_K": "0"}, "retrieval.top_k: Input should be greater than 0 (got"),
        ({"ZHIWEN_INGEST__CHUNK_OVERLAP": "400"}, "chunk_overlap must be smaller than chunk_size, got 400 >= 250"),
    ],
)
def test_bad_value_names_key_and_allowed_values(monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert needle in str(e.value)


def test_unknown_key_in_file_is_rejected(tmp_path: Path):
    f = tmp_path / "typo.yaml"
    f.write_text("ingest:\n  chunk_sise: 300\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"ingest.chunk_sise: unknown setting"):
        load_settings(path=f)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(path=bad)


def test_model_path_resolution():
    s = load_settings()
    assert s.model_path("multilingual-e5-small") == s.models_dir / "multilingual-e5-small"
    assert s.model_path("/opt/chatglm3-6b") == Path("/opt/chatglm3-6b")
    assert s.model_path("sub/dir") == PROJECT_ROOT / "sub" / "dir"


def test_code_overrides_beat_environment(monkeypatch, tmp_path):
    """CI sets ZHIWEN_PATHS__MODELS_DIR; a test or tool that passes its own models_dir must still get it."""
    monkeypatch.setenv("ZHIWEN_PATHS__MODELS_DIR", "/somewhere/else")
    monkeypatch.setenv("ZHIWEN_LLM__DEVICE", "cpu")
    s = load_settings(paths={"models_dir": str(tmp_path)}, llm={"max_new_tokens": 7})
    assert s.models_dir == tmp_path
    assert s.llm.device == "cpu" and s.llm.max_new_tokens == 7  # env still applies to keys not overridden
    with pytest.raises(SettingsError, match=r"llm.max_new_tokens: Input should be greater than 0"):
        load_settings(llm={"max_new_tokens": 0})
