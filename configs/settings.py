"""One typed settings object for the whole product.

Sources, highest priority first (pydantic-settings merges them key by key, so a source may set a single key):
  0. keyword overrides passed to load_settings() by code (tests, tools), e.g. load_settings(ingest={"ocr": False})
  1. environment variables ZHIWEN_<SECTION>__<KEY> (e.g. ZHIWEN_LLM__DEVICE=cpu)
  2. the file named by load_settings(path) / --config, or else by ZHIWEN_CONFIG
  3. configs/settings-<profile>.yaml for load_settings(profile=...) or else ZHIWEN_PROFILE=<profile>
  4. configs/default.yaml

Every default lives in configs/default.yaml and nowhere else: the models below give types and limits only (no
field has a default: a section class with one fails at import), so a key missing from default.yaml fails every
start. To add a setting: a field here (type + limits, no default), the key with its
default and a comment in configs/default.yaml, and a row in README's configuration reference.

Errors are one SettingsError naming the key (or the ZHIWEN_* variable / file) and the allowed values:
    SettingsError: llm.quantization: Input should be 'nf4', 'int8' or 'none' (got 'fp8')
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource
from pydantic_settings import SettingsError as SourceError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_YAML = CONFIG_DIR / "default.yaml"
ENV_PREFIX = "ZHIWEN_"
# ZHIWEN_* variables that are not settings (anything else with the prefix must name a setting, or start is refused).
# Add yours here with the file that reads it.
OTHER_VARIABLES = {
    "ZHIWEN_CONFIG": "configs/settings.py: a settings file merged over the profile",
    "ZHIWEN_PROFILE": "configs/settings.py: configs/settings-<profile>.yaml",
    "ZHIWEN_PROGRESS": "modelpack/pack.py: 0 hides download progress bars",
    "ZHIWEN_MODEL_PACK": "scripts/setup.sh: which model pack to pull",
    "ZHIWEN_LLAMA_CMAKE_ARGS": "scripts/setup.sh: CMake flags of the llama-cpp-python build",
    "ZHIWEN_WHEEL_CACHE": "scripts/setup.sh: where built wheels are kept",
    "ZHIWEN_SAMPLE_KB": "scripts/start.sh: the sample knowledge base",
}
OTHER_PREFIXES = {
    "ZHIWEN_PASSWORD_": "app/auth.py: ZHIWEN_PASSWORD_<USERNAME>, a user's password",
}


class SettingsError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key."""


class _Entry(BaseModel):
    """An entry of a list setting (app.users, app.api_keys): its fields may have defaults (a left-out hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Section(_Entry):
    """A section of the settings: types and limits only. A default here would be a second source beside
    configs/default.yaml, so defining one fails at import, naming the field."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        with_default = [name for name, f in cls.model_fields.items() if not f.is_required()]
        if with_default:
            raise TypeError(f"{cls.__name__}: {', '.join(with_default)} must not have a default in code; write the "
                            f"default in configs/default.yaml (docs/ARCHITECTURE.md, 'Adding a setting')")


class PathsSettings(_Section):
    kb_root: Path = Field(description="Folder holding one sub-folder per knowledge base.")
    models_dir: Path = Field(description="Folder of the model pack and of user model folders.")


class EmbeddingSettings(_Section):
    model: str = Field(description="Folder name in models_dir or a path.")
    query_prefix: str
    passage_prefix: str
    device: Literal["cpu", "cuda", "auto"]
    # auto: bf16 on CPUs with AVX512-BF16/AMX, else fp32 (on CUDA too: no gain measured; docs/benchmarks.md)
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    batch_size: int = Field(gt=0)
    max_seq_length: int = Field(gt=16)


class IngestSettings(_Section):
    chunk_size: int = Field(gt=20, description="Characters per chunk.")
    chunk_overlap: int = Field(ge=0)
    workers: int = Field(ge=0, description="Parser processes; 0 = CPU cores.")
    ocr: bool
    ocr_min_chars: int = Field(ge=0)
    ocr_max_pages: int = Field(ge=0, description="Pages/images OCRed per file at most; bounds OCR time.")
    max_file_mb: float = Field(gt=0)
    commit_every_s: float = Field(gt=0)
    parse_timeout_s: float = Field(ge=0, description="Seconds a file may parse before it fails; 0 = no limit.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IngestSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap must be smaller than chunk_size, got {self.chunk_overlap} >= {self.chunk_size}"
            )
        return self


class RetrievalSettings(_Section):
    mode: Literal["hybrid", "dense", "bm25"]
    top_k: int = Field(gt=0)
    fetch_k: int = Field(gt=0)
    fusion: Literal["rrf", "weighted", "adaptive"]  # weighted beat rrf on CMRC (docs/retrieval.md)
    rrf_k: int = Field(gt=0)
    dense_weight: float = Field(ge=0, le=1)
    score_threshold: float = Field(ge=-1, le=1)  # calibrated for multilingual-e5-small (docs/retrieval.md)
    merge_neighbors: bool
    max_hit_chars: int = Field(gt=0)
    dedupe_threshold: float = Field(gt=0, le=1)
    min_key_term_coverage: float = Field(ge=0, le=1, description="Share of the question's key terms one passage "
                                         "must contain, else no LLM call (0 = off).")
    require_names: bool = Field(description="Each name in the question (person, organisation, product, "
                                "《title》) must be written in one of the passages, else no LLM call.")


class StoreSettings(_Section):
    """Where knowledge bases live: FAISS files under paths.kb_root, or Milvus (docs/deploy.md)."""

    backend: Literal["faiss", "milvus"]
    faiss_index: Literal["auto", "flat", "ivf"] = Field(
        description="FAISS index of a stored segment: flat (exact), ivf (approximate), auto (ivf from ivf_threshold).")
    ivf_threshold: int = Field(gt=0, description="auto: a KB with at least this many chunks writes IVF segments.")
    ivf_nprobe: int = Field(gt=0, description="IVF lists searched per question (recall vs speed).")
    # milvus: a *.db path runs Milvus Lite embedded (one process per file; "" = <kb_root>/milvus.db, relative paths
    # against the project root); http(s)://host:19530 a Milvus standalone/cluster server.
    uri: str
    token: str                      # "user:password" or an API key (a server with authentication on)
    user: str
    password: str
    db_name: str                    # "" = the server's default database
    server_pem_path: str            # TLS: the server's certificate (one-way TLS); https:// URIs use TLS too
    server_name: str                # TLS: the name in the server's certificate, if it differs from the host
    timeout_s: float = Field(gt=0)
    index_type: str = Field(min_length=1)  # auto = FLAT on Milvus Lite (exact), AUTOINDEX on a server


class PromptSettings(_Section):
    template: str
    history_turns: int = Field(ge=0)
    context_tokens: int = Field(gt=0)
    system: str
    grounding_check: bool = Field(description="Check each finished answer against its passages (grounding/).")
    second_pass: bool = Field(description="After a model refusal while the top passage seems to hold the answer, "
                              "ask again with only that sentence (grounding/retry.py).")
    second_pass_passages: int = Field(ge=1, le=20, description="How many of the top passages the second pass looks in "
                                      "for a sentence that scores as the answer.")


class LLMSettings(_Section):
    backend: Literal["auto", "transformers", "llamacpp", "openai"]
    model: str
    demo_model: str
    device: Literal["auto", "cuda", "cpu"]
    quantization: Literal["nf4", "int8", "none"]
    dtype: Literal["auto", "bfloat16", "float16", "float32"]
    trust_remote_code: bool
    adapter: str = Field(description="peft LoRA / prefix-tuning folder or ChatGLM P-Tuning v2 checkpoint; '' = none.")
    adapter_merge: bool = Field(description="Merge a LoRA into unquantized weights at load.")
    max_context_tokens: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    repetition_penalty: float = Field(gt=0)
    cpu_context_tokens: int = Field(ge=0, description="「已知信息」 budget when the model runs on a CPU (prefill "
                                    "costs seconds per 1,000 tokens there); 0 = prompt.context_tokens.")
    threads: int = Field(ge=0, description="llama.cpp CPU threads; 0 = the machine's physical cores.")
    n_gpu_layers: int = Field(ge=-1, description="llama.cpp layers offloaded to a GPU (-1 = all; needs a CUDA build).")
    prompt_cache_mb: int = Field(ge=0, description="llama.cpp: RAM for the KV state of recent prompts, so a prompt "
                                 "that begins like an earlier one (same passages) reads only the rest; 0 = off.")
    use_cpu_copy: bool = Field(description="llama.cpp on a CPU: answer from the GGUF's copy in this CPU's fastest "
                               "format (Q8_0 with AMX int8, BF16 for models up to 1B with AVX-512 BF16) made by "
                               "`python -m modelpack requantize` (pull makes it for the demo models) when it exists.")
    cpu_prefill: Literal["auto", "llamacpp", "transformers"] = Field(
        description="llama.cpp on a CPU: which engine reads the prompt. transformers = the model's transformers folder "
                    "beside the GGUF reads it in bf16 and hands the keys/values to llama.cpp, which writes the answer; "
                    "auto = that, on CPUs with AVX-512 BF16 or AMX when the folder exists and memory allows.")
    static_cache: bool = Field(description="transformers on CUDA: a static KV cache for the window.")
    compile: bool | Literal["auto"] = Field(description="transformers on CUDA: torch.compile decoding; auto = nf4.")
    openai_base_url: str
    openai_api_key: str
    openai_model: str


class UserSettings(_Entry):
    username: str = Field(min_length=1)
    # An entry of app.users, not a setting: its hash may be left out (then ZHIWEN_PASSWORD_<USERNAME> holds it).
    password_hash: str = Field("", description="bcrypt hash; or leave empty and set ZHIWEN_PASSWORD_<USERNAME>.")


class ApiKeySettings(_Entry):
    name: str = Field(min_length=1, description="Who uses the key (shown in the logs).")
    key_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$",
                          description="sha256 of the key, from `python -m app.openai_api create-key NAME`.")


class AppSettings(_Section):
    host: str
    port: int = Field(gt=0, lt=65536)
    root_path: str
    concurrency_limit: int = Field(gt=0)
    max_upload_mb: float = Field(gt=0)
    max_question_chars: int = Field(gt=0, description="A longer question is refused at once (API: 413).")
    # zip uploads are unpacked by the page; these caps stop zip bombs (see app/uploads.py)
    max_unzipped_mb: float = Field(gt=0, description="Total unpacked size of one zip upload.")
    max_zip_entries: int = Field(gt=0, description="Files inside one zip upload.")
    max_zip_ratio: float = Field(gt=1, description="Largest unpacked/compressed ratio of one zip entry.")
    auth_enabled: bool
    users: list[UserSettings]
    login_max_failures: int = Field(gt=0, description="Wrong logins per user name within login_lockout_s.")
    login_max_failures_per_address: int = Field(gt=0, description="Wrong logins per client address.")
    login_lockout_s: float = Field(gt=0, description="How long failed logins count, and the refusal lasts.")
    auth_cache_s: float = Field(ge=0, description="How long a verified password is remembered (0: never).")
    api_keys: list[ApiKeySettings]  # Bearer keys of the OpenAI-compatible /v1 API (app/openai_api.py)



class _YamlFiles(YamlConfigSettingsSource):
    """pydantic-settings' YAML source (files deep-merged in order), with a sentence naming the file when one is
    not valid YAML, not UTF-8 or not a mapping of sections."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as e:
            raise SettingsError(f"settings file {file_path} is not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"settings file {file_path} is not UTF-8 text") from None
        except OSError as e:
            raise SettingsError(f"settings file {file_path} cannot be read: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise SettingsError(
                f"settings file {file_path} must hold a mapping of sections, got {type(data).__name__}")
        return data


class Settings(BaseSettings):
    """Build it with load_settings(); Settings() alone reads configs/default.yaml and the environment only."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True,
        yaml_file=[DEFAULT_YAML], yaml_file_encoding="utf-8",
    )

    paths: PathsSettings
    embedding: EmbeddingSettings
    ingest: IngestSettings
    retrieval: RetrievalSettings
    store: StoreSettings
    prompt: PromptSettings
    llm: LLMSettings
    app: AppSettings

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Highest priority first: keyword overrides from code, the environment, then the YAML files of
        # model_config["yaml_file"] (default.yaml, profile, --config file), later files merged over earlier ones.
        return (init_settings, env_settings, _YamlFiles(settings_cls, deep_merge=True))

    # --- derived paths -------------------------------------------------------------------------
    def resolve(self, p: Path | str) -> Path:
        """A path from the settings, made absolute against the project root."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def kb_root(self) -> Path:
        return self.resolve(self.paths.kb_root)

    @property
    def models_dir(self) -> Path:
        return self.resolve(self.paths.models_dir)

    def model_path(self, name_or_path: str) -> Path:
        """`name_or_path` as a folder: a path if it contains a separator or exists, else models_dir/name."""
        p = Path(name_or_path).expanduser()
        if p.is_absolute() or os.sep in name_or_path or "/" in name_or_path:
            return self.resolve(p)
        return self.models_dir / name_or_path


@functools.cache
def _settings_reading(files: tuple[Path, ...]) -> type[Settings]:
    """Settings whose YAML source reads `files` (pydantic-settings takes the file list from model_config only)."""
    if list(files) == Settings.model_config["yaml_file"]:
        return Settings
    return type("Settings", (Settings,), {"__module__": __name__,
                                          "model_config": SettingsConfigDict(yaml_file=list(files))})


def _settings_file(path: Path, named_by: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise SettingsError(f"{named_by}: {path} is a folder; it must name a YAML settings file")
    if not path.is_file():
        raise SettingsError(f"{named_by}: settings file not found: {path}")
    return path


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _check_environment(environ: dict[str, str]) -> None:
    """Refuse a ZHIWEN_* variable that names no setting (as an unknown YAML key is refused), and a JSON value that
    does not parse, naming the variable (pydantic-settings would name only the section)."""
    for name, value in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_VARIABLES or upper.startswith(tuple(OTHER_PREFIXES)):
            continue
        target: Any = Settings
        keys = upper[len(ENV_PREFIX):].lower().split("__")
        for i, key in enumerate(keys):
            fields = target.model_fields if _is_model(target) else {}
            if key not in fields:
                parent = ".".join(keys[:i])
                known = (f"{parent} has {', '.join(sorted(fields))}" if fields and i
                         else f"the sections are {', '.join(sorted(fields))}" if fields
                         else f"{parent} is a single value")
                raise SettingsError(f"{name} names no setting ({'.'.join(keys)}: {known}); use "
                                    f"{ENV_PREFIX}<SECTION>__<KEY> with a key of configs/default.yaml")
            target = fields[key].annotation
        if _is_model(target) or get_origin(target) in (list, dict):
            try:
                json.loads(value)
            except ValueError:
                shape = "a JSON list, e.g. [{\"username\": \"alice\"}]" if get_origin(target) is list \
                    else "a JSON object, e.g. {\"device\": \"cpu\"}"
                raise SettingsError(f"{name} must be {shape}; got {value!r}") from None


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown setting (check the spelling against configs/default.yaml)")
        elif err["type"] == "missing" and len(err["loc"]) == 2:  # a section's key, not a key of a list entry
            lines.append(f"{key}: missing (every setting needs its default in configs/default.yaml)")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return lines[0] if len(lines) == 1 else "invalid settings: " + "; ".join(lines)


def load_settings(path: str | Path | None = None, profile: str | None = None, **overrides: Any) -> Settings:
    """Load configs/default.yaml, then the profile, then `path` (or ZHIWEN_CONFIG), then env vars, then `overrides`.

    `overrides` are section dicts from code, merged key by key over everything else, e.g.
    load_settings(ingest={"chunk_size": 300}).
    """
    files = [DEFAULT_YAML]
    named = "profile" if profile is not None else "ZHIWEN_PROFILE"
    profile = profile if profile is not None else os.environ.get("ZHIWEN_PROFILE") or None
    if profile:
        files.append(_settings_file(CONFIG_DIR / f"settings-{profile}.yaml", f"{named} {profile!r}"))
    named = "--config" if path is not None else "ZHIWEN_CONFIG"
    path = path if path is not None else os.environ.get("ZHIWEN_CONFIG") or None
    if path:
        files.append(_settings_file(Path(path), named))
    _check_environment(dict(os.environ))
    try:
        loaded = _settings_reading(tuple(files))(**overrides)
    except ValidationError as e:
        raise SettingsError(_format_error(e)) from None
    except SourceError as e:  # a value pydantic-settings cannot parse (the variables were checked above)
        raise SettingsError(str(e)) from None
    if type(loaded) is Settings:
        return loaded
    # The per-file-list class is only a loader: hand out a plain Settings (it pickles, e.g. into parser processes).
    return Settings.model_construct(_fields_set=loaded.model_fields_set,
                                    **{name: getattr(loaded, name) for name in Settings.model_fields})
