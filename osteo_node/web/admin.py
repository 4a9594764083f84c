"""The admin router: the audit trail and user management (admin role only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit
from ..db import User
from .auth import ROLES, AuthError, SignedIn, add_user, set_disabled
from .deps import admin, admin_form, context, page, parse_page

router = APIRouter(prefix="/admin")
AUDIT_PAGE = 100


@router.get("/audit")
def audit_page(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
    params = request.query_params
    page_no = parse_page(params.get("page"))
    query = audit.Query(object_type=params.get("object_type", ""), object_id=params.get("object_id", ""))
    with Session(context(request).engine) as session:
        events, total = audit.search(session, query, offset=(page_no - 1) * AUDIT_PAGE,
                                     limit=AUDIT_PAGE)
        return page(request, "audit.html", user, events=events, page_no=page_no,
                    pages=max(1, -(-total // AUDIT_PAGE)), total=total,
                    object_type=query.object_type, object_id=query.object_id)


def users_page(request: Request, user: SignedIn, error: str = "",
               status_code: int = 200) -> HTMLResponse:
    with Session(context(request).engine) as session:
        users = list(session.scalars(select(User).order_by(User.name)))
        return page(request, "users.html", user, status_code, users=users, roles=ROLES, error=error)


@router.get("/users")
def users(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
    return users_page(request, user)


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
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/users/{user_id}/disabled")
def disable_user(request: Request, user_id: int, user: SignedIn = Depends(admin),
                 form: FormData = Depends(admin_form)) -> Response:
    disabled = form.get("disabled") == "1"
    if user_id == user.user_id and disabled:
        raise HTTPException(status_code=400, detail="you cannot disable your own account")
    with Session(context(request).engine) as session, session.begin():
        target = session.get(User, user_id)
        if target is None:
            raise HTTPException(status_code=404, detail=f"no user {user_id}")
        set_disabled(session, target, disabled, actor=user.name)
    return RedirectResponse("/admin/users", status_code=303)
