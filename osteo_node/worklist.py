"""The coordinators' side of referrals: list and search, change status, log contact attempts and
notes, schedule and assign, enter DXA results (versioned in `dxa_results`), measure outcomes,
export (CSV, FHIR R4 ServiceRequest, a Bundle of a whole list). Plain functions over a Session;
the web routes call them.

Status machine: new -> contacted -> scheduled -> completed; from any open status also declined
(the patient said no) or dismissed (not appropriate), both with a reason. Closed statuses are final.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from . import audit, dxa
from .codes import CATEGORY_CODES, DXA_LOINC, DXA_SNOMED
from .db import DxaResult, Referral, ReferralEvent, User, utcnow
from .errors import DxaError
from .records import CLASS_NAMES, category_from_t_score
from .refer import (
    COMPLETED,
    CONTACTED,
    DECLINED,
    DISMISSED,
    NEW,
    OPEN_STATUSES,
    SCHEDULED,
    STATUSES,
)

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
T_SCORE_RANGE = dxa.T_SCORE_RANGE
#: Sort keys of the worklist: referral date (ascending = longest waiting first), study date,
#: P(osteoporosis), age, name, status.
SORTS = ("date", "study_date", "risk", "age", "name", "status")
#: Outcomes of a contact attempt (a phone call, usually).
CONTACT_OUTCOMES = ("reached", "no answer", "voicemail", "wrong number", "letter sent")
#: The earliest DXA date accepted: earlier dates are typing errors (a year of 1900 or 0001).
EARLIEST_DXA = dt.date(1901, 1, 1)
MAX_SEARCH = 100


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
    #: Words that must each match the patient's name, patient ID or accession number.
    search: str = ""
    assigned_to: str | None = None

    def __post_init__(self) -> None:
        if len(self.search) > MAX_SEARCH:
            raise WorklistError(f"search: at most {MAX_SEARCH} characters")
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
    if filters.assigned_to is not None:
        query = query.where(Referral.assigned_to == filters.assigned_to)
    for word in filters.search.replace("^", " ").split():
        pattern = "%" + word.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(func.lower(Referral.patient_name).like(pattern, escape="\\"),
                                func.lower(Referral.patient_id).like(pattern, escape="\\"),
                                func.lower(Referral.accession_number).like(pattern, escape="\\")))
    return query


def _ordered(query, filters: Filters):  # type: ignore[no-untyped-def]
    column = {"date": Referral.created_at, "study_date": Referral.study_date,
              "risk": Referral.p_osteoporosis, "age": Referral.age, "name": Referral.patient_name,
              "status": Referral.status}[filters.sort]
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


def transition(session: Session, referral: Referral, to_status: str, actor: str, reason: str = "",
               *, appointment: dt.date | None = None) -> None:
    """Move `referral` to `to_status` (history event + audit); WorklistError when not allowed.
    Scheduling needs the appointment date (today or later)."""
    reason = reason.strip()
    allowed = TRANSITIONS.get(referral.status, ())
    if to_status not in allowed:
        raise WorklistError(f"a {referral.status} referral cannot become {to_status!r} "
                            f"(allowed: {', '.join(allowed) or 'none, it is closed'})")
    if to_status in NEEDS_REASON and not reason:
        raise WorklistError(f"a reason is required to mark a referral {to_status}")
    if to_status == SCHEDULED:
        if appointment is None:
            raise WorklistError("appointment: give the date of the DXA appointment to schedule it")
        if not dt.date.today() - dt.timedelta(days=1) <= appointment <= dt.date.today() + dt.timedelta(days=730):
            raise WorklistError(f"appointment: {appointment.isoformat()} is not between today and "
                                "two years ahead")
        referral.appointment_date = appointment
        reason = f"appointment {appointment.isoformat()}" + (f"; {reason}" if reason else "")
    now = utcnow()
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="status",
                              from_status=referral.status, to_status=to_status, reason=reason[:2000]))
    audit.record(session, actor, "referral.status", "referral", referral.id,
                 detail=f"{referral.status} -> {to_status}")
    referral.status = to_status
    referral.updated_at = now


def log_contact(session: Session, referral: Referral, actor: str, outcome: str, note: str = "") -> None:
    """Record one attempt to reach the patient (a call, a letter) in the referral's history."""
    if outcome not in CONTACT_OUTCOMES:
        raise WorklistError(f"outcome must be one of {', '.join(CONTACT_OUTCOMES)}; got {outcome[:40]!r}")
    note = note.strip()[:2000]
    now = utcnow()
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="contact",
                              reason=outcome + (f": {note}" if note else "")))
    audit.record(session, actor, "referral.contact", "referral", referral.id, detail=outcome)
    referral.updated_at = now


def add_note(session: Session, referral: Referral, actor: str, text: str) -> None:
    """A free-text note on the referral (kept in its history, never edited)."""
    text = text.strip()
    if not text:
        raise WorklistError("note: empty")
    if len(text) > 4000:
        raise WorklistError("note: at most 4000 characters")
    now = utcnow()
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="note", reason=text))
    audit.record(session, actor, "referral.note", "referral", referral.id)
    referral.updated_at = now


def assign(session: Session, referral: Referral, actor: str, assignee: str) -> None:
    """Give the referral to a coordinator (an active user), or to nobody ("")."""
    assignee = assignee.strip()
    if assignee:
        user = session.scalar(select(User).where(User.name == assignee))
        if user is None or user.disabled:
            raise WorklistError(f"assign: no active user {assignee[:64]!r}")
    if assignee == referral.assigned_to:
        return
    now = utcnow()
    session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="assigned",
                              reason=f"assigned to {assignee}" if assignee else "unassigned"))
    audit.record(session, actor, "referral.assign", "referral", referral.id, detail=assignee or "-")
    referral.assigned_to, referral.updated_at = assignee, now


def days_waiting(referral: Referral, now: dt.datetime | None = None) -> int | None:
    """Whole days since the referral was created, for open referrals; None once closed."""
    if referral.status not in OPEN_STATUSES:
        return None
    return ((now or utcnow()) - referral.created_at).days


def current_dxa(session: Session, patient_keys: list[tuple[str, str]]) -> dict[tuple[str, str], DxaResult]:
    """Each patient's latest DXA result that no later row supersedes, from any source (HL7, CSV,
    FHIR, manual); patients without one are absent. One query for a page of patients."""
    if not patient_keys:
        return {}
    newer = aliased(DxaResult)
    superseded = select(newer.id).where(newer.supersedes_id == DxaResult.id).exists()
    rows = session.scalars(select(DxaResult).where(
        DxaResult.patient_id.in_({p for p, _ in patient_keys}), ~superseded)
        .order_by(DxaResult.dxa_date, DxaResult.id))
    wanted = set(patient_keys)
    found: dict[tuple[str, str], DxaResult] = {}
    for row in rows:
        key = (row.patient_id, row.issuer_of_patient_id)
        if key in wanted:
            found[key] = row  # ordered by date: the last one wins
    return found


def dxa_versions(session: Session, referral: Referral) -> list[DxaResult]:
    """Every DXA row entered on this referral, newest first (corrections included)."""
    return list(session.scalars(select(DxaResult).where(
        DxaResult.source == "manual", DxaResult.source_ref == f"referral {referral.id}")
        .order_by(DxaResult.id.desc())))


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


def enter_dxa(engine: Engine, referral_id: int, actor: str, *, lumbar_spine: float | None,
              femoral_neck: float | None, total_hip: float | None, date: dt.date) -> int:
    """Record the DXA T-scores (at least one) and scan date of a referral's patient.

    The result is written once to `dxa_results` through `dxa.record` (source "manual"); a second
    entry on the same referral is a correction that supersedes the previous row, which stays.
    The referral keeps a copy of the current values for its page, outcomes and exports.
    Returns the `dxa_results` row id; WorklistError says what is wrong.
    """
    with Session(engine) as session:
        referral = session.get(Referral, referral_id)
        if referral is None:
            raise WorklistError(f"no referral {referral_id}")
        if referral.status == DISMISSED:
            raise WorklistError("a dismissed referral takes no DXA result")
        previous = referral.dxa_result_id
        patient = (referral.patient_id, referral.issuer_of_patient_id)
        study_date = referral.study_date or referral.created_at.date()
    if date < EARLIEST_DXA:
        raise WorklistError(f"dxa_date: {date.isoformat()} is before {EARLIEST_DXA.year}: a typing error?")
    if date < study_date:
        raise WorklistError(f"dxa_date: {date.isoformat()} is before the radiograph of "
                            f"{study_date.isoformat()}; a DXA for this referral comes after it")
    try:
        reading = dxa.DxaReading(patient[0], patient[1], date, lumbar_spine, femoral_neck, total_hip,
                                 source="manual", source_ref=f"referral {referral_id}")
    except DxaError as exc:
        raise WorklistError(str(exc).replace("dxa_date ", "dxa_date: ")) from exc
    recorded = dxa.record(engine, reading, actor=actor,
                          supersedes_id=previous if previous is not None else None)
    with Session(engine) as session, session.begin():
        referral = session.get(Referral, referral_id)
        assert referral is not None  # referrals are never deleted
        if referral.dxa_result_id == recorded.id:
            return recorded.id  # the same values again: nothing changes
        referral.dxa_t_lumbar_spine, referral.dxa_t_femoral_neck = lumbar_spine, femoral_neck
        referral.dxa_t_total_hip, referral.dxa_date = total_hip, date
        referral.dxa_result_id = recorded.id
        now = utcnow()
        referral.updated_at = now
        values = ", ".join(f"{site} {t:+.1f}" for site, t in reading.t_scores().items())
        verb = "corrected" if previous is not None else "entered"
        session.add(ReferralEvent(referral_id=referral.id, at=now, actor=actor, kind="dxa",
                                  reason=f"DXA {date.isoformat()} {verb}: {values}; lowest T-score "
                                         f"category {reading.category}"))
        audit.record(session, actor, "referral.dxa", "referral", referral.id,
                     detail=f"dxa_results {recorded.id}{f' supersedes {previous}' if previous else ''}; "
                            f"{date.isoformat()}; {values}; category {reading.category}")
    return recorded.id


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
    "dxa_t_femoral_neck", "dxa_t_total_hip", "patient_phone", "referring_physician",
    "appointment_date", "assigned_to",
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
        values["age"] = None if r.age is None else int(r.age)  # whole years, as clinicians say it
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


def id_summary(ids: list[int]) -> str:
    """Every id of an exported list, compact (runs as a-b) and with a SHA-256 digest of the full
    comma-separated list, for the audit trail: which patients left the node, not just how many."""
    runs: list[str] = []
    ordered = sorted(ids)
    start = prev = None
    for i in ordered + [None]:  # type: ignore[list-item]
        if start is not None and (i is None or i != prev + 1):  # type: ignore[operator]
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    digest = hashlib.sha256(",".join(map(str, ordered)).encode()).hexdigest()[:16]
    return f"{len(ids)} referrals; ids {','.join(runs) or '-'}; sha256 {digest}"


def _fhir_date(value: dt.date | None) -> str | None:
    return value.isoformat() if value else None


#: Identifier systems: referral ids are this node's; accession numbers and patient ids are
#: the issuer's (IssuerOfPatientID), named as a URN when it is not already a URI or an OID.
REFERRAL_SYSTEM = "urn:osteo-node:referral"
PATIENT_SYSTEM_PREFIX = "urn:osteo-node:patient-id:"
ACCESSION_SYSTEM = "urn:osteo-node:accession"


def patient_id_system(issuer: str) -> str:
    """The FHIR identifier system of a PatientID issued by `issuer` ("" = the local issuer)."""
    issuer = issuer.strip()
    if issuer.replace(".", "").isdigit() and "." in issuer:
        return f"urn:oid:{issuer}"
    if issuer.startswith(("http://", "https://", "urn:")):
        return issuer
    return PATIENT_SYSTEM_PREFIX + (urllib.parse.quote(issuer, safe="") or "local")


def to_fhir(referral: Referral) -> dict[str, Any]:
    """The referral as a FHIR R4 ServiceRequest for a DXA scan (plain dict, JSON-ready)."""
    status, intent = FHIR_STATUS[referral.status]
    finding = CATEGORY_CODES[referral.risk_category]
    identifier: dict[str, Any] = {"system": patient_id_system(referral.issuer_of_patient_id),
                                  "value": referral.patient_id}
    if referral.issuer_of_patient_id:
        identifier["assigner"] = {"display": referral.issuer_of_patient_id}
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": f"osteo-referral-{referral.id}",
        "identifier": [{"system": REFERRAL_SYSTEM, "value": str(referral.id)}],
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
    if referral.accession_number:
        resource["requisition"] = {"system": ACCESSION_SYSTEM, "value": referral.accession_number}
    if referral.dxa_date:
        resource["occurrenceDateTime"] = _fhir_date(referral.dxa_date)
    elif referral.appointment_date:
        resource["occurrenceDateTime"] = _fhir_date(referral.appointment_date)
    for entry in (resource["subject"], resource["supportingInfo"][0]):
        if entry.get("display") is None:
            entry.pop("display", None)
    return resource


def to_fhir_bundle(referrals: list[Referral]) -> dict[str, Any]:
    """A whole list as one FHIR R4 Bundle (type collection) of ServiceRequests, each checked by
    fhir.resources' R4B models (the same ServiceRequest as R4), so what leaves the node parses."""
    from fhir.resources.R4B.bundle import Bundle

    now = utcnow().replace(tzinfo=dt.UTC)
    bundle = Bundle.model_validate({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": now.isoformat(),
        "identifier": {"system": "urn:osteo-node:export", "value": now.strftime("%Y%m%dT%H%M%S.%fZ")},
        "entry": [{"fullUrl": f"urn:osteo-node:referral:{r.id}", "resource": to_fhir(r)}
                  for r in referrals],
    })
    result: dict[str, Any] = json.loads(bundle.model_dump_json(exclude_none=True))
    return result
