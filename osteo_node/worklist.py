"""The coordinators' side of referrals: list, change status, enter DXA results, measure outcomes,
export (CSV, FHIR R4 ServiceRequest). Plain functions over a Session; the web routes call them.

Status machine: new -> contacted -> scheduled -> completed; from any open status also declined
(the patient said no) or dismissed (not appropriate), both with a reason. Closed statuses are final.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import audit
from .codes import CATEGORY_CODES, DXA_LOINC, DXA_SNOMED
from .db import Referral, ReferralEvent, utcnow
from .records import CLASS_NAMES, category_from_t_score
from .refer import COMPLETED, CONTACTED, DECLINED, DISMISSED, NEW, OPEN_STATUSES, SCHEDULED, STATUSES

#: Allowed status changes; declined and dismissed need a reason.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    NEW: (CONTACTED, DECLINED, DISMISSED),
    CONTACTED: (SCHEDULED, DECLINED, DISMISSED),
    SCHEDULED: (COMPLETED, DECLINED, DISMISSED),
    COMPLETED: (),
    DECLINED: (),
    DISMISSED: (),
}
NEEDS_REASON = (DECLINED, DISMISSED)
T_SCORE_RANGE = (-7.0, 5.0)
SORTS = ("date", "risk", "age")


class WorklistError(ValueError):
    """A coordinator's request is not allowed (invalid transition, missing reason, bad T-score)."""


@dataclass(frozen=True)
class Filters:
    """Worklist filter and order; every field optional."""

    status: str | None = None
    risk: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    age_min: float | None = None
    age_max: float | None = None
    sort: str = "date"
    descending: bool = True

    def __post_init__(self) -> None:
        if self.status not in (None, "open", *STATUSES):
            raise WorklistError(f"status must be one of open, {', '.join(STATUSES)}; got {self.status!r}")
        if self.risk not in (None, *CLASS_NAMES):
            raise WorklistError(f"risk must be one of {', '.join(CLASS_NAMES)}; got {self.risk!r}")
        if self.sort not in SORTS:
            raise WorklistError(f"sort must be one of {', '.join(SORTS)}; got {self.sort!r}")


def _filtered(filters: Filters):  # type: ignore[no-untyped-def]
    query = select(Referral)
    if filters.status == "open":
        query = query.where(Referral.status.in_(OPEN_STATUSES))
    elif filters.status:
        query = query.where(Referral.status == filters.status)
    if filters.risk:
        query = query.where(Referral.risk_category == filters.risk)
    if filters.date_from:
        query = query.where(Referral.created_at >= dt.datetime.combine(filters.date_from, dt.time()))
    if filters.date_to:
        end = dt.datetime.combine(filters.date_to + dt.timedelta(days=1), dt.time())
        query = query.where(Referral.created_at < end)
    if filters.age_min is not None:
        query = query.where(Referral.age >= filters.age_min)
    if filters.age_max is not None:
        query = query.where(Referral.age < filters.age_max + 1)  # "up to 80" includes 80.9
    return query


def _ordered(query, filters: Filters):  # type: ignore[no-untyped-def]
    column = {"date": Referral.created_at, "risk": Referral.p_osteoporosis, "age": Referral.age}[filters.sort]
    key = column.desc() if filters.descending else column.asc()
    tie = Referral.id.desc() if filters.descending else Referral.id.asc()
    return query.order_by(key, tie)


def find(session: Session, filters: Filters, *, offset: int = 0,
         limit: int | None = None) -> tuple[list[Referral], int]:
    """The referrals matching `filters`, in order, one page; and how many match in all."""
    query = _filtered(filters)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = _ordered(query, filters).offset(offset)
    if limit is not None:
        page = page.limit(limit)
    return list(session.scalars(page)), int(total)


def status_counts(session: Session) -> dict[str, int]:
    """Referrals per status, every status present."""
    rows = session.execute(select(Referral.status, func.count()).group_by(Referral.status)).all()
    found = {status: count for status, count in rows}
    return {status: int(found.get(status, 0)) for status in STATUSES}


def history(session: Session, referral_id: int) -> list[ReferralEvent]:
    return list(session.scalars(select(ReferralEvent).where(ReferralEvent.referral_id == referral_id)
                                .order_by(ReferralEvent.at, ReferralEvent.id)))


def transition(session: Session, referral: Referral, to_status: str, actor: str, reason: str = "") -> None:
    """Move `referral` to `to_status` (history event + audit); WorklistError when not allowed."""
    reason = reason.strip()
    allowed = TRANSITIONS.get(referral.status, ())
    if to_status not in allowed:
        raise WorklistError(f"a {referral.status} referral cannot become {to_status!r} "
                            f"(allowed: {', '.join(allowed) or 'none, it is closed'})")
    if to_status in NEEDS_REASON and not reason:
        raise WorklistError(f"a reason is required to mark a referral {to_status}")
    now = utcnow()
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="status",
                              from_status=referral.status, to_status=to_status, reason=reason[:2000]))
    audit.record(session, actor, "referral.status", "referral", referral.id,
                 detail=f"{referral.status} -> {to_status}")
    referral.status = to_status
    referral.updated_at = now


def parse_t_score(value: str, name: str) -> float | None:
    """A T-score typed by a coordinator ('' = not measured); WorklistError names the field."""
    value = value.strip().replace(",", ".")
    if not value:
        return None
    try:
        t = float(value)
    except ValueError as exc:
        raise WorklistError(f"{name}: not a number ({value!r})") from exc
    if not T_SCORE_RANGE[0] <= t <= T_SCORE_RANGE[1]:
        raise WorklistError(f"{name}: T-score {t} outside {T_SCORE_RANGE[0]}..{T_SCORE_RANGE[1]}")
    return t


def enter_dxa(session: Session, referral: Referral, actor: str, *, lumbar_spine: float | None,
              femoral_neck: float | None, total_hip: float | None, date: dt.date) -> None:
    """Record the DXA T-scores (at least one) and scan date."""
    if referral.status == DISMISSED:
        raise WorklistError("a dismissed referral takes no DXA result")
    if lumbar_spine is None and femoral_neck is None and total_hip is None:
        raise WorklistError("enter at least one T-score")
    if date > dt.date.today() + dt.timedelta(days=1):
        raise WorklistError(f"DXA date {date.isoformat()} is in the future")
    referral.dxa_t_lumbar_spine, referral.dxa_t_femoral_neck = lumbar_spine, femoral_neck
    referral.dxa_t_total_hip, referral.dxa_date = total_hip, date
    now = utcnow()
    referral.updated_at = now
    category = dxa_category(referral)
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="dxa",
                              reason=f"DXA {date.isoformat()}: lowest T-score category {category}"))
    audit.record(session, actor, "referral.dxa", "referral", referral.id, detail=f"category {category}")


def lowest_t_score(referral: Referral) -> float | None:
    scores = [t for t in (referral.dxa_t_lumbar_spine, referral.dxa_t_femoral_neck,
                          referral.dxa_t_total_hip) if t is not None]
    return min(scores) if scores else None


def dxa_category(referral: Referral) -> str | None:
    """WHO category of the lowest entered T-score, None without a DXA result."""
    t = lowest_t_score(referral)
    return category_from_t_score(t) if t is not None else None


@dataclass
class OutcomeRow:
    """Outcomes of referrals created in one month (or overall), counted on entered DXA results."""

    period: str
    referrals: int = 0
    with_dxa: int = 0
    dxa_low_bmd: int = 0
    dxa_osteoporosis: int = 0
    agree: int = 0
    #: confusion[predicted][dxa] counts
    confusion: dict[str, dict[str, int]] = field(
        default_factory=lambda: {p: {d: 0 for d in CLASS_NAMES} for p in CLASS_NAMES})

    @property
    def ppv_low_bmd(self) -> float | None:
        """Share of referred patients with a DXA result whose DXA shows low BMD (T < -1.0)."""
        return self.dxa_low_bmd / self.with_dxa if self.with_dxa else None

    @property
    def ppv_osteoporosis(self) -> float | None:
        return self.dxa_osteoporosis / self.with_dxa if self.with_dxa else None

    @property
    def agreement(self) -> float | None:
        """Share of predicted categories equal to the DXA category."""
        return self.agree / self.with_dxa if self.with_dxa else None

    def add(self, referral: Referral) -> None:
        self.referrals += 1
        category = dxa_category(referral)
        if category is None:
            return
        self.with_dxa += 1
        self.dxa_low_bmd += category != "normal"
        self.dxa_osteoporosis += category == "osteoporosis"
        self.agree += category == referral.risk_category
        if referral.risk_category in self.confusion:
            self.confusion[referral.risk_category][category] += 1


def outcomes(session: Session) -> tuple[list[OutcomeRow], OutcomeRow]:
    """Per month of referral (newest first) and overall; dismissed referrals are left out."""
    months: dict[str, OutcomeRow] = {}
    overall = OutcomeRow("all")
    for referral in session.scalars(select(Referral).where(Referral.status != DISMISSED)):
        month = referral.created_at.strftime("%Y-%m")
        months.setdefault(month, OutcomeRow(month)).add(referral)
        overall.add(referral)
    return [months[m] for m in sorted(months, reverse=True)], overall


CSV_COLUMNS = (
    "referral_id", "status", "risk_category", "rule", "created_at", "patient_id", "issuer_of_patient_id",
    "patient_name", "birth_date", "sex", "age", "accession_number", "study_date", "study_instance_uid",
    "sop_instance_uid", "p_normal", "p_osteopenia", "p_osteoporosis", "model_name", "model_version",
    "device_uid", "osteoporosis_threshold", "low_bmd_threshold", "dxa_date", "dxa_t_lumbar_spine",
    "dxa_t_femoral_neck", "dxa_t_total_hip",
)


def _csv_safe(value: Any) -> str:
    """Text for a CSV cell; a leading =, +, - or @ is quoted so spreadsheets do not run it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def to_csv(referrals: list[Referral]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in referrals:
        values = {c: getattr(r, c, None) for c in CSV_COLUMNS}
        values["referral_id"] = r.id
        writer.writerow([_csv_safe(values[c]) for c in CSV_COLUMNS])
    return out.getvalue()


#: Referral status -> (FHIR request-status, request-intent).
FHIR_STATUS: dict[str, tuple[str, str]] = {
    NEW: ("draft", "proposal"),
    CONTACTED: ("active", "plan"),
    SCHEDULED: ("active", "plan"),
    COMPLETED: ("completed", "plan"),
    DECLINED: ("revoked", "plan"),
    DISMISSED: ("revoked", "proposal"),
}
SNOMED_SYSTEM, LOINC_SYSTEM = "http://snomed.info/sct", "http://loinc.org"


def _fhir_date(value: dt.date | None) -> str | None:
    return value.isoformat() if value else None


def to_fhir(referral: Referral) -> dict[str, Any]:
    """The referral as a FHIR R4 ServiceRequest for a DXA scan (plain dict, JSON-ready)."""
    status, intent = FHIR_STATUS[referral.status]
    finding = CATEGORY_CODES[referral.risk_category]
    identifier: dict[str, Any] = {"value": referral.patient_id}
    if referral.issuer_of_patient_id:
        identifier["assigner"] = {"display": referral.issuer_of_patient_id}
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": f"osteo-referral-{referral.id}",
        "identifier": [{"system": "urn:osteo-node:referral", "value": str(referral.id)}],
        "status": status,
        "intent": intent,
        "category": [{"text": "Osteoporosis screening follow-up"}],
        "code": {
            "coding": [
                {"system": LOINC_SYSTEM, "code": DXA_LOINC.value, "display": DXA_LOINC.meaning},
                {"system": SNOMED_SYSTEM, "code": DXA_SNOMED.value, "display": DXA_SNOMED.meaning},
            ],
            "text": "DXA bone density scan",
        },
        "subject": {"identifier": identifier, "display": referral.patient_name or None},
        "authoredOn": referral.created_at.replace(tzinfo=dt.UTC).isoformat(),
        "reasonCode": [{
            "coding": [{"system": SNOMED_SYSTEM, "code": finding.value, "display": finding.meaning}],
            "text": f"Chest radiograph AI screening predicts {referral.risk_category} "
                    f"(rule {referral.rule})",
        }],
        "supportingInfo": [{
            "type": "ImagingStudy",
            "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{referral.study_instance_uid}"},
            "display": f"Accession {referral.accession_number}" if referral.accession_number else None,
        }],
        "note": [{"text": (
            f"AI result, not verified by a human. P(normal)={referral.p_normal:.3f}, "
            f"P(osteopenia)={referral.p_osteopenia:.3f}, P(osteoporosis)={referral.p_osteoporosis:.3f}. "
            f"Model {referral.model_name} {referral.model_version} (Device UID {referral.device_uid}); "
            f"thresholds: osteoporosis {referral.osteoporosis_threshold}, low BMD "
            f"{referral.low_bmd_threshold}.")}],
    }
    if referral.dxa_date:
        resource["occurrenceDateTime"] = _fhir_date(referral.dxa_date)
    for entry in (resource["subject"], resource["supportingInfo"][0]):
        if entry.get("display") is None:
            entry.pop("display", None)
    return resource
