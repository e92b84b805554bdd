"""The token-budgeted prompt: 「已知信息」 context from the hits + recent history + the question, as chat messages.

Budget rules (in this order of priority):
  1. the question and the template's own words always go in (else PromptBudgetError: the question is too long);
  2. the context gets up to min(context_tokens, window - template - question), where
     window = max_context_tokens - max_new_tokens: hits are taken best first, and the lowest-ranked ones are dropped
     when they no longer fit; a top hit too big on its own is cut at a sentence end (never mid-sentence);
  3. the last `history_turns` question/answer pairs fill what is left, newest first (older turns dropped first).
Evidence outranks history: for document QA a forgotten earlier turn costs less than a missing passage.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prompts.template_files import check_template, load_template
from retrieval.sentences import sentence_ends
from retrieval.types import Hit

Message = dict[str, str]
Turn = tuple[str, str]

# Chat templates wrap each message in role markers (e.g. "<|im_start|>user\n ... <|im_end|>\n" or GLM's
# "<|user|>\n"); counting a few tokens per message for them keeps the prompt inside the window whatever the model.
MESSAGE_OVERHEAD_TOKENS = 8
HIT_SEPARATOR = "\n\n"


class PromptBudgetError(ValueError):
    """The question and template alone do not fit the model window."""


@dataclass(frozen=True)
class BuiltPrompt:
    """messages: chat messages for the LLM ({"role": "user"|"assistant"|"system", "content": ...}).
    used_hits: hits placed in the context, in order ([1], [2], ...); a trimmed hit has metadata["trimmed"] = True.
    dropped_hits: hits left out for lack of room.
    prompt_tokens: tokens of all messages, counting MESSAGE_OVERHEAD_TOKENS per message.
    history_turns_used: how many previous question/answer pairs were kept.
    """

    messages: list[Message]
    used_hits: list[Hit]
    dropped_hits: list[Hit]
    prompt_tokens: int
    context: str = ""
    history_turns_used: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


def hit_label(index: int, hit: Hit) -> str:
    """「[1] 来源：手册.pdf 第3页 · 第一章 > 1.1 目的」: tells the model (and the reader) where a passage is from."""
    parts = [f"[{index}] 来源：{hit.source}"]
    if hit.page is not None:
        parts.append(f" 第{hit.page}页")
    if hit.heading_path:
        parts.append(f" · {' > '.join(hit.heading_path)}")
    return "".join(parts)


def format_hit(index: int, hit: Hit, text: str | None = None) -> str:
    return f"{hit_label(index, hit)}\n{hit.text if text is None else text}"


def _normalise_history(history: Sequence[Any] | None) -> list[Turn]:
    """(question, answer) pairs from pairs or from chat messages [{"role": "user"|"assistant", "content": ...}]."""
    if not history:
        return []
    if all(isinstance(m, Mapping) for m in history):
        turns: list[Turn] = []
        pending: str | None = None
        for m in history:
            role, content = m.get("role"), str(m.get("content") or "")
            if role == "user":
                pending = content
            elif role == "assistant" and pending is not None:
                turns.append((pending, content))
                pending = None
        return turns
    turns = []
    for item in history:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"history items must be (question, answer) pairs or {{'role', 'content'}} messages, got {item!r}"
            )
        q, a = item
        if q is not None and a is not None:  # a turn still being answered has no answer yet
            turns.append((str(q), str(a)))
    return turns


def _turn_messages(turn: Turn) -> list[Message]:
    return [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]


def build_prompt(
    question: str,
    hits: Sequence[Hit],
    history: Sequence[Any] | None,
    *,
    template: str,
    count_tokens: Callable[[str], int],
    context_tokens: int,
    history_turns: int,
    max_context_tokens: int,
    max_new_tokens: int,
    system: str | None = None,
) -> BuiltPrompt:
    """Fill `template` with the hits that fit and the question, after the most recent history that fits.

    `template` is the template text, or a template name / path (prompts/templates/<name>.txt) when it has no "{".
    `history`: (question, answer) pairs, or chat messages, oldest first.
    """
    if "{" not in template:
        template = load_template(template)
    check_template(template)
    for key, value in (("context_tokens", context_tokens), ("max_context_tokens", max_context_tokens),
                       ("max_new_tokens", max_new_tokens)):
        if value <= 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    if history_turns < 0:
        raise ValueError(f"history_turns must be >= 0, got {history_turns}")
    window = max_context_tokens - max_new_tokens
    if window <= 0:
        raise PromptBudgetError(
            f"llm.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in llm.max_context_tokens "
            f"({max_context_tokens}): lower max_new_tokens or raise max_context_tokens"
        )

    def tokens(text: str) -> int:
        return count_tokens(text) + MESSAGE_OVERHEAD_TOKENS

    fixed = tokens(system) if system else 0
    skeleton = tokens(template.format(context="", question=question))
    if fixed + skeleton > window:
        raise PromptBudgetError(
            f"the question is too long: with the template it takes {fixed + skeleton} tokens, but the model window "
            f"leaves {window} (llm.max_context_tokens {max_context_tokens} - llm.max_new_tokens {max_new_tokens}); "
            "shorten the question"
        )
    room = min(context_tokens, window - fixed - skeleton)

    used, dropped, context = _fit_hits(list(hits), room, count_tokens)
    user_message = template.format(context=context, question=question)
    spent = fixed + tokens(user_message)
    # Token counts are not exactly additive (a seam can merge into one token or split into two); if the whole
    # message overshoots by that margin, give up the lowest-ranked hit until it fits.
    while spent > window and used:
        dropped.insert(0, used.pop())
        context = HIT_SEPARATOR.join(format_hit(i, h) for i, h in enumerate(used, start=1))
        user_message = template.format(context=context, question=question)
        spent = fixed + tokens(user_message)

    kept_turns: list[Turn] = []
    for turn in reversed(_normalise_history(history)[-history_turns:] if history_turns else []):
        cost = tokens(turn[0]) + tokens(turn[1])
        if spent + cost > window:
            break  # this turn and every older one are dropped
        kept_turns.insert(0, turn)
        spent += cost

    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for turn in kept_turns:
        messages.extend(_turn_messages(turn))
    messages.append({"role": "user", "content": user_message})
    return BuiltPrompt(messages=messages, used_hits=used, dropped_hits=dropped, prompt_tokens=spent,
                       context=context, history_turns_used=len(kept_turns))


def _fit_hits(hits: list[Hit], room: int, count_tokens: Callable[[str], int]) -> tuple[list[Hit], list[Hit], str]:
    """The best-ranked prefix of `hits` whose labelled context fits `room` tokens (the top hit trimmed if needed)."""
    used: list[Hit] = []
    parts: list[str] = []
    for i, hit in enumerate(hits):
        candidate = HIT_SEPARATOR.join(parts + [format_hit(len(used) + 1, hit)])
        if count_tokens(candidate) <= room:
            used.append(hit)
            parts.append(format_hit(len(used), hit))
            continue
        if not used:  # the best hit alone is too big: keep as many whole sentences of it as fit
            trimmed = _trim_to_sentences(hit, room, count_tokens)
            if trimmed is not None:
                return [trimmed], hits[i + 1 :], format_hit(1, trimmed)
        return used, hits[i:], HIT_SEPARATOR.join(parts)
    return used, [], HIT_SEPARATOR.join(parts)


def _trim_to_sentences(hit: Hit, room: int, count_tokens: Callable[[str], int]) -> Hit | None:
    """`hit` cut after the last whole sentence that fits `room` tokens with its label; None if not even one fits."""
    ends = sentence_ends(hit.text)
    lo, hi = 0, len(ends)  # binary search for the most sentences that fit: counting tokens is the slow part
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(format_hit(1, hit, hit.text[: ends[mid - 1]].rstrip())) <= room:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    kept = hit.text[: ends[lo - 1]].rstrip()
    return dataclasses.replace(hit, text=kept, metadata={**hit.metadata, "trimmed": True})


def build_prompt_from_settings(question: str, hits: Sequence[Hit], history: Sequence[Any] | None, settings: Any,
                               count_tokens: Callable[[str], int], *, system: str | None = None,
                               template: str | None = None, history_turns: int | None = None,
                               max_new_tokens: int | None = None, max_context_tokens: int | None = None,
                               context_tokens: int | None = None) -> BuiltPrompt:
    """build_prompt with every budget taken from the settings (prompt.* and llm.*). A keyword that is not None wins:
    a per-question override (history_turns, max_new_tokens), the loaded model's real window (max_context_tokens),
    the engine's passage budget (context_tokens: ModelInfo.context_budget), a template already loaded (template)."""
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return build_prompt(
        question, hits, history,
        template=template if template is not None else load_template(settings.prompt.template),
        count_tokens=count_tokens,
        context_tokens=pick(context_tokens, settings.prompt.context_tokens),
        history_turns=pick(history_turns, settings.prompt.history_turns),
        max_context_tokens=pick(max_context_tokens, settings.llm.max_context_tokens),
        max_new_tokens=pick(max_new_tokens, settings.llm.max_new_tokens),
        system=system if system is not None else (settings.prompt.system or None),
    )


__all__ = ["BuiltPrompt", "PromptBudgetError", "build_prompt", "build_prompt_from_settings", "format_hit",
           "hit_label"]
