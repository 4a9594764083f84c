"""What every router of the web application shares: the application's context, the dependencies
that say who is asking and whether they may (signed in, admin, CSRF-checked form), page rendering
and the parsing of query values.

Routers (login, referrals, admin, performance) import these at module level; `create_app` puts
one `WebContext` on `app.state.web`, so nothing here is a global of one application.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit, worklist
from ..config import Settings
from ..store import FileStore
from .auth import ADMIN, Sessions, SignedIn, csrf_ok

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "osteo_session"
LOGIN_COOKIE = "osteo_login"


@dataclass(frozen=True)
class WebContext:
    """One web application's collaborators, built once by `create_app`."""

    settings: Settings
    engine: Engine
    sessions: Sessions
    login_tokens: URLSafeTimedSerializer
    store: FileStore
    templates: Jinja2Templates


class NotSignedIn(Exception):
    """No valid session: pages redirect to the login form, other requests get 401."""


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.web
    return ctx


def page(request: Request, name: str, user: SignedIn | None, status_code: int = 200,
         **values: Any) -> HTMLResponse:
    """Render template `name` with the signed-in `user` (None on public pages)."""
    return context(request).templates.TemplateResponse(request, name, {"user": user, **values},
                                                       status_code=status_code)


# --- who is asking, and may they --------------------------------------------------------------
def signed_in(request: Request) -> SignedIn:
    ctx = context(request)
    with Session(ctx.engine) as session, session.begin():
        user = ctx.sessions.current(session, request.cookies.get(SESSION_COOKIE))
    if user is None:
        raise NotSignedIn()
    return user


def coordinator(user: SignedIn = Depends(signed_in)) -> SignedIn:
    return user  # both roles work the worklist


def admin(request: Request, user: SignedIn = Depends(signed_in)) -> SignedIn:
    if user.role != ADMIN:
        audit.record(context(request).engine, user.name, "page.view", "page", request.url.path,
                     audit.DENIED, "admin role required")
        raise HTTPException(status_code=403, detail="admin role required")
    return user


async def checked_form(request: Request, user: SignedIn = Depends(coordinator)) -> FormData:
    form = await request.form()
    if not csrf_ok(user.csrf_token, form.get("csrf_token")):  # type: ignore[arg-type]
        audit.record(context(request).engine, user.name, "csrf", "path", request.url.path,
                     audit.DENIED)
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")
    return form


async def admin_form(request: Request, user: SignedIn = Depends(admin)) -> FormData:
    return await checked_form(request, user)


# --- query values ---------------------------------------------------------------------------------
def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def parse_date(value: str | None, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise bad_request(f"{name}: expected YYYY-MM-DD, got {value!r}") from exc


def parse_number(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise bad_request(f"{name}: expected a number, got {value!r}") from exc


def parse_page(value: str | None) -> int:
    return max(1, int(parse_number(value, "page") or 1))


FILTER_KEYS = ("status", "risk", "date_from", "date_to", "age_min", "age_max", "sort", "order")


def filters_from(params: dict[str, str]) -> worklist.Filters:
    """Worklist filters from query parameters (400 with the parameter's name when invalid)."""
    try:
        return worklist.Filters(
            status=params.get("status") or None,
            risk=params.get("risk") or None,
            date_from=parse_date(params.get("date_from"), "date_from"),
            date_to=parse_date(params.get("date_to"), "date_to"),
            age_min=parse_number(params.get("age_min"), "age_min"),
            age_max=parse_number(params.get("age_max"), "age_max"),
            sort=params.get("sort") or "date",
            descending=params.get("order", "desc") != "asc",
        )
    except worklist.WorklistError as exc:
        raise bad_request(str(exc)) from exc
