"""The auth router: the login form, signing in and out, changing one's own password; and the
resumption of a form that was posted after the session had expired.

Password checks (argon2, ~0.5 s of a core) run in the thread pool, never on the event loop, so a
login flood cannot stall other users' pages; the throttles are described in web.auth.
"""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit
from ..db import User, utcnow
from .auth import (
    KNOWN_DEVICE,
    MAX_FAILED_LOGINS,
    AuthError,
    SignedIn,
    change_own_password,
    csrf_ok,
)
from .deps import (
    DEVICE_COOKIE,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    checked_form,
    client_address,
    context,
    coordinator,
    message,
    page,
)

router = APIRouter()
LOGIN_TOKEN_S = 900
#: A form kept across a re-login is resumable for this long.
RESUME_S = 3600
DEVICE_COOKIE_DAYS = 90


def login_page(request: Request, code: str = "", status_code: int = 200, *, name: str = "",
               resume: str = "") -> HTMLResponse:
    """The login form with its own CSRF token (cookie-bound); `code` picks the message shown."""
    ctx = context(request)
    token = secrets.token_urlsafe(24)
    response = page(request, "login.html", None, status_code, error=message(code), csrf_token=token,
                    login_name=name, resume=resume)
    response.set_cookie(LOGIN_COOKIE, ctx.login_tokens.dumps(token), max_age=LOGIN_TOKEN_S,
                        httponly=True, samesite="strict", secure=ctx.settings.web.tls, path="/login")
    return response


def expired_form_page(request: Request, form: FormData) -> HTMLResponse:
    """The answer to a form posted after the session expired: the login page, carrying a signed
    copy of the form when it provably came from our own page (its CSRF token is the expired
    session's), so that it can be submitted again after signing in."""
    ctx = context(request)
    with Session(ctx.engine) as session:
        stale = ctx.sessions.stale_csrf(session, request.cookies.get(SESSION_COOKIE))
    if stale is None or not csrf_ok(stale[1], form.get("csrf_token")):  # type: ignore[arg-type]
        return login_page(request, "", 401)
    fields = [(k, v) for k, v in form.multi_items() if k != "csrf_token" and isinstance(v, str)]
    resume = str(ctx.login_tokens.dumps({"user": stale[0], "path": request.url.path,
                                         "fields": fields[:40]}, salt="osteo-node-resume"))
    return login_page(request, "session_expired", 401, name=stale[0], resume=resume)


def read_resume(request: Request, token: str, name: str) -> dict[str, Any] | None:
    if not token:
        return None
    try:
        value = context(request).login_tokens.loads(token, max_age=RESUME_S, salt="osteo-node-resume")
    except BadSignature:
        return None
    if not isinstance(value, dict) or value.get("user") != name:
        return None
    path = str(value.get("path", ""))
    if not path.startswith("/") or path.startswith("//"):
        return None
    return value


#: Threads that may run login checks at once. Login checks get their own few threads so that a
#: flood of them (each waits ~0.5 s for argon2) never takes the pool that serves every page.
LOGIN_THREADS = 4


def _login_threads(request: Request) -> anyio.CapacityLimiter:
    limiter: anyio.CapacityLimiter | None = getattr(request.app.state, "login_threads", None)
    if limiter is None:  # made in the server's event loop, on first use
        limiter = request.app.state.login_threads = anyio.CapacityLimiter(LOGIN_THREADS)
    return limiter


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return login_page(request)


def _check_login(request: Request, name: str, password: str) -> tuple[str, str | None, str]:
    """Apply the throttles and the password check (in a worker thread: argon2 is slow).
    Returns (message code, the user's name when signed in, the new session's cookie)."""
    ctx = context(request)
    client = client_address(request)
    device = ctx.sessions.known_device(request.cookies.get(DEVICE_COOKIE), name)
    if ctx.throttle.retry_after(client, device):
        if ctx.throttle.report_due(client, device):  # audited once a minute per client
            audit.record(ctx.engine, name or "-", "login", "user", name, audit.DENIED,
                         "throttled: too many failures from this browser (further refusals "
                         "within a minute not recorded)" if device else
                         f"throttled: too many failures from {client} (further refusals within "
                         "a minute not recorded)")
        return "throttled", None, ""
    if device is None:
        with Session(ctx.engine) as session, session.begin():
            if ctx.sessions.recent_failures(session, name, utcnow()) >= MAX_FAILED_LOGINS:
                audit.record(session, name or "-", "login", "user", name, audit.DENIED, "locked out")
                ctx.throttle.failed(client, device)  # counts against the client, too
                return "locked", None, ""
    user_id = ctx.sessions.authenticate(ctx.engine, name, password)  # slow; no transaction open
    with Session(ctx.engine) as session, session.begin():
        audit.record(session, name or "-", "login", "user", name,
                     audit.SUCCESS if user_id else audit.FAILURE, KNOWN_DEVICE if device else "")
        user = session.get(User, user_id) if user_id is not None else None
        if user is None:
            ctx.throttle.failed(client, device)
            return "wrong", None, ""
        return "", user.name, ctx.sessions.start(session, user)


@router.post("/login")
async def login(request: Request) -> Response:
    ctx = context(request)
    form = await request.form()
    name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))[:1024]
    resume = str(form.get("resume", ""))[:20000]
    try:
        expected = ctx.login_tokens.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=LOGIN_TOKEN_S)
    except BadSignature:
        expected = None
    if not expected or not csrf_ok(str(expected), form.get("csrf_token")):  # type: ignore[arg-type]
        return login_page(request, "login_form_expired", 403, name=name, resume=resume)
    code, signed_in_as, cookie = await anyio.to_thread.run_sync(
        _check_login, request, name, password, limiter=_login_threads(request))
    if signed_in_as is None:
        refused = login_page(request, code, 429 if code == "throttled" else 401, name=name,
                             resume=resume)
        if code == "throttled":
            refused.headers["Retry-After"] = str(LOGIN_TOKEN_S)
        return refused
    kept = read_resume(request, resume, signed_in_as)
    response: Response
    if kept is not None:
        with Session(ctx.engine) as session:
            signed = ctx.sessions.current(session, cookie)
        response = page(request, "resume.html", signed, path=kept["path"],
                                  fields=kept["fields"])
    else:
        response = RedirectResponse("/referrals", status_code=303)
    web = ctx.settings.web
    response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_COOKIE_S, httponly=True,
                        samesite="strict", secure=web.tls, path="/")
    response.set_cookie(DEVICE_COOKIE, ctx.sessions.device_cookie(signed_in_as),
                        max_age=DEVICE_COOKIE_DAYS * 86400, httponly=True, samesite="strict",
                        secure=web.tls, path="/login")
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


#: The session cookie outlives the idle timeout (which the server enforces and slides with each
#: request), so that a form posted after expiry can be resumed; see web.auth.STALE_KEEP.
SESSION_COOKIE_S = 12 * 3600


@router.post("/logout")
def logout(request: Request, user: SignedIn = Depends(coordinator),
           _form: FormData = Depends(checked_form)) -> Response:
    with Session(context(request).engine) as session, session.begin():
        context(request).sessions.end(session, request.cookies.get(SESSION_COOKIE))
        audit.record(session, user.name, "logout", "user", user.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/account")
def account_page(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    done = "password_changed" if request.query_params.get("done") == "password" else ""
    return page(request, "account.html", user, notice=message(done))


@router.post("/account/password")
def change_password(request: Request, user: SignedIn = Depends(coordinator),
                    form: FormData = Depends(checked_form)) -> Response:
    new = str(form.get("new_password", ""))
    if new != str(form.get("new_password_again", "")):
        return page(request, "account.html", user, 400, error="The two new passwords differ.")
    ctx = context(request)
    try:
        with Session(ctx.engine) as session, session.begin():
            account = session.get(User, user.user_id)
            assert account is not None  # signed in a moment ago
            change_own_password(session, account, str(form.get("current_password", "")), new)
            cookie = ctx.sessions.start(session, account)  # the change ended every session
    except AuthError as exc:
        if "current password" in str(exc):
            audit.record(ctx.engine, user.name, "user.passwd", "user", user.name, audit.DENIED,
                         "wrong current password")
        return page(request, "account.html", user, 400, error=str(exc))
    response = RedirectResponse("/account?done=password", status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_COOKIE_S, httponly=True,
                        samesite="strict", secure=ctx.settings.web.tls, path="/")
    return response
