"""The referral worklist web application: thin routes over osteo_node.worklist and web.auth.

Every route but the login page and the style sheet needs a signed-in user; admin pages need the
admin role; every POST needs the session's CSRF token. URLs carry referral ids only, never
patient data, and the server writes no access log (see cli.cmd_web).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import secrets
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from PIL import Image
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit, worklist
from ..config import Settings
from ..db import AuditEvent, Referral, Result, User, make_engine, utcnow
from ..records import CLASS_NAMES
from ..refer import STATUSES
from ..store import FileStore
from .auth import ADMIN, MAX_FAILED_LOGINS, ROLES, AuthError, Sessions, SignedIn, add_user, csrf_ok

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "osteo_session"
LOGIN_COOKIE = "osteo_login"
#: Paths reachable without signing in (tests check that every other route refuses anonymity).
PUBLIC_PATHS = frozenset({"/login", "/static/style.css"})
AUDIT_PAGE = 100

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class NotSignedIn(Exception):
    """No valid session: pages redirect to the login form, other requests get 401."""


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def _parse_date(value: str | None, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise _bad_request(f"{name}: expected YYYY-MM-DD, got {value!r}") from exc


def _parse_number(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise _bad_request(f"{name}: expected a number, got {value!r}") from exc


def filters_from(params: dict[str, str]) -> worklist.Filters:
    """Worklist filters from query parameters (400 with the parameter's name when invalid)."""
    try:
        return worklist.Filters(
            status=params.get("status") or None,
            risk=params.get("risk") or None,
            date_from=_parse_date(params.get("date_from"), "date_from"),
            date_to=_parse_date(params.get("date_to"), "date_to"),
            age_min=_parse_number(params.get("age_min"), "age_min"),
            age_max=_parse_number(params.get("age_max"), "age_max"),
            sort=params.get("sort") or "date",
            descending=params.get("order", "desc") != "asc",
        )
    except worklist.WorklistError as exc:
        raise _bad_request(str(exc)) from exc


FILTER_KEYS = ("status", "risk", "date_from", "date_to", "age_min", "age_max", "sort", "order")


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """The web application over the node's database and file store."""
    engine = engine or make_engine(settings.database_url)
    web = settings.web
    secret = web.secret_key or secrets.token_urlsafe(48)  # loopback only: config refuses otherwise
    sessions = Sessions(secret, web.session_minutes)
    login_tokens = URLSafeTimedSerializer(secret, salt="osteo-node-login")
    store = FileStore(settings.node.data_dir / "store")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.1f}%"
    templates.env.filters["p3"] = lambda v: "" if v is None else f"{v:.3f}"
    templates.env.filters["when"] = lambda v: "" if v is None else v.strftime("%Y-%m-%d %H:%M")
    templates.env.filters["age"] = lambda v: "" if v is None else f"{v:.0f}"

    app = FastAPI(title="osteo-node referrals", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.sessions, app.state.settings = engine, sessions, settings

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

    def page(request: Request, name: str, user: SignedIn | None, status_code: int = 200,
             **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"user": user, **context},
                                          status_code=status_code)

    # --- dependencies: who is asking, and may they ---------------------------------------------
    def signed_in(request: Request) -> SignedIn:
        with Session(engine) as session, session.begin():
            user = sessions.current(session, request.cookies.get(SESSION_COOKIE))
        if user is None:
            raise NotSignedIn()
        return user

    def coordinator(user: SignedIn = Depends(signed_in)) -> SignedIn:
        return user  # both roles work the worklist

    def admin(request: Request, user: SignedIn = Depends(signed_in)) -> SignedIn:
        if user.role != ADMIN:
            audit.record(engine, user.name, "page.view", "page", request.url.path, audit.DENIED,
                         "admin role required")
            raise HTTPException(status_code=403, detail="admin role required")
        return user

    async def checked_form(request: Request, user: SignedIn = Depends(coordinator)) -> FormData:
        form = await request.form()
        if not csrf_ok(user.csrf_token, form.get("csrf_token")):  # type: ignore[arg-type]
            audit.record(engine, user.name, "csrf", "path", request.url.path, audit.DENIED)
            raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")
        return form

    async def admin_form(request: Request, user: SignedIn = Depends(admin)) -> FormData:
        return await checked_form(request, user)

    def load(session: Session, referral_id: int) -> Referral:
        referral = session.get(Referral, referral_id)
        if referral is None:
            raise HTTPException(status_code=404, detail=f"no referral {referral_id}")
        return referral

    # --- public ------------------------------------------------------------------------------------
    @app.get("/static/style.css")
    def style() -> FileResponse:
        return FileResponse(HERE / "static" / "style.css", media_type="text/css",
                            headers={"Cache-Control": "max-age=3600"})

    def login_page(request: Request, error: str = "", status_code: int = 200) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, status_code, error=error, csrf_token=token)
        response.set_cookie(LOGIN_COOKIE, login_tokens.dumps(token), max_age=900, httponly=True,
                            samesite="strict", secure=web.tls, path="/login")
        return response

    @app.get("/login")
    def login_form(request: Request) -> HTMLResponse:
        return login_page(request)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        try:
            expected = login_tokens.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=900)
        except BadSignature:
            expected = None
        if not expected or not csrf_ok(str(expected), form.get("csrf_token")):  # type: ignore[arg-type]
            raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page")
        name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))
        with Session(engine) as session, session.begin():
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
        response.set_cookie(SESSION_COOKIE, cookie, max_age=web.session_minutes * 60, httponly=True,
                            samesite="strict", secure=web.tls, path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    # --- signed in ---------------------------------------------------------------------------------
    @app.post("/logout")
    def logout(request: Request, user: SignedIn = Depends(coordinator),
               _form: FormData = Depends(checked_form)) -> Response:
        with Session(engine) as session, session.begin():
            sessions.end(session, request.cookies.get(SESSION_COOKIE))
            audit.record(session, user.name, "logout", "user", user.name)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    def home(_user: SignedIn = Depends(coordinator)) -> Response:
        return RedirectResponse("/referrals", status_code=303)

    @app.get("/referrals")
    def referral_list(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
        params = dict(request.query_params)
        filters = filters_from(params)
        page_no = max(1, int(_parse_number(params.get("page"), "page") or 1))
        with Session(engine) as session:
            rows, total = worklist.find(session, filters, offset=(page_no - 1) * web.page_size,
                                        limit=web.page_size)
            counts = worklist.status_counts(session)
            kept = {k: params[k] for k in FILTER_KEYS if params.get(k)}
            pages = max(1, -(-total // web.page_size))
            return page(request, "worklist.html", user, rows=rows, total=total, counts=counts,
                        params=kept, page_no=page_no, pages=pages, statuses=STATUSES,
                        risks=CLASS_NAMES, query=urllib.parse.urlencode(kept),
                        link=lambda **extra: "?" + urllib.parse.urlencode(
                            {**kept, **{k: v for k, v in extra.items() if v is not None}}))

    @app.get("/referrals.csv")
    def referral_csv(request: Request, user: SignedIn = Depends(coordinator)) -> Response:
        filters = filters_from(dict(request.query_params))
        with Session(engine) as session, session.begin():
            rows, total = worklist.find(session, filters)
            body = worklist.to_csv(rows)
            audit.record(session, user.name, "referral.export.csv", "worklist", "",
                         detail=f"{total} referrals; ids {','.join(str(r.id) for r in rows)[:1500]}")
        stamp = utcnow().strftime("%Y%m%d-%H%M%S")
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="referrals-{stamp}.csv"'})

    @app.get("/referrals/{referral_id}")
    def referral_page(request: Request, referral_id: int, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
        with Session(engine) as session, session.begin():
            referral = load(session, referral_id)
            audit.record(session, user.name, "referral.view", "referral", referral_id)
            error = request.query_params.get("error", "")
            return page(request, "referral.html", user, r=referral,
                        events=worklist.history(session, referral_id),
                        next_statuses=worklist.TRANSITIONS[referral.status],
                        needs_reason=worklist.NEEDS_REASON, dxa_category=worklist.dxa_category(referral),
                        error=error[:200], today=dt.date.today().isoformat())

    @app.get("/referrals/{referral_id}/heatmap.png")
    def heatmap(referral_id: int, _user: SignedIn = Depends(coordinator)) -> Response:
        with Session(engine) as session:
            referral = load(session, referral_id)
            result = session.get(Result, referral.result_id)
            sc_path = result.sc_path if result else ""
        if not sc_path:
            raise HTTPException(status_code=404, detail="no secondary capture for this referral")
        try:
            ds = dcmread(store.absolute(sc_path))
            rgb = np.asarray(ds.pixel_array)
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail="the image is no longer stored "
                                "(past storage.retention_days)") from exc
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.get("/referrals/{referral_id}/fhir.json")
    def fhir(referral_id: int, user: SignedIn = Depends(coordinator)) -> Response:
        with Session(engine) as session, session.begin():
            resource = worklist.to_fhir(load(session, referral_id))
            audit.record(session, user.name, "referral.export.fhir", "referral", referral_id)
        return Response(json.dumps(resource, indent=2), media_type="application/fhir+json")

    def back(referral_id: int, error: str = "") -> RedirectResponse:
        suffix = "?" + urllib.parse.urlencode({"error": error}) if error else ""
        return RedirectResponse(f"/referrals/{referral_id}{suffix}", status_code=303)

    @app.post("/referrals/{referral_id}/status")
    def change_status(referral_id: int, user: SignedIn = Depends(coordinator),
                      form: FormData = Depends(checked_form)) -> Response:
        try:
            with Session(engine) as session, session.begin():
                worklist.transition(session, load(session, referral_id), str(form.get("status", "")),
                                    user.name, str(form.get("reason", "")))
        except worklist.WorklistError as exc:
            audit.record(engine, user.name, "referral.status", "referral", referral_id, audit.DENIED,
                         str(exc)[:500])
            return back(referral_id, str(exc))
        return back(referral_id)

    @app.post("/referrals/{referral_id}/dxa")
    def dxa(referral_id: int, user: SignedIn = Depends(coordinator),
            form: FormData = Depends(checked_form)) -> Response:
        try:
            scores = {key: worklist.parse_t_score(str(form.get(key, "")), key)
                      for key in ("lumbar_spine", "femoral_neck", "total_hip")}
            try:
                date = dt.date.fromisoformat(str(form.get("dxa_date", "")))
            except ValueError as exc:
                raise worklist.WorklistError("dxa_date: expected YYYY-MM-DD") from exc
            with Session(engine) as session, session.begin():
                worklist.enter_dxa(session, load(session, referral_id), user.name, date=date, **scores)
        except worklist.WorklistError as exc:
            return back(referral_id, str(exc))
        return back(referral_id)

    @app.get("/outcomes")
    def outcomes_page(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
        with Session(engine) as session:
            months, overall = worklist.outcomes(session)
        return page(request, "outcomes.html", user, months=months, overall=overall, classes=CLASS_NAMES)

    # --- admin ---------------------------------------------------------------------------------------
    @app.get("/admin/audit")
    def audit_page(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
        params = request.query_params
        page_no = max(1, int(_parse_number(params.get("page"), "page") or 1))
        query = select(AuditEvent)
        if params.get("object_type"):
            query = query.where(AuditEvent.object_type == params["object_type"])
        if params.get("object_id"):
            query = query.where(AuditEvent.object_id == params["object_id"])
        with Session(engine) as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            events = list(session.scalars(query.order_by(AuditEvent.id.desc())
                                          .offset((page_no - 1) * AUDIT_PAGE).limit(AUDIT_PAGE)))
            return page(request, "audit.html", user, events=events, page_no=page_no,
                        pages=max(1, -(-total // AUDIT_PAGE)), total=total,
                        object_type=params.get("object_type", ""), object_id=params.get("object_id", ""))

    def users_page(request: Request, user: SignedIn, error: str = "", status_code: int = 200) -> HTMLResponse:
        with Session(engine) as session:
            users = list(session.scalars(select(User).order_by(User.name)))
            return page(request, "users.html", user, status_code, users=users, roles=ROLES, error=error)

    @app.get("/admin/users")
    def users(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
        return users_page(request, user)

    @app.post("/admin/users")
    def create_user(request: Request, user: SignedIn = Depends(admin),
                    form: FormData = Depends(admin_form)) -> Response:
        name = str(form.get("name", ""))
        try:
            with Session(engine) as session, session.begin():
                created = add_user(session, name, str(form.get("role", "")), str(form.get("password", "")))
                audit.record(session, user.name, "user.add", "user", created.name, detail=created.role)
        except AuthError as exc:
            return users_page(request, user, str(exc), 400)
        return RedirectResponse("/admin/users", status_code=303)

    @app.post("/admin/users/{user_id}/disabled")
    def disable_user(user_id: int, user: SignedIn = Depends(admin),
                     form: FormData = Depends(admin_form)) -> Response:
        disabled = form.get("disabled") == "1"
        if user_id == user.user_id and disabled:
            raise HTTPException(status_code=400, detail="you cannot disable your own account")
        with Session(engine) as session, session.begin():
            target = session.get(User, user_id)
            if target is None:
                raise HTTPException(status_code=404, detail=f"no user {user_id}")
            target.disabled = disabled
            audit.record(session, user.name, "user.disable" if disabled else "user.enable", "user",
                         target.name)
        return RedirectResponse("/admin/users", status_code=303)

    return app
