"""The admin router: the audit trail (filters, CSV export) and user management (add, role,
disable, unlock, password reset). Admin role only; every view of the trail or the user list is
itself audited."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit
from ..db import User, utcnow
from .auth import (
    MAX_FAILED_LOGINS,
    ROLES,
    AuthError,
    SignedIn,
    add_user,
    set_disabled,
    set_password,
    set_role,
    unlock,
)
from .deps import admin, admin_form, bad_request, context, page, parse_date, parse_page

router = APIRouter(prefix="/admin")
AUDIT_PAGE = 100
#: The most events one audit export holds (narrow the filter for more).
AUDIT_EXPORT_MAX = 100_000
OUTCOMES = (audit.SUCCESS, audit.FAILURE, audit.DENIED)


def audit_query(request: Request) -> audit.Query:
    params = request.query_params
    text = {key: params.get(key, "").strip()[:64]
            for key in ("object_type", "object_id", "actor", "action", "outcome")}
    if text["outcome"] and text["outcome"] not in OUTCOMES:
        raise bad_request(f"outcome must be one of {', '.join(OUTCOMES)}")
    return audit.Query(**text, date_from=parse_date(params.get("date_from"), "date_from"),
                       date_to=parse_date(params.get("date_to"), "date_to"))


@router.get("/audit")
def audit_page(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
    page_no = parse_page(request.query_params.get("page"))
    query = audit_query(request)
    with Session(context(request).engine) as session, session.begin():
        events, total = audit.search(session, query, offset=(page_no - 1) * AUDIT_PAGE,
                                     limit=AUDIT_PAGE)
        audit.record(session, user.name, "audit.view", "audit", "",
                     detail=f"{query.describe()}; page {page_no}")
        kept = {k: str(v) for k, v in vars(query).items() if v not in ("", None)}
        return page(request, "audit.html", user, events=events, page_no=page_no,
                    pages=max(1, -(-total // AUDIT_PAGE)), total=total, q=query, kept=kept,
                    outcomes=OUTCOMES)


@router.get("/audit.csv")
def audit_csv(request: Request, user: SignedIn = Depends(admin)) -> Response:
    query = audit_query(request)
    with Session(context(request).engine) as session, session.begin():
        events, total = audit.search(session, query, limit=AUDIT_EXPORT_MAX)
        body = audit.to_csv(events)
        audit.record(session, user.name, "audit.export.csv", "audit", "",
                     detail=f"{query.describe()}; {len(events)} of {total} events")
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return Response(body, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'})


def users_page(request: Request, user: SignedIn, error: str = "", status_code: int = 200,
               notice: str = "") -> HTMLResponse:
    ctx = context(request)
    with Session(ctx.engine) as session, session.begin():
        users = list(session.scalars(select(User).order_by(User.name)))
        now = utcnow()
        locked = {u.name for u in users if ctx.sessions.recent_failures(session, u.name, now) >= MAX_FAILED_LOGINS}
        audit.record(session, user.name, "user.list.view", "user", "")
        return page(request, "users.html", user, status_code, users=users, roles=ROLES,
                    error=error, locked=locked, notice=notice)


@router.get("/users")
def users(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
    notice = {"saved": "Saved."}.get(request.query_params.get("done", ""), "")
    return users_page(request, user, notice=notice)


@router.post("/users")
def create_user(request: Request, user: SignedIn = Depends(admin),
                form: FormData = Depends(admin_form)) -> Response:
    try:
        with Session(context(request).engine) as session, session.begin():
            created = add_user(session, str(form.get("name", "")), str(form.get("role", "")),
                               str(form.get("password", "")))
            audit.record(session, user.name, "user.add", "user", created.name, detail=created.role)
    except AuthError as exc:
        return users_page(request, user, str(exc), 400)
    return RedirectResponse("/admin/users?done=saved", status_code=303)


def _target(session: Session, user_id: int) -> User:
    target = session.get(User, user_id) if 1 <= user_id <= 2**31 - 1 else None
    if target is None:
        raise HTTPException(status_code=404, detail=f"There is no user {user_id}.")
    return target


@router.post("/users/{user_id}/disabled")
def disable_user(request: Request, user_id: int, user: SignedIn = Depends(admin),
                 form: FormData = Depends(admin_form)) -> Response:
    disabled = form.get("disabled") == "1"
    if user_id == user.user_id and disabled:
        raise HTTPException(status_code=400, detail="You cannot disable your own account.")
    with Session(context(request).engine) as session, session.begin():
        set_disabled(session, _target(session, user_id), disabled, actor=user.name)
    return RedirectResponse("/admin/users?done=saved", status_code=303)


@router.post("/users/{user_id}/unlock")
def unlock_user(request: Request, user_id: int, user: SignedIn = Depends(admin),
                _form: FormData = Depends(admin_form)) -> Response:
    with Session(context(request).engine) as session, session.begin():
        unlock(session, _target(session, user_id), actor=user.name)
    return RedirectResponse("/admin/users?done=saved", status_code=303)


@router.post("/users/{user_id}/role")
def change_role(request: Request, user_id: int, user: SignedIn = Depends(admin),
                form: FormData = Depends(admin_form)) -> Response:
    role = str(form.get("role", ""))
    if user_id == user.user_id and role != user.role:
        return users_page(request, user, "You cannot change your own role: ask another admin.", 400)
    try:
        with Session(context(request).engine) as session, session.begin():
            set_role(session, _target(session, user_id), role, actor=user.name)
    except AuthError as exc:
        return users_page(request, user, str(exc), 400)
    return RedirectResponse("/admin/users?done=saved", status_code=303)


@router.post("/users/{user_id}/password")
def reset_password(request: Request, user_id: int, user: SignedIn = Depends(admin),
                   form: FormData = Depends(admin_form)) -> Response:
    try:
        with Session(context(request).engine) as session, session.begin():
            set_password(session, _target(session, user_id), str(form.get("password", "")),
                         actor=user.name)
    except AuthError as exc:
        return users_page(request, user, str(exc), 400)
    return RedirectResponse("/admin/users?done=saved", status_code=303)
