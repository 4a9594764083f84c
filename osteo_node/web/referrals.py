"""The referrals router: the worklist (search, filters, sortable columns), one referral (who to
call, contact attempts, notes, appointment, assignment, DXA entry), its Grad-CAM image, exports
(CSV, FHIR ServiceRequest, FHIR Bundle of a list) and outcomes.

Routes check input and call osteo_node.worklist. Every read of patient data is audited: list
views with their filter and the ids shown, referral pages, images and exports (with every id).
Search words can be names or patient ids, which the audit trail never holds: it records their
SHA-256 instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit, worklist
from ..db import Referral, Result, User, utcnow
from ..records import CLASS_NAMES
from ..refer import STATUSES
from . import performance
from .auth import SignedIn
from .deps import (
    FILTER_KEYS,
    ReferralId,
    checked_form,
    context,
    coordinator,
    filters_from,
    message,
    page,
    parse_date,
    parse_page,
)

router = APIRouter()
#: Success notices a redirect may ask for (?done=CODE); never free text.
DONE = ("saved",)


def secondary_capture_png(path: Path) -> bytes:
    """The pixels of a stored secondary capture (RGB or grey) as a PNG; FileNotFoundError when the
    file is gone."""
    ds = dcmread(path)
    rgb = np.asarray(ds.pixel_array)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def filter_summary(filters: worklist.Filters) -> str:
    """The filter of a list view or export for the audit trail (search words as a digest)."""
    parts = [f"{key}={value}" for key, value in (
        ("status", filters.status), ("risk", filters.risk), ("date_from", filters.date_from),
        ("date_to", filters.date_to), ("age_min", filters.age_min), ("age_max", filters.age_max),
        ("assigned_to", filters.assigned_to)) if value is not None]
    if filters.search:
        parts.append("search sha256:" + hashlib.sha256(filters.search.encode()).hexdigest()[:16])
    parts.append(f"sort={filters.sort} {'desc' if filters.descending else 'asc'}")
    return "filter " + " ".join(parts)


def load(session: Session, referral_id: int) -> Referral:
    referral = session.get(Referral, referral_id)
    if referral is None:
        raise HTTPException(status_code=404, detail=f"There is no referral {referral_id}.")
    return referral


@router.get("/")
def home(_user: SignedIn = Depends(coordinator)) -> Response:
    return RedirectResponse("/referrals", status_code=303)


@router.get("/referrals")
def referral_list(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    ctx = context(request)
    page_size = ctx.settings.web.page_size
    params = dict(request.query_params)
    filters = filters_from(params)
    page_no = parse_page(params.get("page"))
    model_warning = performance.worklist_warning(request)  # its own transaction: before ours
    with Session(ctx.engine) as session, session.begin():
        rows, total = worklist.find(session, filters, offset=(page_no - 1) * page_size,
                                    limit=page_size)
        counts = worklist.status_counts(session)
        last_dxa = worklist.current_dxa(session, [(r.patient_id, r.issuer_of_patient_id) for r in rows])
        audit.record(session, user.name, "referral.list.view", "worklist", "",
                     detail=f"{filter_summary(filters)}; page {page_no}; "
                            f"{worklist.id_summary([r.id for r in rows])}")
        kept = {k: params[k] for k in FILTER_KEYS if params.get(k)}
        pages = max(1, -(-total // page_size))
        now = utcnow()
        return page(request, "worklist.html", user, rows=rows, total=total, counts=counts,
                    params=kept, filters=filters, page_no=page_no, pages=pages, statuses=STATUSES,
                    risks=CLASS_NAMES, sorts=worklist.SORTS, query=urllib.parse.urlencode(kept),
                    last_dxa=last_dxa, model_warning=model_warning,
                    waiting={r.id: worklist.days_waiting(r, now) for r in rows},
                    link=lambda **extra: "?" + urllib.parse.urlencode(
                        {**kept, **{k: v for k, v in extra.items() if v is not None}}))


def _export(request: Request, user: SignedIn, action: str) -> tuple[list[Referral], str]:
    filters = filters_from(dict(request.query_params))
    with Session(context(request).engine, expire_on_commit=False) as session, session.begin():
        rows, _total = worklist.find(session, filters)
        audit.record(session, user.name, action, "worklist", "",
                     detail=f"{filter_summary(filters)}; {worklist.id_summary([r.id for r in rows])}")
    return rows, utcnow().strftime("%Y%m%d-%H%M%S")


@router.get("/referrals.csv")
def referral_csv(request: Request, user: SignedIn = Depends(coordinator)) -> Response:
    rows, stamp = _export(request, user, "referral.export.csv")
    return Response(worklist.to_csv(rows), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="referrals-{stamp}.csv"'})


@router.get("/referrals.fhir.json")
def referral_bundle(request: Request, user: SignedIn = Depends(coordinator)) -> Response:
    rows, stamp = _export(request, user, "referral.export.fhir")
    return Response(json.dumps(worklist.to_fhir_bundle(rows), indent=1),
                    media_type="application/fhir+json", headers={
                        "Content-Disposition": f'attachment; filename="referrals-{stamp}.fhir.json"'})


def referral_view(request: Request, user: SignedIn, referral_id: int, *, status_code: int = 200,
                  error: str = "", form: dict[str, str] | None = None) -> HTMLResponse:
    """The referral page (audited); an `error` re-renders it with what the user typed in `form`."""
    with Session(context(request).engine) as session, session.begin():
        referral = load(session, referral_id)
        audit.record(session, user.name, "referral.view", "referral", referral_id)
        done = request.query_params.get("done", "")
        patient = (referral.patient_id, referral.issuer_of_patient_id)
        return page(request, "referral.html", user, status_code, r=referral,
                    events=worklist.history(session, referral_id),
                    next_statuses=worklist.TRANSITIONS[referral.status],
                    needs_reason=worklist.NEEDS_REASON, dxa_category=worklist.dxa_category(referral),
                    versions=worklist.dxa_versions(session, referral),
                    last_dxa=worklist.current_dxa(session, [patient]).get(patient),
                    waiting=worklist.days_waiting(referral),
                    coordinators=list(session.scalars(select(User.name).where(
                        User.disabled.is_(False)).order_by(User.name))),
                    outcomes=worklist.CONTACT_OUTCOMES, error=error,
                    notice=message(done) if done in DONE else "", form=form or {},
                    today=dt.date.today().isoformat())


@router.get("/referrals/{referral_id}")
def referral_page(request: Request, referral_id: ReferralId,
                  user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    return referral_view(request, user, referral_id)


@router.get("/referrals/{referral_id}/heatmap.png")
def heatmap(request: Request, referral_id: ReferralId,
            user: SignedIn = Depends(coordinator)) -> Response:
    ctx = context(request)
    with Session(ctx.engine) as session, session.begin():
        referral = load(session, referral_id)
        result = session.get(Result, referral.result_id)
        sc_path = result.sc_path if result else ""
        audit.record(session, user.name, "referral.image.view", "referral", referral_id,
                     audit.SUCCESS if sc_path else audit.FAILURE)
    if not sc_path:
        raise HTTPException(status_code=404, detail="There is no Grad-CAM image for this referral.")
    try:
        png = secondary_capture_png(ctx.store.absolute(sc_path))
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail="The image is no longer stored "
                            "(past storage.retention_days).") from exc
    return Response(png, media_type="image/png")


@router.get("/referrals/{referral_id}/fhir.json")
def fhir(request: Request, referral_id: ReferralId,
         user: SignedIn = Depends(coordinator)) -> Response:
    with Session(context(request).engine) as session, session.begin():
        resource = worklist.to_fhir(load(session, referral_id))
        audit.record(session, user.name, "referral.export.fhir", "referral", referral_id)
    return Response(json.dumps(resource, indent=2), media_type="application/fhir+json")


def _typed(form: FormData) -> dict[str, str]:
    return {k: str(v)[:4000] for k, v in form.items() if k != "csrf_token" and isinstance(v, str)}


def _act(request: Request, referral_id: int, user: SignedIn, form: FormData, action: str,
         change: Any) -> Response:
    """Apply `change(session, referral)` in one transaction; on WorklistError show the page again
    with the message and the typed values (400), audited as denied."""
    engine = context(request).engine
    try:
        with Session(engine) as session, session.begin():
            change(session, load(session, referral_id))
    except worklist.WorklistError as exc:
        audit.record(engine, user.name, action, "referral", referral_id, audit.DENIED, str(exc)[:500])
        return referral_view(request, user, referral_id, status_code=400, error=str(exc),
                             form=_typed(form))
    return RedirectResponse(f"/referrals/{referral_id}?done=saved", status_code=303)


def _date_field(form: FormData, name: str) -> dt.date | None:
    value = str(form.get(name, "")).strip()
    try:
        return parse_date(value, name)
    except HTTPException as exc:
        raise worklist.WorklistError(str(exc.detail)) from exc


@router.post("/referrals/{referral_id}/status")
def change_status(request: Request, referral_id: ReferralId, user: SignedIn = Depends(coordinator),
                  form: FormData = Depends(checked_form)) -> Response:
    def change(session: Session, referral: Referral) -> None:
        worklist.transition(session, referral, str(form.get("status", "")), user.name,
                            str(form.get("reason", "")),
                            appointment=_date_field(form, "appointment_date"))
    return _act(request, referral_id, user, form, "referral.status", change)


@router.post("/referrals/{referral_id}/contact")
def contact(request: Request, referral_id: ReferralId, user: SignedIn = Depends(coordinator),
            form: FormData = Depends(checked_form)) -> Response:
    return _act(request, referral_id, user, form, "referral.contact",
                lambda session, referral: worklist.log_contact(
                    session, referral, user.name, str(form.get("outcome", "")),
                    str(form.get("note", ""))))


@router.post("/referrals/{referral_id}/note")
def note(request: Request, referral_id: ReferralId, user: SignedIn = Depends(coordinator),
         form: FormData = Depends(checked_form)) -> Response:
    return _act(request, referral_id, user, form, "referral.note",
                lambda session, referral: worklist.add_note(session, referral, user.name,
                                                            str(form.get("note", ""))))


@router.post("/referrals/{referral_id}/assign")
def assign(request: Request, referral_id: ReferralId, user: SignedIn = Depends(coordinator),
           form: FormData = Depends(checked_form)) -> Response:
    return _act(request, referral_id, user, form, "referral.assign",
                lambda session, referral: worklist.assign(session, referral, user.name,
                                                          str(form.get("assigned_to", ""))))


@router.post("/referrals/{referral_id}/dxa")
def dxa(request: Request, referral_id: ReferralId, user: SignedIn = Depends(coordinator),
        form: FormData = Depends(checked_form)) -> Response:
    engine = context(request).engine
    try:
        scores = {key: worklist.parse_t_score(str(form.get(key, "")), key)
                  for key in ("lumbar_spine", "femoral_neck", "total_hip")}
        date = _date_field(form, "dxa_date")
        if date is None:
            raise worklist.WorklistError("dxa_date: give the date of the DXA scan (YYYY-MM-DD)")
        with Session(engine) as session:
            load(session, referral_id)  # 404 before anything is written
        worklist.enter_dxa(engine, referral_id, user.name, date=date, **scores)
    except worklist.WorklistError as exc:
        audit.record(engine, user.name, "referral.dxa", "referral", referral_id, audit.DENIED,
                     str(exc)[:500])
        return referral_view(request, user, referral_id, status_code=400, error=str(exc),
                             form=_typed(form))
    return RedirectResponse(f"/referrals/{referral_id}?done=saved", status_code=303)


@router.get("/outcomes")
def outcomes_page(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    with Session(context(request).engine) as session:
        months, overall = worklist.outcomes(session)
    return page(request, "outcomes.html", user, months=months, overall=overall, classes=CLASS_NAMES)
