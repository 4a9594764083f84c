"""What every router of the web application shares: the application's context, the dependencies
that say who is asking and whether they may (signed in, admin, CSRF-checked form), page rendering
and the parsing of query values.

Routers (login, referrals, admin, performance) import these at module level; `create_app` puts
one `WebContext` on `app.state.web`, so nothing here is a global of one application.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit, worklist
from ..config import Settings
from ..store import FileStore
from .auth import ADMIN, LoginThrottle, Sessions, SignedIn, csrf_ok

HERE = FilePath(__file__).resolve().parent
SESSION_COOKIE = "osteo_session"
LOGIN_COOKIE = "osteo_login"
DEVICE_COOKIE = "osteo_device"

#: Messages shown on pages, chosen by code: a URL or a form can pick one but never supply text
#: (no content spoofing through `?error=`).
MESSAGES = {
    "": "",
    "wrong": "Wrong name or password.",
    "locked": "Too many failed attempts for this account from unknown browsers: wait 15 minutes, "
              "sign in from a browser you used before, or ask an administrator to unlock it.",
    "throttled": "Too many failed attempts from this computer: wait 15 minutes.",
    "login_form_expired": "The sign-in form had expired (it is valid for 15 minutes). "
                          "Please sign in again.",
    "session_expired": "Your session ended after a time without activity. Sign in again: what "
                       "you typed is kept and you can submit it again.",
    "password_changed": "Your password was changed.",
    "saved": "Saved.",
}


@dataclass(frozen=True)
class WebContext:
    """One web application's collaborators, built once by `create_app`."""

    settings: Settings
    engine: Engine
    sessions: Sessions
    login_tokens: URLSafeTimedSerializer
    store: FileStore
    templates: Jinja2Templates
    throttle: LoginThrottle


class NotSignedIn(Exception):
    """No valid session: pages redirect to the login form, other requests get 401."""


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.web
    return ctx


def message(code: str) -> str:
    return MESSAGES.get(code, "")


def client_address(request: Request) -> str:
    """The peer's address (no proxy headers are trusted: the server runs with proxy_headers off)."""
    return request.client.host if request.client else "-"


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


#: Dates a filter may name; outside, a date is a typo (and 9999-12-31 + 1 day overflows).
DATE_RANGE = (dt.date(1900, 1, 1), dt.date(2199, 12, 31))
#: The largest id a URL may carry: PostgreSQL's INTEGER.
MAX_ID = 2**31 - 1
MAX_PAGE = 100_000
#: A referral id in a URL; out-of-range values are answered 400 (see app.bad_value).
ReferralId = Annotated[int, Path(ge=1, le=MAX_ID)]


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def parse_date(value: str | None, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        date = dt.date.fromisoformat(value)
    except ValueError as exc:
        raise bad_request(f"{name}: expected a date YYYY-MM-DD, got {_shown(value)}") from exc
    if not DATE_RANGE[0] <= date <= DATE_RANGE[1]:
        raise bad_request(f"{name}: {value} is outside {DATE_RANGE[0]}..{DATE_RANGE[1]}")
    return date


def parse_number(value: str | None, name: str, low: float = -1e9, high: float = 1e9) -> float | None:
    """A finite number within low..high (400 naming the parameter otherwise)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise bad_request(f"{name}: expected a number, got {_shown(value)}") from exc
    if not math.isfinite(number) or not low <= number <= high:
        raise bad_request(f"{name}: expected a number within {low:g}..{high:g}, got {_shown(value)}")
    return number


def parse_page(value: str | None) -> int:
    """A page number 1..MAX_PAGE; 400 for anything else (nan, 1e300, -1, 2.5)."""
    number = parse_number(value, "page", 1, MAX_PAGE)
    if number is None:
        return 1
    if number != int(number):
        raise bad_request(f"page: expected a whole number, got {_shown(str(value))}")
    return int(number)


FILTER_KEYS = ("status", "risk", "date_from", "date_to", "age_min", "age_max", "sort", "order",
               "q", "assigned_to")
#: Sort keys whose natural first page is ascending: the longest-waiting referral, the oldest study,
#: the alphabet.
ASCENDING_FIRST = ("date", "study_date", "name", "status")


def filters_from(params: dict[str, str]) -> worklist.Filters:
    """Worklist filters from query parameters (400 with the parameter's name when invalid).

    Without parameters: open referrals, longest waiting first. `status=all` lists every status;
    `assigned_to=-` the unassigned ones.
    """
    status = params.get("status", "open")
    sort = params.get("sort") or "date"
    order = params.get("order") or ("asc" if sort in ASCENDING_FIRST else "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be asc or desc; got {_shown(order)}")
    assigned = params.get("assigned_to")
    try:
        return worklist.Filters(
            status=None if status in ("", "all") else status,
            risk=params.get("risk") or None,
            date_from=parse_date(params.get("date_from"), "date_from"),
            date_to=parse_date(params.get("date_to"), "date_to"),
            age_min=parse_number(params.get("age_min"), "age_min", 0, 150),
            age_max=parse_number(params.get("age_max"), "age_max", 0, 150),
            sort=sort,
            descending=order == "desc",
            search=params.get("q", "").strip(),
            assigned_to=None if not assigned else ("" if assigned == "-" else assigned[:64]),
        )
    except worklist.WorklistError as exc:
        raise bad_request(str(exc)) from exc
