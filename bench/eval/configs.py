"""Evaluation configurations: a name plus settings overrides, several compared side by side in one run.

On the command line a configuration is one string of comma-separated `key=value` pairs:
    name=c250-hybrid,chunk_size=250,overlap=50,mode=hybrid,k=5,threshold=0.8
Short keys: chunk_size, overlap → ingest.chunk_size / ingest.chunk_overlap; mode, k, threshold, fusion,
fetch_k → retrieval.mode / top_k / score_threshold / fusion / fetch_k. Any other setting is written as
`section.key=value` (e.g. retrieval.merge_neighbors=false, llm.max_new_tokens=64).
Configurations that share ingest settings share one knowledge base (ingested once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configs.settings import Settings, load_settings

ALIASES: dict[str, tuple[str, str]] = {
    "chunk_size": ("ingest", "chunk_size"), "overlap": ("ingest", "chunk_overlap"),
    "chunk_overlap": ("ingest", "chunk_overlap"), "mode": ("retrieval", "mode"), "k": ("retrieval", "top_k"),
    "top_k": ("retrieval", "top_k"), "threshold": ("retrieval", "score_threshold"),
    "fusion": ("retrieval", "fusion"), "fetch_k": ("retrieval", "fetch_k"),
}


class ConfigSpecError(ValueError):
    """A configuration string names an unknown key or has no value; the message quotes it."""


@dataclass(frozen=True)
class EvalConfig:
    name: str
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)   # {section: {key: value}}
    answer: bool = True                                                    # also run the LLM for this config

    def settings(self, kb_root: Path) -> Settings:
        """The product's Settings for this configuration, with knowledge bases under `kb_root`."""
        over = {s: dict(v) for s, v in self.overrides.items()}
        over.setdefault("paths", {})["kb_root"] = str(kb_root)
        s = load_settings(**over)
        # Environment variables outrank overrides in load_settings; a silent override would mislabel a row.
        for section, values in over.items():
            for key, want in values.items():
                got = getattr(getattr(s, section), key)
                if str(got) != str(want) and not (isinstance(got, float) and float(want) == got):
                    raise ConfigSpecError(
                        f"configuration {self.name!r}: {section}.{key} should be {want!r} but the environment "
                        f"variable ZHIWEN_{section.upper()}__{key.upper()} sets {got!r}; unset it for evaluation runs")
        return s

    def ingest_key(self) -> tuple:
        """Configurations with equal ingest + embedding settings can share one knowledge base."""
        return tuple(sorted((s, tuple(sorted(v.items()))) for s, v in self.overrides.items()
                            if s in ("ingest", "embedding")))

    def params(self, settings: Settings) -> dict[str, Any]:
        """The effective values that matter for a report row."""
        return {"chunk_size": settings.ingest.chunk_size, "chunk_overlap": settings.ingest.chunk_overlap,
                "mode": settings.retrieval.mode, "fusion": settings.retrieval.fusion,
                "top_k": settings.retrieval.top_k, "threshold": settings.retrieval.score_threshold,
                "embedding": settings.embedding.model, "answer": self.answer}


def _value(raw: str) -> Any:
    return yaml.safe_load(raw)  # "250" → 250, "0.8" → 0.8, "false" → False, "hybrid" → "hybrid"


def parse_config(spec: str) -> EvalConfig:
    """parse_config("name=bm25,mode=bm25,k=5") -> EvalConfig("bm25", {"retrieval": {"mode": "bm25", "top_k": 5}})."""
    name, answer = None, True
    over: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ConfigSpecError(f"configuration {spec!r}: {part!r} is not key=value")
        key, raw = (x.strip() for x in part.split("=", 1))
        if key == "name":
            name = raw
        elif key == "answer":
            answer = bool(_value(raw))
        elif key in ALIASES:
            section, k = ALIASES[key]
            over.setdefault(section, {})[k] = _value(raw)
        elif "." in key:
            section, k = key.split(".", 1)
            over.setdefault(section, {})[k] = _value(raw)
        else:
            raise ConfigSpecError(f"configuration {spec!r}: unknown key {key!r}; use one of "
                                  f"{', '.join(sorted(ALIASES))}, name, answer, or section.key")
    if not name:
        name = "-".join(f"{k}{v}" for sec in over.values() for k, v in sec.items()) or "default"
    return EvalConfig(name, over, answer)


def load_config_file(path: Path) -> list[EvalConfig]:
    """A YAML list of {name, answer?, <section>: {key: value}} mappings."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ConfigSpecError(f"{path}: expected a YAML list of configurations, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigSpecError(f"{path}: item {i} needs a mapping with a `name`")
        over = {k: dict(v) for k, v in item.items() if k not in ("name", "answer") and isinstance(v, dict)}
        out.append(EvalConfig(str(item["name"]), over, bool(item.get("answer", True))))
    return out


# What a plain `python -m bench.evaluate` compares: the default pipeline, each retriever alone, larger chunks,
# and the LLM only on the default configuration (the slow part on CPU).
DEFAULT_CONFIGS: tuple[str, ...] = (
    "name=c250-hybrid,chunk_size=250,overlap=50,mode=hybrid",
    "name=c250-dense,chunk_size=250,overlap=50,mode=dense,answer=false",
    "name=c250-bm25,chunk_size=250,overlap=50,mode=bm25,answer=false",
    "name=c500-hybrid,chunk_size=500,overlap=100,mode=hybrid,answer=false",
)
