"""Where a model's files are: settings.llm.model, or the demo model standing in for it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from common.gguf_copy import copy_path, made_from
from llm.types import ModelNotFoundError, demo_notice

if TYPE_CHECKING:
    from configs.settings import Settings

# The demo pack's chat folders were renamed to say they hold Qwen2.5-Coder weights; `python -m modelpack pull`
# renames old folders and leaves a link, and a folder copied under either name is still found under the other.
RENAMED = {"qwen2.5-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
           "qwen2.5-1.5b-instruct": "qwen2.5-coder-1.5b-instruct"}
_OTHER_NAME = {**RENAMED, **{new: old for old, new in RENAMED.items()}}


def find_model_dir(settings: Settings, name: str) -> Path:
    """settings.model_path(name), or the same folder under its other (old or new) pack name when only that exists."""
    path = settings.model_path(name)
    if name in RENAMED and path.is_symlink():      # the link pull leaves: show and load the folder's real name
        return path.resolve()
    if not path.exists() and name in _OTHER_NAME:
        other = settings.model_path(_OTHER_NAME[name])
        if other.exists():
            return other.resolve() if other.is_symlink() else other
    return path


def resolve_model_path(settings: Settings) -> tuple[Path, bool, str]:
    """(path, is_demo, notice) for settings.llm.model — a model folder or a .gguf file — falling back to
    settings.llm.demo_model when it is absent."""
    wanted = find_model_dir(settings, settings.llm.model)
    if wanted.exists():
        return wanted, False, ""
    demo = find_model_dir(settings, settings.llm.demo_model)
    if demo.exists():
        return demo, True, demo_notice(settings.llm.model, wanted, demo.name)
    raise ModelNotFoundError(
        f"no model folder found: llm.model={settings.llm.model!r} ({wanted}) and the demo model "
        f"llm.demo_model={settings.llm.demo_model!r} ({demo}) are both missing. Run `python -m modelpack pull demo` "
        f"to install the demo models, or set llm.model to a model folder or a .gguf file."
    )


def has_gguf(path: Path) -> bool:
    """A .gguf file, or a folder with at least one .gguf file in it."""
    return path.suffix == ".gguf" if path.is_file() else any(path.glob("*.gguf"))


def has_transformers_weights(path: Path) -> bool:
    """A transformers model folder: config.json next to the weights."""
    return path.is_dir() and (path / "config.json").is_file()


def cpu_copy_for(gguf: Path, fmt: str, models_dir: Path) -> tuple[Path | None, str]:
    """(the `fmt` copy of `gguf` that `python -m modelpack requantize` made in its default place, or None; a note when
    a copy is there but cannot be used: it was made from another file, so answering from it would answer from other
    weights). llm.use_cpu_copy: the llama.cpp engine answers from the copy in this CPU's fastest format
    (common.gguf_copy.cpu_copy_format)."""
    copy = copy_path(gguf, fmt, models_dir)
    if copy.resolve() == gguf.resolve() or not copy.is_file():
        return None, ""
    if not made_from(copy, gguf):
        return None, (f"the {fmt} copy {copy} was not made from {gguf.name} as it is now, so the engine answers from "
                      f"{gguf.name}; make it again with `python -m modelpack requantize {gguf} --format {fmt} --force`")
    return copy, ""
