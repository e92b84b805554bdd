"""One typed settings object for the whole product.

Sources, highest priority first:
  0. keyword overrides passed to load_settings() by code (tests, tools)
  1. environment variables ZHIWEN_<SECTION>__<KEY> (e.g. ZHIWEN_LLM__DEVICE=cpu)
  2. the file named by ZHIWEN_CONFIG, if set
  3. configs/settings-<profile>.yaml for ZHIWEN_PROFILE=<profile>, if set
  4. configs/default.yaml (every default lives there, and is documented in README.md)

A bad value fails at start with a message naming the key and the allowed values:
    SettingsError: llm.quantization: Input should be 'nf4', 'int8' or 'none' (got 'fp8')
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


class SettingsError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsSettings(_Section):
    kb_root: Path = Field(Path("knowledge_base"), description="Folder holding one sub-folder per knowledge base.")
    models_dir: Path = Field(Path("models"), description="Folder of the model pack and of user model folders.")


class EmbeddingSettings(_Section):
    model: str = Field("multilingual-e5-small", description="Folder name in models_dir or a path.")
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    batch_size: int = Field(32, gt=0)
    max_seq_length: int = Field(512, gt=16)


class IngestSettings(_Section):
    chunk_size: int = Field(250, gt=20, description="Characters per chunk.")
    chunk_overlap: int = Field(50, ge=0)
    workers: int = Field(0, ge=0, description="Parser processes; 0 = CPU cores.")
    ocr: bool = True
    ocr_min_chars: int = Field(10, ge=0)
    ocr_max_pages: int = Field(50, ge=0, description="Pages/images OCRed per file at most; bounds OCR time.")
    max_file_mb: float = Field(200, gt=0)
    commit_every_s: float = Field(60, gt=0)
    parse_timeout_s: float = Field(600, ge=0, description="Seconds a file may parse before it fails; 0 = no limit.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IngestSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap must be smaller than chunk_size, got {self.chunk_overlap} >= {self.chunk_size}"
            )
        return self


class RetrievalSettings(_Section):
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    top_k: int = Field(5, gt=0)
    fetch_k: int = Field(50, gt=0)
    fusion: Literal["rrf", "weighted"] = "weighted"  # weighted beat rrf on CMRC (docs/retrieval.md)
    rrf_k: int = Field(60, gt=0)
    dense_weight: float = Field(0.5, ge=0, le=1)
    score_threshold: float = Field(0.86, ge=-1, le=1)  # calibrated for multilingual-e5-small (docs/retrieval.md)
    merge_neighbors: bool = True
    max_hit_chars: int = Field(600, gt=0)
    dedupe_threshold: float = Field(0.95, gt=0, le=1)


class PromptSettings(_Section):
    template: str = "knowledge_qa"
    history_turns: int = Field(3, ge=0)
    context_tokens: int = Field(2048, gt=0)
    system: str = ""


class LLMSettings(_Section):
    backend: Literal["auto", "transformers", "llamacpp", "openai"] = "auto"
    model: str = "chatglm3-6b"
    demo_model: str = "qwen2.5-coder-1.5b-instruct"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False
    max_context_tokens: int = Field(4096, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.1, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    threads: int = Field(0, ge=0)               # llama.cpp threads; 0 = the machine's physical cores
    n_gpu_layers: int = Field(0, ge=-1)         # llama.cpp layers offloaded to a GPU (-1 = all; needs a CUDA build)
    static_cache: bool = True                   # transformers on CUDA: a static KV cache (fixed shapes)
    compile: bool | Literal["auto"] = "auto"    # transformers on CUDA: torch.compile decoding (auto = for nf4)
    openai_base_url: str = ""
    openai_api_key: str = ""
    openai_model: str = ""


class UserSettings(_Section):
    username: str = Field(min_length=1)
    password_hash: str = Field("", description="bcrypt hash; or leave empty and set ZHIWEN_PASSWORD_<USERNAME>.")


class AppSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(7860, gt=0, lt=65536)
    root_path: str = ""
    concurrency_limit: int = Field(2, gt=0)
    max_upload_mb: float = Field(100, gt=0)
    # zip uploads are unpacked by the page; these caps stop zip bombs (see app/uploads.py)
    max_unzipped_mb: float = Field(500, gt=0, description="Total unpacked size of one zip upload.")
    max_zip_entries: int = Field(2000, gt=0, description="Files inside one zip upload.")
    max_zip_ratio: float = Field(200, gt=1, description="Largest unpacked/compressed ratio of one zip entry.")
    auth_enabled: bool = False
    users: list[UserSettings] = []


# The merged YAML files of the load_settings() call in progress (a settings source below the environment).
_YAML_DATA: ContextVar[dict] = ContextVar("_YAML_DATA", default={})


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # the whole dict is returned by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _YAML_DATA.get()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ZHIWEN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    paths: PathsSettings = PathsSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    ingest: IngestSettings = IngestSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    prompt: PromptSettings = PromptSettings()
    llm: LLMSettings = LLMSettings()
    app: AppSettings = AppSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Highest priority first: keyword overrides from code, the environment, then the merged YAML files.
        return (init_settings, env_settings, _YamlSource(settings_cls))

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


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SettingsError(f"settings file not found: {path}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling against configs/default.yaml)"
        got = err.get("input")
        lines.append(f"{key}: {msg}" + ("" if err["type"] == "extra_forbidden" else f" (got {got!r})"))
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(path: str | Path | None = None, profile: str | None = None, **overrides: Any) -> Settings:
    """Load configs/default.yaml, then the profile, then `path` (or ZHIWEN_CONFIG), then env vars, then `overrides`.

    `overrides` are section dicts from code, merged last, e.g. load_settings(ingest={"chunk_size": 300}).
    """
    data = _read_yaml(CONFIG_DIR / "default.yaml")
    profile = profile if profile is not None else os.environ.get("ZHIWEN_PROFILE") or None
    if profile:
        data = _deep_merge(data, _read_yaml(CONFIG_DIR / f"settings-{profile}.yaml"))
    path = path if path is not None else os.environ.get("ZHIWEN_CONFIG") or None
    if path:
        data = _deep_merge(data, _read_yaml(Path(path)))
    token = _YAML_DATA.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise SettingsError(_format_error(e)) from None
    finally:
        _YAML_DATA.reset(token)
