"""The auth router: the login form, signing in and signing out."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit
from ..db import utcnow
from .auth import MAX_FAILED_LOGINS, SignedIn, csrf_ok
from .deps import LOGIN_COOKIE, SESSION_COOKIE, checked_form, context, coordinator, page

router = APIRouter()


def login_page(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
    ctx = context(request)
    token = secrets.token_urlsafe(24)
    response = page(request, "login.html", None, status_code, error=error, csrf_token=token)
    response.set_cookie(LOGIN_COOKIE, ctx.login_tokens.dumps(token), max_age=900, httponly=True,
                        samesite="strict", secure=ctx.settings.web.tls, path="/login")
    return response


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    ctx = context(request)
    form = await request.form()
    try:
        expected = ctx.login_tokens.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=900)
    except BadSignature:
        expected = None
    if not expected or not csrf_ok(str(expected), form.get("csrf_token")):  # type: ignore[arg-type]
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")
    name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))
    sessions = ctx.sessions
    with Session(ctx.engine) as session, session.begin():
        if sessions.recent_failures(session, name, utcnow()) >= MAX_FAILED_LOGINS:
            audit.record(session, name or "-", "login", "user", name, audit.DENIED, "locked out")
            user, cookie, locked = None, "", True
        else:
            locked = False
            user = sessions.authenticate(session, name, password)
            audit.record(session, name or "-", "login", "user", name,
                         audit.SUCCESS if user else audit.FAILURE)
            cookie = sessions.start(session, user) if user else ""
    if user is None:
        return login_page(request, "Too many failed attempts: wait 15 minutes." if locked
                          else "Wrong name or password.", 401)
    response = RedirectResponse("/referrals", status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=ctx.settings.web.session_minutes * 60,
                        httponly=True, samesite="strict", secure=ctx.settings.web.tls, path="/")
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, user: SignedIn = Depends(coordinator),
           _form: FormData = Depends(checked_form)) -> Response:
    with Session(context(request).engine) as session, session.begin():
        context(request).sessions.end(session, request.cookies.get(SESSION_COOKIE))
        audit.record(session, user.name, "logout", "user", user.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
