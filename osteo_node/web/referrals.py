"""The referrals router: the worklist, one referral, its Grad-CAM image, status changes, DXA
entry, exports (CSV, FHIR) and outcomes. Routes check input and call osteo_node.worklist."""

from __future__ import annotations

import datetime as dt
import io
import json
import urllib.parse
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image
from pydicom import dcmread
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit, worklist
from ..db import Referral, Result, utcnow
from ..records import CLASS_NAMES
from ..refer import STATUSES
from .auth import SignedIn
from .deps import (FILTER_KEYS, checked_form, context, coordinator, filters_from, page,
                   parse_page)

router = APIRouter()


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


def load(session: Session, referral_id: int) -> Referral:
    referral = session.get(Referral, referral_id)
    if referral is None:
        raise HTTPException(status_code=404, detail=f"no referral {referral_id}")
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
    with Session(ctx.engine) as session:
        rows, total = worklist.find(session, filters, offset=(page_no - 1) * page_size,
                                    limit=page_size)
        counts = worklist.status_counts(session)
        kept = {k: params[k] for k in FILTER_KEYS if params.get(k)}
        pages = max(1, -(-total // page_size))
        return page(request, "worklist.html", user, rows=rows, total=total, counts=counts,
                    params=kept, page_no=page_no, pages=pages, statuses=STATUSES,
                    risks=CLASS_NAMES, query=urllib.parse.urlencode(kept),
                    link=lambda **extra: "?" + urllib.parse.urlencode(
                        {**kept, **{k: v for k, v in extra.items() if v is not None}}))


@router.get("/referrals.csv")
def referral_csv(request: Request, user: SignedIn = Depends(coordinator)) -> Response:
    filters = filters_from(dict(request.query_params))
    with Session(context(request).engine) as session, session.begin():
        rows, total = worklist.find(session, filters)
        body = worklist.to_csv(rows)
        audit.record(session, user.name, "referral.export.csv", "worklist", "",
                     detail=f"{total} referrals; ids {','.join(str(r.id) for r in rows)[:1500]}")
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return Response(body, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="referrals-{stamp}.csv"'})


@router.get("/referrals/{referral_id}")
def referral_page(request: Request, referral_id: int,
                  user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    with Session(context(request).engine) as session, session.begin():
        referral = load(session, referral_id)
        audit.record(session, user.name, "referral.view", "referral", referral_id)
        error = request.query_params.get("error", "")
        return page(request, "referral.html", user, r=referral,
                    events=worklist.history(session, referral_id),
                    next_statuses=worklist.TRANSITIONS[referral.status],
                    needs_reason=worklist.NEEDS_REASON, dxa_category=worklist.dxa_category(referral),
                    error=error[:200], today=dt.date.today().isoformat())


@router.get("/referrals/{referral_id}/heatmap.png")
def heatmap(request: Request, referral_id: int, _user: SignedIn = Depends(coordinator)) -> Response:
    ctx = context(request)
    with Session(ctx.engine) as session:
        referral = load(session, referral_id)
        result = session.get(Result, referral.result_id)
        sc_path = result.sc_path if result else ""
    if not sc_path:
        raise HTTPException(status_code=404, detail="no secondary capture for this referral")
    try:
        png = secondary_capture_png(ctx.store.absolute(sc_path))
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail="the image is no longer stored "
                            "(past storage.retention_days)") from exc
    return Response(png, media_type="image/png")


@router.get("/referrals/{referral_id}/fhir.json")
def fhir(request: Request, referral_id: int, user: SignedIn = Depends(coordinator)) -> Response:
    with Session(context(request).engine) as session, session.begin():
        resource = worklist.to_fhir(load(session, referral_id))
        audit.record(session, user.name, "referral.export.fhir", "referral", referral_id)
    return Response(json.dumps(resource, indent=2), media_type="application/fhir+json")


def back(referral_id: int, error: str = "") -> RedirectResponse:
    suffix = "?" + urllib.parse.urlencode({"error": error}) if error else ""
    return RedirectResponse(f"/referrals/{referral_id}{suffix}", status_code=303)


@router.post("/referrals/{referral_id}/status")
def change_status(request: Request, referral_id: int, user: SignedIn = Depends(coordinator),
                  form: FormData = Depends(checked_form)) -> Response:
    engine = context(request).engine
    try:
        with Session(engine) as session, session.begin():
            worklist.transition(session, load(session, referral_id), str(form.get("status", "")),
                                user.name, str(form.get("reason", "")))
    except worklist.WorklistError as exc:
        audit.record(engine, user.name, "referral.status", "referral", referral_id, audit.DENIED,
                     str(exc)[:500])
        return back(referral_id, str(exc))
    return back(referral_id)


@router.post("/referrals/{referral_id}/dxa")
def dxa(request: Request, referral_id: int, user: SignedIn = Depends(coordinator),
        form: FormData = Depends(checked_form)) -> Response:
    try:
        scores = {key: worklist.parse_t_score(str(form.get(key, "")), key)
                  for key in ("lumbar_spine", "femoral_neck", "total_hip")}
        try:
            date = dt.date.fromisoformat(str(form.get("dxa_date", "")))
        except ValueError as exc:
            raise worklist.WorklistError("dxa_date: expected YYYY-MM-DD") from exc
        with Session(context(request).engine) as session, session.begin():
            worklist.enter_dxa(session, load(session, referral_id), user.name, date=date, **scores)
    except worklist.WorklistError as exc:
        return back(referral_id, str(exc))
    return back(referral_id)


@router.get("/outcomes")
def outcomes_page(request: Request, user: SignedIn = Depends(coordinator)) -> HTMLResponse:
    with Session(context(request).engine) as session:
        months, overall = worklist.outcomes(session)
    return page(request, "outcomes.html", user, months=months, overall=overall, classes=CLASS_NAMES)
