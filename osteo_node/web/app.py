"""The referral worklist web application: `create_app` wires the routers (login, referrals, admin)
over one `WebContext`; the routes are thin, the logic sits in osteo_node.worklist, osteo_node.audit
and web.auth.

Every route but the login page and the style sheet needs a signed-in user; admin pages need the
admin role; every POST needs the session's CSRF token. URLs carry referral ids only, never
patient data, and the server writes no access log (see cli.cmd_web).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy.engine import Engine
from starlette.routing import BaseRoute

from ..config import Settings
from ..db import make_engine
from ..store import FileStore
from . import admin, login, referrals
from .auth import Sessions
from .deps import HERE, NotSignedIn, WebContext

#: Paths reachable without signing in (tests check that every other route refuses anonymity).
PUBLIC_PATHS = frozenset({"/login", "/static/style.css"})

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def all_routes(app: FastAPI) -> list[BaseRoute]:
    """Every route of `app`, included routers' routes flattened (FastAPI keeps an included
    router as one entry of `app.routes`); the access-control tests walk this list."""
    found: list[BaseRoute] = []

    def walk(routes: list[BaseRoute]) -> None:
        for route in routes:
            nested = getattr(route, "original_router", None)
            if nested is not None:
                walk(nested.routes)
            else:
                found.append(route)

    walk(app.routes)
    return found


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.1f}%"
    templates.env.filters["p3"] = lambda v: "" if v is None else f"{v:.3f}"
    templates.env.filters["when"] = lambda v: "" if v is None else v.strftime("%Y-%m-%d %H:%M")
    templates.env.filters["age"] = lambda v: "" if v is None else f"{v:.0f}"
    return templates


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """The web application over the node's database and file store."""
    engine = engine or make_engine(settings.database_url)
    web = settings.web
    secret = web.secret_key or secrets.token_urlsafe(48)  # loopback only: config refuses otherwise
    ctx = WebContext(
        settings=settings, engine=engine, sessions=Sessions(secret, web.session_minutes),
        login_tokens=URLSafeTimedSerializer(secret, salt="osteo-node-login"),
        store=FileStore(settings.node.data_dir / "store"), templates=make_templates())

    app = FastAPI(title="osteo-node referrals", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = ctx
    app.state.engine, app.state.sessions, app.state.settings = engine, ctx.sessions, settings

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path != "/static/style.css":
            response.headers["Cache-Control"] = "no-store"
        if web.tls:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, _exc: NotSignedIn) -> Response:
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse("sign in first", status_code=401)

    @app.get("/static/style.css")
    def style() -> FileResponse:
        return FileResponse(HERE / "static" / "style.css", media_type="text/css",
                            headers={"Cache-Control": "max-age=3600"})

    for router in (login.router, referrals.router, admin.router):
        app.include_router(router)
    return app
