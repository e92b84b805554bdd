"""One home for turning an exception into the sentence a person sees, shared by the page, the API and the CLI.

The project's own errors already carry a sentence (`.reason`, or the message); anything else becomes a short
notice pointing at the server log, where the traceback goes.
"""
from __future__ import annotations

ERROR_HINT = "详细信息已记录在服务器日志中；如果问题持续，请把出错时间告诉管理员。"
_OWN_ROOMS = {"app", "ingest", "retrieval", "llm", "prompts", "configs"}


def friendly_error(e: BaseException) -> str:
    """A sentence for a person: friendly_error(QAError("问题为空：请输入问题。")) -> "问题为空：请输入问题。"."""
    reason = getattr(e, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    own = type(e).__module__.split(".")[0] in _OWN_ROOMS
    if own or isinstance(e, (ValueError, FileNotFoundError, PermissionError, TimeoutError)):
        return str(e) or type(e).__name__
    return f"内部错误（{type(e).__name__}）。{ERROR_HINT}"
