"""Assemble and run the web server: FastAPI with the HTTP API under /api and the Gradio page at /.

Offline by construction: Gradio analytics and its version check are off (the environment variable is set before
gradio is imported), the theme uses system fonts only, no share link, server-side rendering off (it would start
a Node process), and the server listens only on settings.app.host.
"""
from __future__ import annotations

import logging
import os

# Must precede any gradio import: gradio reads these at import time / Blocks() time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr
from fastapi import FastAPI

from configs import Settings

from .api import build_router
from .context import AppContext
from .render import CITATION_JS
from .web import CSS, build_page, theme

log = logging.getLogger(__name__)


def create_app(settings: Settings, ctx: AppContext | None = None) -> FastAPI:
    """The ASGI app: API routes first (so / does not shadow them), then the page."""
    ctx = ctx or AppContext(settings)
    app = FastAPI(title="知问 Zhiwen", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.include_router(build_router(ctx))
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


def serve(settings: Settings, *, warm_up: bool = True) -> None:
    """Run until interrupted (python app.py)."""
    import uvicorn

    ctx = AppContext(settings)  # checks the login configuration before anything starts
    if warm_up:
        log.info("loading models…")
        ctx.warm_up()
    app = create_app(settings, ctx)
    host, port = settings.app.host, settings.app.port
    print(f"知问已启动：http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{settings.app.root_path}/",
          flush=True)
    try:
        # root_path goes to Gradio only (it builds URLs with it); the proxy strips the prefix before us.
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=3)
    finally:
        ctx.jobs.shutdown()


def run(*, config: str | None = None, host: str | None = None, port: int | None = None, warm_up: bool = True) -> int:
    """Entry point of app.py: load the settings, start, and turn start-up failures into one clear sentence."""
    import sys

    from configs import SettingsError, load_settings

    from .auth import AuthConfigError

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(config)
        if overrides:  # command-line flags win over every settings source
            settings = settings.model_copy(update={"app": settings.app.model_copy(update=overrides)})
        serve(settings, warm_up=warm_up)
    except (SettingsError, AuthConfigError) as e:
        print(f"配置错误 / settings error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        reason = getattr(e, "reason", None) or str(e)
        log.debug("start-up failed", exc_info=True)
        print(f"无法启动 / cannot start ({type(e).__name__}): {reason}", file=sys.stderr)
        return 1
    return 0
