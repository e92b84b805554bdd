"""Assemble and run the web server: FastAPI with the HTTP API under /api, the OpenAI-compatible API under /v1 and the
Gradio page at /.

Offline by construction: Gradio analytics and its version check are off (the environment variable is set before
gradio is imported), the theme uses system fonts only, no share link, server-side rendering off (it would start
a Node process), and the server listens only on settings.app.host.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

# Must precede any gradio import: gradio reads these at import time / Blocks() time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from configs import Settings

from .api import build_router, install_error_handlers
from .context import AppContext
from .openai_api import build_openai_router
from .render import CITATION_JS
from .web import CSS, build_page, theme

log = logging.getLogger(__name__)


def create_app(settings: Settings, ctx: AppContext | None = None) -> FastAPI:
    """The ASGI app: API routes first (so / does not shadow them), then the page."""
    ctx = ctx or AppContext(settings)
    prepare_upload_folder(settings)  # before the page is built: Gradio reads GRADIO_TEMP_DIR then
    app = FastAPI(title="知问 Zhiwen", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(LoginAddressGuard, auth=ctx.auth)
    app.include_router(build_router(ctx))
    app.include_router(build_openai_router(ctx))  # OpenAI-compatible /v1 (app/openai_api.py)
    page = build_page(ctx)
    # Generations queue in Gradio with a visible position; default_concurrency_limit covers the other events.
    page.queue(default_concurrency_limit=4, max_size=64)
    mb = settings.app.max_upload_mb
    return gr.mount_gradio_app(
        app, page, path="/",
        auth=ctx.auth.gradio_auth(), auth_message="知问：请登录（账号由管理员在 app.users 中配置）。",
        root_path=settings.app.root_path or None,
        max_file_size=int(mb * 2**20),  # bytes: Gradio refuses bigger uploads before they reach us
        ssr_mode=False, pwa=False, mcp_server=False,
        footer_links=["api", "settings"],
        theme=theme(), css=CSS, head=CITATION_JS,
        server_name=settings.app.host, server_port=settings.app.port,
    )


UPLOAD_MARKER = ".zhiwen-uploads"  # marks a Gradio upload folder as this app's own, so it may be emptied


def prepare_upload_folder(settings: Settings) -> Path:
    """Gradio's upload folder for the page: GRADIO_TEMP_DIR if set, else <kb_root>/.gradio-uploads. It is emptied
    here (at start) when it is this app's own (new, empty, or marked); a folder someone else also uses is left
    alone with a warning. After ingest each upload's files are deleted by the job (app/web.py)."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or settings.kb_root / ".gradio-uploads").expanduser()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = list(folder.iterdir())
    if entries and not (folder / UPLOAD_MARKER).is_file():
        log.warning("GRADIO_TEMP_DIR %s holds files that are not this app's; uploads are still cleaned after "
                    "ingest, but the folder is not emptied at start", folder)
        return folder
    for entry in entries:
        if entry.name == UPLOAD_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (folder / UPLOAD_MARKER).write_text("Gradio uploads of Zhiwen; emptied when the app starts.\n", encoding="utf-8")
    return folder


class LoginAddressGuard:
    """The per-address limit on the page's login form (ASGI middleware): Gradio calls the auth function with the
    name and password only, so failed POSTs to /login are counted here by client address, and an address past
    app.login_max_failures_per_address gets 429 until app.login_lockout_s after its last failure."""

    def __init__(self, app: Any, auth: Any) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/") != "/login"
                or not self.auth.enabled):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or (None,))[0]
        if self.auth.blocked(None, address):
            response = JSONResponse({"detail": "登录失败次数过多，请稍后再试。"}, status_code=429,
                                    headers={"Retry-After": str(int(self.auth.limiter.window_s))})
            await response(scope, receive, send)
            return
        status: dict[str, int] = {}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") in (400, 401, 403):
            self.auth.limiter.failed(None, address)


class PortInUseError(OSError):
    """app.host:app.port cannot be listened on (another program holds it, or the address is not this machine's)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, before anything says the app has started."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            reason = f"端口 {port} 已被占用（{host}:{port}）；请关闭占用它的程序，或用 --port / app.port 换一个端口"
        else:
            reason = f"无法监听 {host}:{port}：{e.strerror or e}；请检查 app.host / --host"
        raise PortInUseError(e.errno, reason) from None


def serve(settings: Settings, *, warm_up: bool = True) -> None:
    """Run until interrupted (python app.py)."""
    import uvicorn

    host, port = settings.app.host, settings.app.port
    sock = listen(host, port)  # a port in use is said before the models load and before 「知问已启动」
    try:
        ctx = AppContext(settings)  # checks the login configuration before anything starts
        try:
            if warm_up:
                log.info("loading models…")
                ctx.warm_up()
            app = create_app(settings, ctx)
            ctx.jobs.resume_pending()  # uploads stored before a kill but never indexed are ingested now
            print(f"知问已启动：http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
                  f"{settings.app.root_path}/", flush=True)
            # root_path goes to Gradio only (it builds URLs with it); the proxy strips the prefix before us.
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            ctx.jobs.shutdown()
    finally:
        sock.close()


def run(settings: Settings, *, warm_up: bool = True) -> int:
    """Entry point of app.py (settings already loaded): start, and turn start-up failures into one clear sentence."""
    import sys

    from .auth import AuthConfigError

    try:
        serve(settings, warm_up=warm_up)
    except AuthConfigError as e:
        print(f"配置错误 / settings error: {e}", file=sys.stderr)
        return 2
    except PortInUseError as e:
        print(f"无法启动 / cannot start: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        reason = getattr(e, "reason", None) or str(e)
        log.debug("start-up failed", exc_info=True)
        print(f"无法启动 / cannot start ({type(e).__name__}): {reason}", file=sys.stderr)
        return 1
    return 0
