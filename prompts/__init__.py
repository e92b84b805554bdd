"""prompts room: the 「已知信息」 template and the token-budgeted prompt builder.

    from prompts import build_prompt, load_template, REFUSAL
"""
from prompts.builder import (
    MESSAGE_OVERHEAD_TOKENS,
    BuiltPrompt,
    PromptBudgetError,
    build_prompt,
    build_prompt_from_settings,
    format_hit,
    hit_label,
)
from prompts.template_files import (
    PromptTemplateError,
    as_chat_prompt_template,
    as_prompt_template,
    available_templates,
    check_template,
    load_template,
)

# What the model is told to say, and what the app says without calling it, when the KB holds no evidence.
REFUSAL = "根据已知信息无法回答该问题"
# The template's second allowed refusal; app/eval code can treat either as an abstention.
NOT_ENOUGH_INFO = "没有提供足够的相关信息"


def is_refusal(answer: str) -> bool:
    """True when an answer says one of the template's two refusal sentences (the model found no answer in the
    passages it was given). is_refusal("根据已知信息无法回答该问题。") -> True;
    is_refusal("年假是十五天。") -> False."""
    text = "".join(answer.split())
    return REFUSAL in text or NOT_ENOUGH_INFO in text


__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "NOT_ENOUGH_INFO",
    "REFUSAL",
    "BuiltPrompt",
    "PromptBudgetError",
    "PromptTemplateError",
    "as_chat_prompt_template",
    "as_prompt_template",
    "available_templates",
    "build_prompt",
    "build_prompt_from_settings",
    "check_template",
    "format_hit",
    "hit_label",
    "is_refusal",
    "load_template",
]
