"""The knowledge bases as an OpenAI-compatible API, for chat front-ends, scripts and LangChain chains.

    GET  /v1/models                  one model per knowledge base (the model id is the knowledge base's name)
    GET  /v1/models/{model}          one of them, or 404
    POST /v1/chat/completions        answer from that knowledge base: the same QAService as the page and /api
                                     (retrieval, threshold, 「已知信息」 prompt, no LLM call without evidence),
                                     streamed as server-sent events ending in `data: [DONE]`, or as one JSON object

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="zw-...")
    print(client.chat.completions.create(model="使用指南", messages=[{"role": "user", "content": "如何上传文件？"}]))

What is honoured: `messages` (the last one is the question; earlier user/assistant turns are the history; system
messages are ignored, the knowledge base's own prompt is used), `max_tokens` / `max_completion_tokens`,
`temperature` (0 = greedy), `top_p`, `stop` (up to 4 strings, cut from the text as OpenAI does),
`stream` and `stream_options.include_usage`. `n` must be 1; tools, logprobs and non-text content are refused with a
400 naming the field. Other OpenAI fields (user, seed, penalties...) are accepted and ignored.

The extra field `zhiwen` (on the completion object; on the last chunk when streaming) says where the answer came
from:
    {"refused": bool,         # true: no passage reached retrieval.score_threshold, the LLM was NOT called, and the
                              #   content is exactly 「根据已知信息无法回答该问题」 (also header X-Zhiwen-Refused: true)
     "model_refused": bool,   # the model itself answered with one of the template's refusal sentences
     "refusal_reason": null | "score_threshold" | "key_term_coverage" | "missing_name" | "model" | "ungrounded",
     "refusal_message": str,  # the page's Chinese note for it ("" when the answer stands)
     "refusal_detail": {...}, # the numbers behind it (best_dense + threshold; key_terms, missing, coverage...)
     "sources": [{"file", "page", "heading", "score", "dense_score", "bm25_score", "text",
                  "spans": [[start, end], ...]}],   # spans: character offsets in text of the sentences the page
                              #   highlights (the answer's evidence; for a refusal the one closest to the question)
     "low_relevance": [...],  # when refused: the closest passages (same shape), never used for an answer
     "ungrounded": bool,      # the answer failed the grounding check (the page shows 「资料中没有找到可靠依据」)
     "grounding": {...},      # that check's status, failures, citations, evidence sentence (null when not run)
     "citations": null | {"sentences", "cited_sentences", "uncited_sentences": [{"start", "end", "text"}],
                          "invalid_citations": [{"start", "end", "passage"}], "summary"}}
                              # only with a citing template (prompt.template knowledge_qa_cited)
Usage counts: prompt_tokens is the built prompt (model tokenizer), completion_tokens the answer re-tokenized; both
are 0 for a refusal (nothing was generated).

Authentication: `Authorization: Bearer <key>`. Keys are stored as sha256 hashes in `app.api_keys`
(`python -m app.openai_api create-key NAME` makes one). A key is required when any key is configured or when
`app.auth_enabled` is on (login users of the page are not API keys); with neither, /v1 is open like /api.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 401 wrong/missing key, 404 unknown
model (= knowledge base), 400 bad body (param names the field), 503 when the model cannot answer.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from configs import Settings
from prompts import is_refusal

from . import library
from .api import outcome_json
from .context import AppContext
from .render import passage_spans

log = logging.getLogger(__name__)

KEY_PREFIX = "zw-"
MAX_STOP = 4                      # OpenAI's limit on stop sequences


# --- API keys ------------------------------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    """The settings form of an API key: hash_key("zw-abc") -> "sha256:<64 hex>". Keys are 32 random bytes, so a
    plain sha256 is enough (no salt or bcrypt needed, and checking costs microseconds per request)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeys:
    """check(header) -> the key's name, or raises _ApiError(401)."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [(k.name, k.key_hash) for k in settings.app.api_keys]
        self.required = bool(self._keys) or settings.app.auth_enabled

    def check(self, authorization: str) -> str | None:
        if not self.required:
            return None
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _ApiError(401, "缺少 API 密钥：请在请求头中加上 Authorization: Bearer <密钥>（管理员用 "
                                 "`python -m app.openai_api create-key 名称` 创建密钥）。", code="invalid_api_key")
        presented = hash_key(key)
        name = None
        for kname, khash in self._keys:  # compare every entry in constant time: timing reveals nothing
            if hmac.compare_digest(presented, khash):
                name = kname
        if name is None:
            raise _ApiError(401, "API 密钥无效：它不在 app.api_keys 中（请检查密钥是否完整，或请管理员创建新密钥）。",
                            code="invalid_api_key")
        return name


# --- errors in OpenAI's shape --------------------------------------------------------------------------------------
class _ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# --- the request ---------------------------------------------------------------------------------------------------
class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The honoured part of OpenAI's chat-completion body; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = None


def _param(loc: tuple) -> str:
    """("messages", 2, "role") -> "messages[2].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(raw: bytes) -> tuple[ChatRequest, str, list[dict[str, str]], list[str]]:
    """(request, question, history messages, stop strings), or _ApiError(400) naming the field."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _ApiError(400, f"请求体不是有效的 JSON（{e}）。") from None
    if not isinstance(data, dict):
        raise _ApiError(400, "请求体必须是 JSON 对象，例如 {\"model\": \"知识库名\", \"messages\": [...]}。")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list"))))
        param = _param(loc)
        got = "" if err["type"] == "missing" else f"（收到 {err.get('input')!r}）"
        what = "缺少必填字段" if err["type"] == "missing" else f"字段无效：{err['msg']}"
        raise _ApiError(400, f"{param} {what}{got}。", param=param) from None
    for name in ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "audio"):
        value = (req.model_extra or {}).get(name)
        if value not in (None, False, [], "none", "auto", 0):
            raise _ApiError(400, f"{name} 不受支持：知识库问答只返回文本答案。", param=name)
    fmt = (req.model_extra or {}).get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise _ApiError(400, "response_format 只支持 {\"type\": \"text\"}。", param="response_format")
    if req.n not in (None, 1):
        raise _ApiError(400, f"n 只能为 1（收到 {req.n}）：每个请求只生成一个答案。", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise _ApiError(400, f"stop 最多 {MAX_STOP} 个非空字符串（收到 {req.stop!r}）。", param="stop")

    msgs: list[dict[str, str]] = []
    for i, m in enumerate(req.messages):
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _ApiError(400, f"messages[{i}].role 必须是 system、user 或 assistant（收到 {role!r}）。",
                            param=f"messages[{i}].role")
        msgs.append({"role": role, "content": _text_content(m.get("content"), i, role)})
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        i = len(msgs) - 1
        raise _ApiError(400, f"最后一条消息（messages[{i}]）必须是用户提出的非空问题（role 为 user）。",
                        param=f"messages[{i}]")
    history = [m for m in msgs[:-1] if m["role"] in ("user", "assistant")]
    return req, msgs[-1]["content"].strip(), history, stops


def _text_content(content: Any, i: int, role: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _ApiError(400, f"messages[{i}].content[{j}] 只支持文本（type 为 text），收到 {kind!r}。",
                                param=f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise _ApiError(400, f"messages[{i}].content 必须是字符串或文本片段列表（收到 {type(content).__name__}）。",
                    param=f"messages[{i}].content")


# --- stop sequences over a stream of pieces ------------------------------------------------------------------------
class StopScanner:
    """Cut a streamed text at the first stop string, holding back only what could be the start of one.

    >>> s = StopScanner(["##"]); s.feed("ab#"), s.feed("#cd"), s.hit
    ('ab', '', True)
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.hit = stops, False
        self._keep = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self._pending = self._pending[:cut], ""
            return out
        safe = len(self._pending) - self._keep
        out, self._pending = self._pending[:max(safe, 0)], self._pending[max(safe, 0):]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


# --- sources -------------------------------------------------------------------------------------------------------
def sentence_spans(text: str, reference: str) -> list[list[int]]:
    """[start, end) offsets in `text` of the sentences that support `reference` (the answer), in text order
    (app.render.passage_spans: the page's rule; the answer's `spans` come from api.outcome_json)."""
    return passage_spans(text, reference)


# --- one answer ----------------------------------------------------------------------------------------------------
_END = object()


class _Answer:
    """One request's run through the service: the first piece is pulled before any response byte is sent, so that a
    request error (or a model that cannot load) is a proper HTTP error rather than a broken stream."""

    def __init__(self, ctx: AppContext, req: ChatRequest, question: str, history: list[dict[str, str]],
                 stops: list[str]) -> None:
        self.ctx, self.req = ctx, req
        self.stop_event = threading.Event()
        self.scanner = StopScanner(stops)
        self.max_new_tokens = req.max_completion_tokens or req.max_tokens or ctx.settings.llm.max_new_tokens
        from llm import LLMError

        from .service import AnswerParams, QAError

        try:  # the checks, the retrieval and the prompt happen here (ctx.answer), before any response byte
            params = AnswerParams(temperature=req.temperature, top_p=req.top_p,
                                  max_new_tokens=req.max_completion_tokens or req.max_tokens)
            self.stream = ctx.answer(question, req.model, history, params, stop=self.stop_event)
        except QAError as e:
            raise _ApiError(400, e.reason, param="messages") from None
        except LLMError as e:
            raise _generation_error(str(e)) from None
        self._it: Iterator[str] = iter(self.stream)
        self._lock = threading.Lock()              # one thread at a time inside the service's stream
        self.text = ""
        self.finished = False
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def next_text(self) -> Any:
        """The next piece of visible text ("" possible), or _END. Runs in a worker thread."""
        with self._lock:
            return self._next_text()

    def _next_text(self) -> Any:
        if self.finished:
            return _END
        piece = next(self._it, _END)
        if piece is _END:
            self.finished = True
            tail = self.scanner.flush()
            self.text += tail
            return tail if tail else _END
        out = self.scanner.feed(piece)
        self.text += out
        if self.scanner.hit:                     # stop string reached: end the generation, drop the rest
            self.finished = True
            self.stop_event.set()
            self._it.close()
        return out

    def abandon(self) -> None:
        """The client is gone (or the answer is complete): stop the generation and give its slot back now. Closing
        the service's stream releases app.concurrency_limit's slot; it waits (in its own thread) for a next_text()
        still running in a worker, which the stop event ends at the next token."""
        self.stop_event.set()
        if not self.finished:
            threading.Thread(target=self._close, name="v1-abandon", daemon=True).start()

    def _close(self) -> None:
        with self._lock:
            self.finished = True
            self._it.close()

    @property
    def refused(self) -> bool:
        return bool(getattr(self.stream, "refused", False))

    @property
    def error(self) -> str:
        return getattr(self.stream, "error", "") or ""

    def usage(self) -> dict[str, int]:
        if self.refused:
            return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        prompt = int(getattr(self.stream, "prompt_tokens", 0) or 0)
        completion = self.ctx.service.llm.count_tokens(self.text) if self.text else 0
        # The model does not report its token count, so the text is re-tokenized; that can overcount when the
        # model emitted broken UTF-8 byte pieces (shown as U+FFFD), but a generation never exceeds its budget.
        completion = min(completion, self.max_new_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish_reason(self, usage: dict[str, int]) -> str:
        if self.scanner.hit or self.refused:
            return "stop"
        return "length" if usage["completion_tokens"] >= self.max_new_tokens else "stop"

    def extra(self) -> dict[str, Any]:
        out = outcome_json(self.stream, self.text)
        for key in ("sources", "low_relevance"):   # /v1 names the file `file` (the /api face says `source`)
            out[key] = [{"file": h.pop("source"), **h} for h in out[key]]
        if not self.stream.done and not self.refused:   # the client left early or a stop string cut the text
            out["model_refused"] = is_refusal(self.text)
        return out

    def headers(self) -> dict[str, str]:
        return {"X-Zhiwen-Refused": "true" if self.refused else "false"}


def _generation_error(message: str) -> _ApiError:
    return _ApiError(503, f"模型未能生成答案：{message}", code="generation_failed")


def _first_piece(answer: _Answer) -> Any:
    """The first visible piece; request problems → 400, a model that cannot load → 503 (both _ApiError)."""
    from llm import LLMError

    from .service import QAError

    try:
        first = answer.next_text()
    except QAError as e:
        raise _ApiError(400, e.reason, param="messages") from None
    except LLMError as e:
        raise _generation_error(str(e)) from None
    if answer.error and not answer.text:      # the generation failed before its first token
        raise _generation_error(answer.error)
    return first


def _collect(answer: _Answer) -> None:
    while answer.next_text() is not _END:
        pass


# --- the router ----------------------------------------------------------------------------------------------------
def build_openai_router(ctx: AppContext) -> APIRouter:
    keys = ApiKeys(ctx.settings)
    router = APIRouter(prefix="/v1")
    s = ctx.settings

    def known_model(name: str) -> None:
        names = library.names(s)
        if name not in names:
            have = "、".join(names) if names else "（还没有知识库）"
            raise _ApiError(404, f"模型 {name!r} 不存在：模型名就是知识库名，现有的知识库有：{have}。",
                            param="model", code="model_not_found")

    def model_json(name: str) -> dict[str, Any]:
        try:
            created = int((s.kb_root / name).stat().st_mtime)
        except OSError:
            created = 0
        return {"id": name, "object": "model", "created": created, "owned_by": "zhiwen"}

    @router.get("/models")
    def models(request: Request) -> Any:
        try:
            keys.check(request.headers.get("authorization", ""))
        except _ApiError as e:
            return e.response()
        return {"object": "list", "data": [model_json(n) for n in library.names(s)]}

    @router.get("/models/{model}")
    def model(model: str, request: Request) -> Any:
        try:
            keys.check(request.headers.get("authorization", ""))
            known_model(model)
        except _ApiError as e:
            return e.response()
        return model_json(model)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            keys.check(request.headers.get("authorization", ""))
            req, question, history, stops = parse_request(await request.body())
            known_model(req.model)
            answer = await run_in_threadpool(_Answer, ctx, req, question, history, stops)
        except _ApiError as e:
            return e.response()
        except Exception:
            log.exception("/v1/chat/completions failed before answering")
            return _ApiError(500, "内部错误：详细信息已记录在服务器日志中。", code="internal_error").response()
        try:
            first = await run_in_threadpool(_first_piece, answer)
        except _ApiError as e:
            answer.abandon()
            return e.response()
        except Exception:
            answer.abandon()
            log.exception("/v1/chat/completions failed before answering")
            return _ApiError(500, "内部错误：详细信息已记录在服务器日志中。", code="internal_error").response()
        except BaseException:            # the client left while the first token was coming: free the slot
            answer.abandon()
            raise
        if req.stream:
            return StreamingResponse(_events(answer, first), media_type="text/event-stream",
                                     headers={**answer.headers(), "Cache-Control": "no-cache"})
        try:
            await run_in_threadpool(_collect, answer)
        finally:
            answer.abandon()
        if answer.error:
            return _generation_error(answer.error).response()
        usage = answer.usage()
        body = {"id": answer.id, "object": "chat.completion", "created": answer.created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": answer.finish_reason(usage), "logprobs": None}],
                "usage": usage, "zhiwen": answer.extra()}
        return JSONResponse(body, headers=answer.headers())

    return router


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _events(answer: _Answer, first: Any):
    """chat.completion.chunk events: the role, the text pieces, the finish with `zhiwen`, usage if asked, [DONE].
    A client that goes away cancels this generator: the stop event then ends the generation at the next token."""
    req = answer.req

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return _sse({"id": answer.id, "object": "chat.completion.chunk", "created": answer.created,
                     "model": req.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": None}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        piece = first
        while piece is not _END:
            if piece:
                yield chunk({"content": piece})
            piece = await run_in_threadpool(answer.next_text)
        if answer.error:   # failed part-way: OpenAI clients raise on an "error" event
            yield _sse(_generation_error(answer.error).body())
            return
        usage = answer.usage()
        yield chunk({}, answer.finish_reason(usage), zhiwen=answer.extra())
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({"id": answer.id, "object": "chat.completion.chunk", "created": answer.created,
                        "model": req.model, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:
        answer.abandon()


# --- python -m app.openai_api create-key NAME ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.openai_api", description="Zhiwen /v1 API helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create-key", help="make an API key; prints the key once and its app.api_keys entry")
    c.add_argument("name", help="who or what uses the key (shown in the logs), e.g. chatbox or report-script")
    args = parser.parse_args(argv)
    name = args.name.strip()
    if not name:
        print("The key name is empty; give a name such as `chatbox`.", file=sys.stderr)
        return 2
    key = new_key()
    print(key)
    print(f"  - {{name: {json.dumps(name, ensure_ascii=False)}, key_hash: \"{hash_key(key)}\"}}")
    print("Line 1 is the key: give it to the client now, it is not stored anywhere. Add line 2 under `app.api_keys:` "
          "in your settings file (e.g. the file named by ZHIWEN_CONFIG) and restart the app.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
