"""Prompt templates: load by name or path, check their variables, and view them as LangChain prompt templates.

A template is plain text with Python/LangChain f-string fields: exactly {context} and {question}
(write literal braces as {{ and }}). The default, prompts/templates/knowledge_qa.txt, is langchain-ChatGLM's
「已知信息」 prompt, verbatim.
"""
from __future__ import annotations

from pathlib import Path
from string import Formatter

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate

from configs import PROJECT_ROOT

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
REQUIRED_VARIABLES: frozenset[str] = frozenset({"context", "question"})


class PromptTemplateError(ValueError):
    """A template is missing, unreadable, or its variables are not exactly {context} and {question}."""


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt"))


def template_path(name_or_path: str) -> Path:
    """prompts/templates/<name>.txt for a bare name; otherwise a path (relative paths against the project root)."""
    if "/" not in name_or_path and "\\" not in name_or_path and not name_or_path.endswith(".txt"):
        return TEMPLATES_DIR / f"{name_or_path}.txt"
    p = Path(name_or_path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def load_template(name_or_path: str) -> str:
    """The checked text of a template (settings.prompt.template); one trailing newline an editor added is dropped."""
    path = template_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptTemplateError(
            f"prompt.template {name_or_path!r}: no file {path}. Use one of {', '.join(available_templates())} "
            "(files in prompts/templates/) or a path to a .txt file with {context} and {question}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptTemplateError(f"prompt.template {name_or_path!r}: cannot read {path} as UTF-8 text: {e}") from None
    if text.endswith("\n"):
        text = text[:-1]
    check_template(text, name=str(path))
    return text


def template_variables(text: str, *, name: str = "template") -> set[str]:
    """The {fields} used in `text`."""
    try:
        return {field for _, field, _, _ in Formatter().parse(text) if field is not None}
    except ValueError as e:  # a lone "{" or "}"
        raise PromptTemplateError(f"{name}: not a valid template ({e}); write literal braces as "
                                  f"{{{{ and }}}}") from None


def check_template(text: str, *, name: str = "template") -> None:
    """Fail loudly unless the template uses exactly {context} and {question}.

    >>> check_template("问题是：{question}")
    Traceback (most recent call last):
    ...
    prompts.template_files.PromptTemplateError: template: missing variables: context; unknown variables: none;
    provided variables: context, question
    """
    used = template_variables(text, name=name)
    missing = sorted(REQUIRED_VARIABLES - used)
    unknown = sorted(used - REQUIRED_VARIABLES)
    if missing or unknown:
        raise PromptTemplateError(
            f"{name}: missing variables: {', '.join(missing) or 'none'}; unknown variables: "
            f"{', '.join(unknown) or 'none'}; provided variables: {', '.join(sorted(REQUIRED_VARIABLES))}"
        )


def as_prompt_template(text: str) -> PromptTemplate:
    """The template as a LangChain PromptTemplate (inputs: context, question)."""
    check_template(text)
    return PromptTemplate.from_template(text)


def as_chat_prompt_template(text: str) -> ChatPromptTemplate:
    """The template as a LangChain ChatPromptTemplate: optional `history` messages, then the filled template as
    the human message — the same shape `build_prompt` produces."""
    check_template(text)
    return ChatPromptTemplate.from_messages([MessagesPlaceholder("history", optional=True), ("human", text)])
