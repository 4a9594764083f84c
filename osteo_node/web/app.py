"""The referral worklist web application: `create_app` wires the routers (login, referrals, admin)
over one `WebContext`; the routes are thin, the logic sits in osteo_node.worklist, osteo_node.audit
and web.auth.

Every route but the login page and the style sheet needs a signed-in user; admin pages need the
admin role; every POST needs the session's CSRF token. URLs carry referral ids only, never
patient data, and the server writes no access log (see cli.cmd_web).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import traceback
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from ..config import Settings
from ..db import make_engine
from ..store import FileStore
from . import admin, login, performance, referrals
from .auth import LoginThrottle, Sessions
from .deps import HERE, NotSignedIn, WebContext
from .login import expired_form_page

log = logging.getLogger(__name__)

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


def local_time(value: dt.datetime | None) -> str:
    """A naive UTC timestamp from the database in the server's local time, with the zone."""
    if value is None:
        return ""
    return value.replace(tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.1f}%"
    templates.env.filters["p3"] = lambda v: "" if v is None else f"{v:.3f}"
    templates.env.filters["when"] = local_time
    templates.env.filters["age"] = lambda v: "" if v is None else f"{int(v)}"
    templates.env.filters["t"] = lambda v: "–" if v is None else f"{v:+.1f}"
    templates.env.filters["person"] = lambda v: " ".join(p for p in (v or "").split("^") if p)
    return templates


def error_page(request: Request, status_code: int, detail: str) -> Response:
    """A friendly page for every error (never JSON): what went wrong and where to go next."""
    ctx: WebContext = request.app.state.web
    title = {400: "That request has a value we cannot use", 403: "Not allowed",
             404: "Not found", 429: "Too many attempts"}.get(status_code, "Something went wrong")
    return ctx.templates.TemplateResponse(request, "error.html", {
        "user": None, "title": title, "detail": detail, "status_code": status_code},
        status_code=status_code)


def create_app(settings: Settings, *, engine: Engine | None = None,
               throttle: LoginThrottle | None = None) -> FastAPI:
    """The web application over the node's database and file store."""
    engine = engine or make_engine(settings.database_url)
    web = settings.web
    secret = web.secret_key or secrets.token_urlsafe(48)  # loopback only: config refuses otherwise
    ctx = WebContext(
        settings=settings, engine=engine, sessions=Sessions(secret, web.session_minutes),
        login_tokens=URLSafeTimedSerializer(secret, salt="osteo-node-login"),
        store=FileStore(settings.node.store_dir), templates=make_templates(),
        throttle=throttle or LoginThrottle())

    app = FastAPI(title="osteo-node referrals", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = ctx
    app.state.engine, app.state.sessions, app.state.settings = engine, ctx.sessions, settings

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        try:
            response: Response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - last resort: a page with the headers, not a bare 500
            # the frames, not the message: an exception's text may quote patient data
            log.error("web: %s %s failed: %s\n%s", request.method, request.url.path,
                      type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            response = error_page(request, 500, "The server could not complete this request; "
                                  "it is logged. Go back and try again.")
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
        return expired_form_page(request, await request.form())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        response = error_page(request, exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_value(request: Request, exc: RequestValidationError) -> Response:
        names = ", ".join(str(e["loc"][-1]) for e in exc.errors()) or "a value"
        return error_page(request, 400, f"{names}: not a value this page accepts.")

    @app.get("/static/style.css")
    def style() -> FileResponse:
        return FileResponse(HERE / "static" / "style.css", media_type="text/css",
                            headers={"Cache-Control": "max-age=3600"})

    for router in (login.router, referrals.router, admin.router, performance.router):
        app.include_router(router)
    return app
