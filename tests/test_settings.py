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


# --- one source for every default ------------------------------------------------------------------------------------
def _section_fields():
    for section, field in Settings.model_fields.items():
        yield section, field, field.annotation.model_fields


def test_no_setting_has_a_default_in_code():
    """configs/default.yaml is the only place a default lives: a field default here would be a second source that
    can drift from it (and would let a default pass while the YAML is never read)."""
    for section, field, keys in _section_fields():
        assert field.is_required(), f"Settings.{section} has a default in code; defaults belong in default.yaml"
        with_default = [k for k, f in keys.items() if not f.is_required()]
        assert not with_default, f"{section}: {with_default} have defaults in configs/settings.py; move them to " \
                                 f"configs/default.yaml"
    from pydantic import Field

    from configs.settings import _Section

    with pytest.raises(TypeError, match=r"^Extra: limit must not have a default in code; write the default in "):
        class Extra(_Section):
            limit: int = Field(3, gt=0)


def test_default_yaml_is_read_and_every_key_is_needed(tmp_path, monkeypatch):
    """The loaded defaults are the YAML's: change a value in a copy and it changes; drop a key and start fails."""
    import configs.settings as cs

    raw = yaml.safe_load(cs.DEFAULT_YAML.read_text(encoding="utf-8"))
    raw["ingest"]["chunk_size"] = 321
    raw["llm"]["temperature"] = 0.7
    copy = tmp_path / "default.yaml"
    copy.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(cs, "DEFAULT_YAML", copy)
    s = load_settings(profile="")
    assert (s.ingest.chunk_size, s.llm.temperature) == (321, 0.7)

    del raw["retrieval"]["top_k"]
    copy.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(SettingsError, match=r"^retrieval.top_k: missing \(every setting needs its default in "):
        load_settings(profile="")


def test_readme_reference_names_every_setting():
    """Each key of default.yaml has a row in README's configuration reference (`section.key` or, in a row that
    starts with `section.a`, a later `b`)."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        tokens = [t for t in first_cell.split("`")[1::2]]
        section = tokens[0].split(".")[0]
        named |= {t if "." in t else f"{section}.{t}" for t in tokens}
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
    keys = {f"{s}.{k}" for s, sub in raw.items() for k in sub}
    assert not keys - named, f"add rows for {sorted(keys - named)} to README's configuration reference"


# --- the layers, in order -------------------------------------------------------------------------------------------
def test_layers_merge_key_by_key_in_order(tmp_path, monkeypatch):
    """default.yaml < profile < --config file < ZHIWEN_* < keyword overrides; each layer sets only some keys."""
    f = tmp_path / "site.yaml"
    f.write_text("llm:\n  max_new_tokens: 64\n  top_p: 0.5\nretrieval:\n  top_k: 7\n", encoding="utf-8")
    s = load_settings(path=f, profile="test")
    assert s.llm.demo_model == "qwen2.5-coder-0.5b-instruct"      # profile
    assert (s.llm.max_new_tokens, s.llm.top_p) == (64, 0.5)        # file beats profile
    assert s.llm.quantization == "nf4" and s.ingest.workers == 2   # default.yaml / profile keys stay
    monkeypatch.setenv("ZHIWEN_LLM__MAX_NEW_TOKENS", "32")
    monkeypatch.setenv("ZHIWEN_RETRIEVAL", '{"top_k": 3}')
    s = load_settings(path=f, profile="test")
    assert (s.llm.max_new_tokens, s.llm.top_p, s.retrieval.top_k) == (32, 0.5, 3)   # env beats the file
    assert s.retrieval.fetch_k == 50                               # a JSON section merges, it does not replace
    s = load_settings(path=f, profile="test", llm={"max_new_tokens": 16})
    assert (s.llm.max_new_tokens, s.llm.top_p) == (16, 0.5)        # code beats env, other keys untouched
    monkeypatch.setenv("ZHIWEN_CONFIG", str(f))
    monkeypatch.setenv("ZHIWEN_PROFILE", "test")
    s = load_settings()
    assert (s.llm.demo_model, s.llm.top_p) == ("qwen2.5-coder-0.5b-instruct", 0.5)  # by variables
    assert load_settings(path=tmp_path / "site.yaml").llm.top_p == 0.5


# --- the environment is checked like a file ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("ZHIWEN_FOO", "1", "ZHIWEN_FOO names no setting (foo: the sections are app, embedding"),
        ("ZHIWEN_LLM__DEVCE", "cpu",
         "ZHIWEN_LLM__DEVCE names no setting (llm.devce: llm has adapter, adapter_merge, backend"),
        ("zhiwen_ingest__chunk_sise", "300", "zhiwen_ingest__chunk_sise names no setting (ingest.chunk_sise"),
        ("ZHIWEN_LLM__DEVICE__X", "1", "(llm.device.x: llm.device is a single value)"),
        ("ZHIWEN_LLM", "notadict", "ZHIWEN_LLM must be a JSON object"),
        ("ZHIWEN_APP__USERS", '[{"username": "alice"', "ZHIWEN_APP__USERS must be a JSON list"),
    ],
)
def test_bad_environment_variable_is_named(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_variables_that_are_not_settings_pass(monkeypatch):
    for name in ("ZHIWEN_PASSWORD_ALICE", "ZHIWEN_SAMPLE_KB", "ZHIWEN_PROGRESS", "ZHIWEN_MODEL_PACK",
                 "ZHIWEN_LLAMA_CMAKE_ARGS", "ZHIWEN_WHEEL_CACHE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("ZHIWEN_APP__USERS", '[{"username": "alice"}]')
    monkeypatch.setenv("ZHIWEN_LLM", '{"device": "cpu"}')
    s = load_settings()
    assert [u.username for u in s.app.users] == ["alice"] and s.llm.device == "cpu"


def test_config_and_profile_must_be_files(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match=r"^--config: .* is a folder; it must name a YAML settings file$"):
        load_settings(path=tmp_path)
    monkeypatch.setenv("ZHIWEN_CONFIG", str(tmp_path))
    with pytest.raises(SettingsError, match=r"^ZHIWEN_CONFIG: .* is a folder"):
        load_settings()
    monkeypatch.delenv("ZHIWEN_CONFIG")
    monkeypatch.setenv("ZHIWEN_PROFILE", "nope")
    with pytest.raises(SettingsError, match=r"^ZHIWEN_PROFILE 'nope': settings file not found: .*settings-nope.yaml"):
        load_settings()
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"must hold a mapping of sections, got list"):
        load_settings(path=not_a_mapping, profile="")


def test_code_below_configs_takes_its_defaults_from_the_settings(monkeypatch):
    """No second copy of a default in code: the LangChain splitter and the generation parameters follow settings."""
    from ingest.splitter import ChineseTextSplitter
    from llm import GenerationParams

    monkeypatch.setenv("ZHIWEN_INGEST__CHUNK_SIZE", "123")
    splitter = ChineseTextSplitter()
    assert (splitter._chunk_size, splitter._chunk_overlap) == (123, load_settings().ingest.chunk_overlap)
    assert ChineseTextSplitter(chunk_size=60, chunk_overlap=10)._chunk_size == 60
    llm = load_settings(llm={"top_p": 0.3}).llm
    assert GenerationParams.from_settings(llm) == GenerationParams(
        max_new_tokens=llm.max_new_tokens, temperature=llm.temperature, top_p=0.3,
        repetition_penalty=llm.repetition_penalty)
    with pytest.raises(TypeError):
        GenerationParams(max_new_tokens=5)  # no hidden defaults: the others come from settings.llm


def test_settings_pickle_whatever_files_they_came_from(tmp_path):
    """Parser processes receive the settings pickled (inside the Embedder), also when a profile or --config was used."""
    import pickle

    f = tmp_path / "site.yaml"
    f.write_text("retrieval:\n  top_k: 9\n", encoding="utf-8")
    for s in (load_settings(profile=""), load_settings(profile="test"), load_settings(path=f, profile="test")):
        assert type(s) is Settings
        back = pickle.loads(pickle.dumps(s))
        assert back == s and back.kb_root == s.kb_root
    assert back.retrieval.top_k == 9 and back.llm.demo_model == "qwen2.5-coder-0.5b-instruct"


def test_every_zhiwen_variable_the_project_reads_is_accepted():
    """A ZHIWEN_* variable read by code, scripts or named in the docs must be a setting or listed in OTHER_VARIABLES /
    OTHER_PREFIXES, or setting it would stop the start as an unknown setting."""
    import re

    from configs.settings import _check_environment

    names = set()
    for pattern in ("*.py", "*.sh", "*.md", "run"):
        for f in PROJECT_ROOT.rglob(pattern):
            rel = f.relative_to(PROJECT_ROOT).parts
            if rel[0] in (".venv", "models", "knowledge_base", "tests", "artifacts") or not f.is_file():
                continue
            names |= set(re.findall(r"\bZHIWEN_[A-Z0-9_]*[A-Z0-9]\b", f.read_text(encoding="utf-8", errors="replace")))
    assert {"ZHIWEN_CONFIG", "ZHIWEN_PATHS__MODELS_DIR"} <= names
    names.discard("ZHIWEN_LLM__DEVCE")  # the docs' example of a misspelt variable
    refused = []
    for name in sorted(names):
        try:
            _check_environment({name: "{}"})
        except SettingsError as e:
            refused.append(str(e))
    assert not refused, "\n".join(refused)
