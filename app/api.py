"""HTTP API next to the page, for other intranet systems and the concurrency bench.

    GET  /api/health                 service state, model, device
    GET  /api/kbs                    knowledge bases with file and chunk counts
    POST /api/ask                    {"question", "kb", "history"?: [[q, a], ...], "top_k"?, "threshold"?,
                                      "temperature"?, "max_new_tokens"?}  -> NDJSON stream:
                                     {"type":"token","text":...}* then {"type":"done","answer","refused","sources",...}
                                     (done: refused, model_refused, refusal_reason / refusal_message /
                                     refusal_detail, sources and low_relevance with spans, ungrounded, grounding,
                                     citations — outcome_json)
    POST /api/search                 {"question", "kb", "top_k"?, "threshold"?} -> {"evidence", "hits",
                                     "low_relevance"} (spans: each passage's sentence closest to the question)
    POST /api/kbs                    {"name"} -> 201 {"name"}  (a new, empty knowledge base; 409 if it exists)
    POST /api/kbs/{kb}/files         multipart "files" -> {"job_id"}  (background ingestion, as on the page)
    GET  /api/jobs/{job_id}          progress and per-file results

When login is on, every route needs HTTP Basic credentials of an app.users entry (the same check as the page);
too many failed logins → 429. Errors are JSON {"error": sentence} with a fitting status code, sent before any
streaming starts: 400 bad request (invalid KB name, empty question, bad parameter, empty KB, malformed body),
404 unknown knowledge base or job, 409 KB exists, 413 question longer than app.max_question_chars or a file over
app.max_upload_mb (refused while it streams in), 503 the model cannot load.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from llm import LLMError
from retrieval.store import KBNameError, validate_kb_name
from retrieval.types import Hit

from . import library
from .context import AppContext
from .errors import friendly_error
from .jobs import JobError
from .service import AnswerParams, QAError, QuestionTooLongError, UnknownKBError
from .uploads import safe_filename, too_big_reason

log = logging.getLogger(__name__)


class CreateKBRequest(BaseModel):
    name: str


class SearchRequest(BaseModel):
    """Types only: the values are checked once, by AnswerParams and the service, for every face alike."""

    question: str
    kb: str
    top_k: int | None = None
    threshold: float | None = None

    def params(self) -> AnswerParams:
        return AnswerParams(top_k=self.top_k, threshold=self.threshold)


class AskRequest(SearchRequest):
    history: list[tuple[str, str]] = []
    temperature: float | None = None
    max_new_tokens: int | None = None

    def params(self) -> AnswerParams:
        return AnswerParams(top_k=self.top_k, threshold=self.threshold, temperature=self.temperature,
                            max_new_tokens=self.max_new_tokens)


def hit_json(hit: Hit) -> dict[str, Any]:
    return {"source": hit.source, "page": hit.page, "heading": " > ".join(hit.heading_path), "score": hit.score,
            "dense_score": hit.dense_score, "bm25_score": hit.bm25_score, "text": hit.text}


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from an HTTP Basic header, decoded as UTF-8 (RFC 7617): Chinese passwords work.
    FastAPI's HTTPBasic decodes ASCII only."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def hits_json(hits: list[Hit], spans: list[list[list[int]]]) -> list[dict[str, Any]]:
    return [{**hit_json(h), "spans": sp} for h, sp in zip(hits, spans, strict=True)]


def refusal_json(refusal: Any) -> dict[str, Any]:
    """`refusal_reason` (null while an answer stands; else score_threshold | key_term_coverage | missing_name | model |
    ungrounded,
    app.refusals.REFUSAL_REASONS), `refusal_message` (the page's Chinese note, "" when none), `refusal_detail`."""
    if refusal is None:
        return {"refusal_reason": None, "refusal_message": "", "refusal_detail": None}
    return refusal.to_dict()


def outcome_json(stream: Any, text: str) -> dict[str, Any]:
    """What the done line (/api/ask) and the `zhiwen` field (/v1) say about a finished answer, beyond its text:
    `refused` (retrieval refused, the LLM was not called), `model_refused`, the refusal fields, `sources` and
    `low_relevance` with `spans` (offsets of the sentences the page highlights: the answer's evidence, or the
    sentence closest to the question when there is no answer to go by), the grounding check and, for a citing
    template, `citations` (uncited sentences and markers naming no passage; null otherwise)."""
    from .render import closest_for, hit_spans

    verdict = getattr(stream, "grounding", None)
    closest = closest_for(stream)
    sources = list(getattr(stream, "sources", None) or [])
    low = list(getattr(stream, "low_relevance", None) or [])
    report = getattr(stream, "citation_report", None)
    return {"refused": bool(stream.refused), "model_refused": bool(getattr(stream, "model_refused", False)),
            **refusal_json(getattr(stream, "refusal", None)),
            "sources": hits_json(sources, hit_spans(sources, text or "", grounding=verdict, closest=closest)),
            "low_relevance": hits_json(low, hit_spans(low, "", closest=closest)),
            **grounding_json(verdict),
            "citations": report.to_dict(text) if report is not None else None}


def grounding_json(verdict: Any) -> dict[str, Any]:
    """The done line's grounding fields: `ungrounded` (show 「资料中没有找到可靠依据」), `grounding` (status, failures
    with kind and message, citations with their character spans and passage numbers, evidence sentences)."""
    if verdict is None:
        return {"ungrounded": False, "grounding": None}
    return {"ungrounded": not verdict.ok, "grounding": verdict.to_dict()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _request_error(e: QAError) -> JSONResponse:
    """A request the service refused: 404 for an unknown knowledge base, 413 for a too long question, else 400."""
    status = 404 if isinstance(e, UnknownKBError) else 413 if isinstance(e, QuestionTooLongError) else 400
    return _error(status, e.reason)


def build_router(ctx: AppContext) -> APIRouter:
    def require_user(request: Request) -> str | None:
        if not ctx.auth.enabled:
            return None
        address = request.client.host if request.client else None
        creds = basic_credentials(request.headers.get("authorization", ""))
        if ctx.auth.blocked(creds[0] if creds else None, address):
            raise HTTPException(429, "登录失败次数过多，请稍后再试（配置项 app.login_lockout_s）。",
                                headers={"Retry-After": str(int(s.app.login_lockout_s))})
        if creds is None or not ctx.auth.verify(*creds, address=address):
            raise HTTPException(401, "需要登录：请用 app.users 中的用户名和密码（HTTP Basic 认证）访问。",
                                headers={"WWW-Authenticate": 'Basic realm="zhiwen", charset="UTF-8"'})
        return creds[0]

    s = ctx.settings
    router = APIRouter(prefix="/api", dependencies=[Depends(require_user)])

    @router.get("/health")
    def health() -> dict[str, Any]:
        kbs = len(library.names(s))
        if not ctx.models_loaded:  # a health probe must never start a minute-long model load
            return {"status": "ok", "model": None, "models_loaded": False, "knowledge_bases": kbs}
        try:
            info = asdict(ctx.model_info())
        except Exception as e:  # noqa: BLE001 - reported as a sentence in the JSON
            return {"status": "degraded", "error": friendly_error(e), "knowledge_bases": kbs}
        return {"status": "ok", "model": info, "models_loaded": True, "knowledge_bases": kbs}

    @router.get("/kbs")
    def kbs() -> list[dict[str, Any]]:
        return [asdict(k) for k in library.sizes(s)]

    @router.post("/search")
    def search(req: SearchRequest) -> Any:
        from .render import hit_spans

        try:
            result = ctx.search(req.question, req.kb, req.params())
            shown = result.hits or result.low_relevance     # spans: each passage's sentence closest to the question
            closest = ctx.service.highlighter.closest(req.question.strip(), [h.text for h in shown])
        except QAError as e:
            return _request_error(e)
        except Exception as e:
            log.exception("search failed")
            return _error(500, friendly_error(e))
        spans = hit_spans(shown, "", closest=closest)
        return {"evidence": result.evidence, "hits": hits_json(result.hits, spans if result.hits else []),
                "low_relevance": hits_json(result.low_relevance, [] if result.hits else spans)}

    @router.post("/ask")
    def ask(req: AskRequest) -> Any:
        stop = threading.Event()
        try:  # every check, the retrieval and the prompt: a bad request is a 4xx before any streaming
            stream = ctx.answer(req.question, req.kb, list(req.history), req.params(), stop=stop)
        except QAError as e:
            return _request_error(e)
        except LLMError as e:  # the model cannot load or its server is unreachable
            return _error(503, f"模型暂时不可用：{friendly_error(e)}")
        except Exception as e:
            log.exception("ask failed")
            return _error(500, friendly_error(e))

        async def lines() -> AsyncIterator[bytes]:
            text, done = "", False
            try:
                while (piece := await run_in_threadpool(stream.pull)) is not None:
                    text += piece
                    yield _line({"type": "token", "text": piece})
                done = True
                yield _line({"type": "done", "answer": text, "error": stream.error or "",
                             **(await run_in_threadpool(outcome_json, stream, text))})
            except Exception as e:
                log.exception("ask failed while streaming")
                yield _line({"type": "error", "error": friendly_error(e), "answer": text})
            finally:
                # finished, failed, or the client went away (this generator is cancelled): either way the model
                # stops instead of generating for nobody and the generation slot is given back now
                if not done:
                    stop.set()
                stream.abandon()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.post("/kbs", status_code=201)
    def create_kb(req: CreateKBRequest) -> Any:
        name = req.name.strip()
        if name in library.names(s):
            return _error(409, f"知识库「{name}」已存在。")
        try:
            created = library.create(name, s)
        except KBNameError as e:
            return _error(400, str(e))
        except Exception as e:
            log.exception("creating knowledge base %r failed", name)
            return _error(500, friendly_error(e))
        return {"name": created}

    @router.post("/kbs/{kb}/files")
    async def upload(kb: str, request: Request) -> Any:
        """Multipart field "files". The knowledge base is checked before the body is read, and each file's size
        while it streams in: a file over app.max_upload_mb is answered 413 without reading the rest."""
        try:
            validate_kb_name(kb)
        except KBNameError as e:
            return _error(400, str(e))
        if kb not in library.names(s):
            return _error(404, f"知识库「{kb}」不存在：先用 POST /api/kbs 新建，或在页面上新建。")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(400, "上传需要 multipart/form-data 请求，文件放在字段 files 中。")
        limit = int(min(s.app.max_upload_mb, s.ingest.max_file_mb) * 2**20)
        parser = SizeCappedParser(request.headers, request.stream(), max_file_bytes=limit)
        try:
            form = await parser.parse()
        except FileTooLarge as e:
            return _error(413, f"「{safe_filename(e.name)}」：{too_big_reason(e.size, limit)}")
        except MultiPartException as e:
            return _error(400, f"上传的请求格式不对：{e.message}")
        files = [f for f in form.getlist("files") if isinstance(f, StarletteUploadFile)]
        try:
            return await run_in_threadpool(_start_upload_job, ctx, kb, files)
        finally:
            await form.close()

    @router.get("/jobs/{job_id}")
    def job(job_id: str) -> Any:
        try:
            j = ctx.jobs.get(job_id)
        except JobError as e:
            return _error(404, str(e))
        return {"id": j.id, "kind": j.kind, "kb": j.kb_name, "state": j.state, "message": j.message,
                "done": j.done, "total": j.total, "error": j.error, "resumed_by": j.resumed_by,
                "files": [asdict(f) for f in j.files]}

    return router


def _start_upload_job(ctx: AppContext, kb: str, files: list[StarletteUploadFile]) -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="zhiwen-upload-"))
    try:
        pairs = []
        for i, f in enumerate(files):
            dest = tmp / f"{i}-{secrets.token_hex(4)}"
            with dest.open("wb") as out:
                shutil.copyfileobj(f.file, out)
            pairs.append((dest, f.filename or dest.name))
        job = ctx.jobs.upload(kb, pairs, cleanup=tmp)
    except (JobError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return _error(400, friendly_error(e))
    return {"job_id": job.id}


class FileTooLarge(Exception):
    def __init__(self, name: str, size: int) -> None:
        super().__init__(name)
        self.name, self.size = name, size


class SizeCappedParser(MultiPartParser):
    """Starlette's multipart parser, stopping as soon as one file passes `max_file_bytes` (Starlette caps only
    non-file fields): the rest of an oversized upload is never read."""

    def __init__(self, *args: Any, max_file_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self._sizes: dict[int, int] = {}

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is not None:
            size = self._sizes[id(part)] = self._sizes.get(id(part), 0) + (end - start)
            if size > self.max_file_bytes:
                raise FileTooLarge(part.file.filename or "", size)
        super().on_part_data(data, start, end)


def install_error_handlers(app: FastAPI) -> None:
    """Malformed /api requests (bad JSON, a wrong type, a missing field) → 400 {"error": sentence}, naming the
    field but never echoing the value (it may hold a lone surrogate, which cannot be encoded as JSON)."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Any:
        if not request.scope.get("path", "").startswith("/api/"):
            return await request_validation_exception_handler(request, exc)
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "请求体"
            problems.append(f"{where}：{err.get('msg', '')}")
        return _error(400, "请求格式不对：" + "；".join(problems))


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
