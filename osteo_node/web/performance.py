"""The Performance page (admins): `osteo-node validate` in the web app, and site operating points.

Thin routes over osteo_node.validate, osteo_node.validation_report and osteo_node.operating_point:
the same report as `validate --out` (one template, `_performance.html`), its PNG plots served
from memory (the page's CSP allows only 'self'), and a form per model to set an operating point
(POST with the session's CSRF token). Each view of the page and each change is audited.

The engine and settings come from the application's `WebContext` (web/deps.py).
`worklist_warning` gives the worklist its banner while the live model is failing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from .. import audit
from ..config import Settings
from ..db import DxaResult, Result, ScreenedImage, SiteOperatingPoint
from ..errors import OsteoNodeError
from ..operating_point import (
    BUNDLE,
    FLAGS_PER_WEEK,
    MANUAL,
    TARGET_SENSITIVITY,
    Choice,
    OperatingPointError,
    history,
    set_point,
)
from ..validate import FAILING, Validation, live_model_status, validate
from ..validation_report import PLOTS, Fmt, plot
from .auth import SignedIn
from .deps import admin, admin_form, context, message, page

PATH = "/admin/performance"
#: The worklist banner's status is recomputed at most this often while only results arrive
#: (at once when a DXA result or an operating point changes).
STATUS_TTL_S = 300.0


def data_version(engine: Engine, tables: tuple[Any, ...]) -> tuple[Any, ...]:
    """Row count and highest id of each table: changes whenever a row is added."""
    with Session(engine) as session:
        return tuple(tuple(session.execute(select(func.count(), func.max(t.id))).one())
                     for t in tables)


class PerformanceCache:
    """The web app's last validation and live status, recomputed only when their data changed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[Any, ...] | None = None
        self.validation: Validation | None = None
        self.pngs: dict[tuple[str, str], bytes] = {}
        self.status_key: tuple[Any, ...] | None = None
        self.status_at = 0.0
        self.status: str | None = None

    def report(self, engine: Engine, settings: Settings) -> Validation:
        key = data_version(engine, (DxaResult, Result, ScreenedImage, SiteOperatingPoint))
        with self.lock:
            if self.validation is None or key != self.key:
                self.validation, self.key, self.pngs = validate(engine, settings), key, {}
                self.status_key, self.status_at = None, 0.0  # the banner follows the page
                self.status = next((m["status"] for m in self.validation.report["models"]
                                    if m["role"] == "live"), None)
            return self.validation

    def png(self, validation: Validation, device_uid: str, kind: str) -> bytes:
        with self.lock:
            if (device_uid, kind) not in self.pngs:
                self.pngs[(device_uid, kind)] = plot(validation, device_uid, kind)
            return self.pngs[(device_uid, kind)]

    def live_status(self, engine: Engine, settings: Settings) -> str | None:
        key = data_version(engine, (DxaResult, SiteOperatingPoint))
        with self.lock:
            fresh = key == self.status_key and time.monotonic() - self.status_at < STATUS_TTL_S
            if not fresh:
                self.status = live_model_status(engine, settings)
                self.status_key, self.status_at = key, time.monotonic()
            return self.status


def cache(request: Request) -> PerformanceCache:
    state = request.app.state  # one cache per application
    if getattr(state, "performance", None) is None:
        state.performance = PerformanceCache()
    found: PerformanceCache = state.performance
    return found


def worklist_warning(request: Request) -> str:
    """The worklist's banner text while the live model's status is failing, else ""."""
    try:
        ctx = context(request)
        status = cache(request).live_status(ctx.engine, ctx.settings)
    except OsteoNodeError:  # no readable bundle: the worker says so; the worklist still works
        return ""
    if status != FAILING:
        return ""
    return ("Warning: the live model is failing site validation (its low-BMD AUC on local DXA "
            "results is below the configured minimum). Its referrals are unreliable here; see "
            "the Performance page.")


def choice_from(form: FormData) -> Choice:
    """The operating point asked for in the page's form (mode + value)."""
    mode, raw = str(form.get("mode", "")), str(form.get("value", "")).strip()
    if mode == BUNDLE:
        return Choice(bundle_default=True)
    try:
        value = float(raw)
    except ValueError as exc:
        raise OperatingPointError(f"value: expected a number, got {raw!r}") from exc
    if mode == TARGET_SENSITIVITY:
        return Choice(target_sensitivity=value)
    if mode == FLAGS_PER_WEEK:
        return Choice(flags_per_week=value)
    if mode == MANUAL:
        return Choice(low_bmd_threshold=value)
    raise OperatingPointError(f"mode: expected one of {TARGET_SENSITIVITY}, {FLAGS_PER_WEEK}, "
                              f"{MANUAL}, {BUNDLE}; got {mode!r}")


router = APIRouter(prefix=PATH)


def _page(request: Request, user: SignedIn, *, error: str = "", status_code: int = 200) -> HTMLResponse:
    """The Performance page; `error` is the text of an operating point just refused (never taken
    from the URL: a `?done=` code picks a fixed notice)."""
    ctx = context(request)
    validation = cache(request).report(ctx.engine, ctx.settings)
    with Session(ctx.engine) as session, session.begin():
        points = history(session)
        audit.record(session, user.name, "performance.view", "page", PATH,
                     detail=f"{len(validation.report['models'])} models, "
                            f"{validation.report['paired_dxa_results']} pairs")
        for row in points:
            session.expunge(row)
    done = request.query_params.get("done", "")
    return page(request, "performance.html", user, status_code, report=validation.report, fmt=Fmt,
                image_url=lambda uid, kind: f"{PATH}/{uid}/{kind}.png", editable=True,
                csrf_token=user.csrf_token, history=points,
                message=message(done) if done == "saved" else "", error=error)


@router.get("")
def performance_page(request: Request, user: SignedIn = Depends(admin)) -> HTMLResponse:
    return _page(request, user)


@router.get("/{device_uid}/{kind}.png")
def plot_png(request: Request, device_uid: str, kind: str,
             _user: SignedIn = Depends(admin)) -> Response:
    if kind not in PLOTS:
        raise HTTPException(status_code=404, detail=f"no plot {kind!r}; plots: {', '.join(PLOTS)}")
    ctx, c = context(request), cache(request)
    validation = c.report(ctx.engine, ctx.settings)
    if device_uid not in validation.data:
        raise HTTPException(status_code=404, detail=f"no model with Device UID {device_uid}")
    return Response(c.png(validation, device_uid, kind), media_type="image/png")


@router.post("/operating-point")
def set_operating_point(request: Request, user: SignedIn = Depends(admin),
                        form: FormData = Depends(admin_form)) -> Response:
    ctx = context(request)
    device_uid = str(form.get("device_uid", ""))[:64]
    try:
        set_point(ctx.engine, ctx.settings, device_uid, choice_from(form), user.name)
    except OperatingPointError as exc:
        audit.record(ctx.engine, user.name, "operating_point.set", "model", device_uid,
                     audit.FAILURE, str(exc)[:500])
        return _page(request, user, error=str(exc), status_code=400)
    return RedirectResponse(f"{PATH}?done=saved", status_code=303)
