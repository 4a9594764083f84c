"""Refer: put a patient whose radiograph screens high-risk on the DXA referral worklist.

Policy (`[referral]` in the configuration), applied to each recorded result:

* Risk: P(osteoporosis) >= the osteoporosis threshold (rule "osteoporosis"), otherwise
  P(osteopenia) + P(osteoporosis) >= the low-BMD threshold (rule "low_bmd"). Comparisons allow a
  1e-9 tolerance so that probabilities summing to a threshold in exact arithmetic count as reaching it.
  The thresholds are the operating point in force for the model that produced the result
  (osteo_node.operating_point: a `[referral]` override, else the site operating point, else the
  bundle's validated thresholds), looked up in the referral's own transaction.
* Age: at least `min_age` and, when set, at most `max_age` years at the study (PatientAge, else
  birth date vs study date). Unknown age: referred only when `allow_unknown_age`.
* One open referral (new, contacted, scheduled) per patient (PatientID + IssuerOfPatientID): a
  further high-risk image of that patient while one is open is attached to it as a history event.
* Repeat window: no new referral for a patient referred (any status except dismissed) or scanned
  (DXA date entered) within `repeat_window_days` before now, nor for one whose DXA result on
  record (`dxa_results`: HL7, CSV, FHIR) is dated within `repeat_window_days` before the image's
  study date (or later): she has had her DXA.

The decision functions are pure; `refer()` applies them in one transaction. The worker calls it
from a durable `refer` job, queued with the result, so a decision is never lost to a crash.
Logs name the referral id and SOP Instance UID, never the patient.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import or_, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import audit, dxa, operating_point
from .config import ReferralSettings
from .db import Referral, ReferralEvent, Result, utcnow
from .eligibility import patient_age_years
from .errors import JobError

log = logging.getLogger(__name__)

#: The system actor recorded on referrals the node creates.
NODE_ACTOR = "osteo-node"

NEW, CONTACTED, SCHEDULED, COMPLETED, DECLINED, DISMISSED = (
    "new", "contacted", "scheduled", "completed", "declined", "dismissed")
STATUSES: tuple[str, ...] = (NEW, CONTACTED, SCHEDULED, COMPLETED, DECLINED, DISMISSED)
OPEN_STATUSES: tuple[str, ...] = (NEW, CONTACTED, SCHEDULED)

RULE_OSTEOPOROSIS, RULE_LOW_BMD = "osteoporosis", "low_bmd"
_TOLERANCE = 1e-9


#: The policy is the validated `[referral]` section itself: its defaults are defined once, there.
ReferralPolicy = ReferralSettings


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study identifiers copied from the source image's header."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: dt.date | None
    sex: str
    age: float | None
    accession_number: str
    study_date: dt.date | None
    study_instance_uid: str
    sop_instance_uid: str
    #: PatientTelephoneNumbers (0010,2154), several joined with ", "; "" when absent.
    patient_phone: str = ""
    referring_physician: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PatientStudy:
        def text_of(keyword: str) -> str:
            value = ds.get(keyword, "")
            return str(value).strip() if value is not None else ""

        return cls(
            patient_id=text_of("PatientID")[:64],
            issuer_of_patient_id=text_of("IssuerOfPatientID")[:64],
            patient_name=text_of("PatientName")[:324],
            birth_date=_date(text_of("PatientBirthDate")),
            sex=text_of("PatientSex")[:16],
            age=patient_age_years(ds),
            accession_number=text_of("AccessionNumber")[:64],
            study_date=_date(text_of("StudyDate")),
            study_instance_uid=text_of("StudyInstanceUID"),
            sop_instance_uid=text_of("SOPInstanceUID"),
            patient_phone=_phones(ds)[:64],
            referring_physician=text_of("ReferringPhysicianName")[:324],
        )


@dataclass(frozen=True)
class Assessment:
    """Whether one result qualifies for a referral, by which rule, and why (no patient data)."""

    refer: bool
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Outcome:
    """What `refer()` did: created, attached (to an open referral) or none; and the referral id."""

    action: str
    referral_id: int | None
    reason: str


def _phones(ds: Dataset) -> str:
    value = ds.get("PatientTelephoneNumbers")
    if value is None or value == "":
        return ""
    values = [value] if isinstance(value, str) else list(value)  # SH, VM 1-n
    return ", ".join(str(v).strip() for v in values if str(v).strip())


def _date(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def risk_rule(p_osteopenia: float, p_osteoporosis: float,
              point: operating_point.Thresholds) -> str | None:
    """The rule that fires for these probabilities at `point`, or None (osteoporosis rule first)."""
    if p_osteoporosis >= point.osteoporosis_threshold - _TOLERANCE:
        return RULE_OSTEOPOROSIS
    if p_osteopenia + p_osteoporosis >= point.low_bmd_threshold - _TOLERANCE:
        return RULE_LOW_BMD
    return None


def flagged(probs: np.ndarray, point: operating_point.Thresholds) -> np.ndarray:
    """`risk_rule(...) is not None` for each row of `probs` (N, 3): who would be referred on risk
    (before the age and repeat rules). Site validation measures the operating point with it."""
    p = np.asarray(probs, dtype=np.float64)
    return ((p[:, 2] >= point.osteoporosis_threshold - _TOLERANCE)
            | (p[:, 1] + p[:, 2] >= point.low_bmd_threshold - _TOLERANCE))


def age_allowed(age: float | None, policy: ReferralPolicy) -> tuple[bool, str]:
    """Whether a patient of `age` years (None: unknown) may be referred, and why not."""
    if age is None:
        return policy.allow_unknown_age, "age unknown"
    if age < policy.min_age:
        return False, f"age {age:.1f} below referral.min_age {policy.min_age}"
    if policy.max_age is not None and age > policy.max_age:
        return False, f"age {age:.1f} above referral.max_age {policy.max_age}"
    return True, "age within range"


def assess(p_osteopenia: float, p_osteoporosis: float, age: float | None,
           policy: ReferralPolicy, point: operating_point.Thresholds) -> Assessment:
    """Apply the risk rule at `point` and the age rules to one result."""
    rule = risk_rule(p_osteopenia, p_osteoporosis, point)
    if rule is None:
        return Assessment(False, None, "below both referral thresholds")
    allowed, why = age_allowed(age, policy)
    if not allowed:
        return Assessment(False, rule, why)
    return Assessment(True, rule, f"rule {rule} fired")


def _lock_patient(session: Session, study: PatientStudy) -> None:
    """Serialise referral decisions for one patient across workers (PostgreSQL advisory lock;
    SQLite transactions are already exclusive, see db.py)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"{study.issuer_of_patient_id}|{study.patient_id}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _same_patient(study: PatientStudy):  # type: ignore[no-untyped-def]
    return (Referral.patient_id == study.patient_id) & (
        Referral.issuer_of_patient_id == study.issuer_of_patient_id)


def refer(engine: Engine, policy: ReferralPolicy, study: PatientStudy, result: Result,
          *, bundle_thresholds: operating_point.BundleThresholds | None = None,
          now: dt.datetime | None = None) -> Outcome:
    """Create a referral for `result`, attach it to the patient's open one, or do nothing.

    The thresholds are the operating point in force for the result's model (Device UID):
    `policy`'s override, else the site operating point, else `bundle_thresholds[device_uid]`
    (operating_point.bundle_thresholds). A model with none of them is a JobError.

    Idempotent per image: a result whose SOP Instance UID already created or joined a referral
    changes nothing (a retried job).
    """
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        point = operating_point.in_force(session, result.device_uid, bundle_thresholds or {}, policy)
        if point is None:
            raise JobError(f"no operating point for model {result.model_name} {result.model_version} "
                           f"(Device UID {result.device_uid}): its bundle is not configured; set one "
                           "with `osteo-node operating-point set --device-uid UID ...`")
        assessment = assess(result.p_osteopenia, result.p_osteoporosis, study.age, policy, point)
        if not assessment.refer:
            return Outcome("none", None, assessment.reason)
        if study.patient_id:
            _lock_patient(session, study)
        seen = session.scalar(select(ReferralEvent.referral_id).where(
            ReferralEvent.sop_instance_uid == study.sop_instance_uid,
            ReferralEvent.kind.in_(("created", "attached"))))
        if seen is not None:
            return Outcome("none", seen, "image already on a referral")
        if study.patient_id:
            open_one = session.scalars(
                select(Referral).where(_same_patient(study), Referral.status.in_(OPEN_STATUSES))
                .order_by(Referral.id)
            ).first()
            if open_one is not None:
                open_one.updated_at = now
                session.add(ReferralEvent(
                    referral_id=open_one.id, at=now, actor=NODE_ACTOR, kind="attached",
                    reason=f"repeat study, rule {assessment.rule} fired "
                           f"(P(osteoporosis)={result.p_osteoporosis:.3f}, "
                           f"P(low BMD)={result.p_osteopenia + result.p_osteoporosis:.3f})",
                    sop_instance_uid=study.sop_instance_uid, result_id=result.id))
                return Outcome("attached", open_one.id, "patient has an open referral")
            image_day = study.study_date or now.date()
            last = dxa.last_result(session, study.patient_id, study.issuer_of_patient_id)
            if last is not None and \
                    last.dxa_date >= image_day - dt.timedelta(days=policy.repeat_window_days):
                return Outcome("none", None, f"a DXA result is on record within "
                               f"{policy.repeat_window_days} days before the image "
                               f"(DXA result {last.id})")
            window_start = now - dt.timedelta(days=policy.repeat_window_days)
            recent = session.scalars(
                select(Referral).where(
                    _same_patient(study),
                    or_(
                        (Referral.status != DISMISSED) & (Referral.created_at > window_start),
                        Referral.dxa_date > window_start.date(),
                    ),
                ).order_by(Referral.id.desc())
            ).first()
            if recent is not None:
                return Outcome("none", recent.id,
                               f"patient referred or scanned within {policy.repeat_window_days} days")
        referral = Referral(
            status=NEW, risk_category=result.category, rule=assessment.rule or "",
            patient_id=study.patient_id, issuer_of_patient_id=study.issuer_of_patient_id,
            patient_name=study.patient_name, birth_date=study.birth_date, sex=study.sex,
            age=study.age, accession_number=study.accession_number, study_date=study.study_date,
            study_instance_uid=study.study_instance_uid, sop_instance_uid=study.sop_instance_uid,
            patient_phone=study.patient_phone, referring_physician=study.referring_physician,
            result_id=result.id, p_normal=result.p_normal, p_osteopenia=result.p_osteopenia,
            p_osteoporosis=result.p_osteoporosis, model_name=result.model_name,
            model_version=result.model_version, device_uid=result.device_uid,
            osteoporosis_threshold=point.osteoporosis_threshold,
            low_bmd_threshold=point.low_bmd_threshold, created_at=now, updated_at=now,
        )
        session.add(referral)
        session.flush()
        session.add(ReferralEvent(
            referral_id=referral.id, at=now, actor=NODE_ACTOR, kind="created", to_status=NEW,
            reason=assessment.reason, sop_instance_uid=study.sop_instance_uid, result_id=result.id))
        audit.record(session, NODE_ACTOR, "referral.create", "referral", referral.id,
                     detail=f"rule {assessment.rule}; result {result.id}; operating point "
                            f"{point.source}")
        return Outcome("created", referral.id, assessment.reason)
