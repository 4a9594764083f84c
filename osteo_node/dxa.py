"""DXA results: the one place that writes the `dxa_results` table, whatever the route (HL7, CSV,
FHIR, manual entry on the worklist), and the facts of screened images they are paired with.

A result is a frozen `DxaReading`, checked on construction (T-scores within -7..+7, at least one
site, a date not in the future); `record()` stores it once (a delivery seen before is a
duplicate, not an error) and never updates a row: a correction is a new row that supersedes
the old one.

The automatic routes (HL7 listener, `osteo-node dxa import`) go through `accept()`, which first
pairs the reading with a screened image: a patient (PatientID + Issuer) this node never screened,
or one with no screened image within `[validation] match_window_days` of the DXA date, is refused
with the reason, so that the table holds only results that validation can use. Whenever several
images qualify, the nearest in time wins (`nearest_image`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from .db import DxaResult, ScreenedImage, utcnow
from .eligibility import patient_age_years
from .errors import DxaError

#: WHO categories from the lowest T-score (normal >= -1.0 > osteopenia > -2.5 >= osteoporosis).
NORMAL, OSTEOPENIA, OSTEOPOROSIS = "normal", "osteopenia", "osteoporosis"
SOURCES = ("hl7", "csv", "fhir", "manual")
#: T-scores outside this range are not measurements (DXA software reports about -6..+6).
T_SCORE_RANGE = (-7.0, 7.0)
SITES = ("lumbar_spine", "femoral_neck", "total_hip")


def who_category(lowest_t: float) -> str:
    """The WHO category of a lowest T-score."""
    if lowest_t <= -2.5:
        return OSTEOPOROSIS
    if lowest_t < -1.0:
        return OSTEOPENIA
    return NORMAL


@dataclass(frozen=True)
class DxaReading:
    """One DXA examination's T-scores for one patient (PatientID + Issuer of Patient ID)."""

    patient_id: str
    issuer_of_patient_id: str
    dxa_date: dt.date
    t_lumbar_spine: float | None
    t_femoral_neck: float | None
    t_total_hip: float | None
    source: str
    source_ref: str = ""

    def __post_init__(self) -> None:
        if not self.patient_id.strip():
            raise DxaError("patient_id is empty")
        if self.source not in SOURCES:
            raise DxaError(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        scores = self.t_scores()
        if not scores:
            raise DxaError("no T-score: give at least one of " + ", ".join(SITES))
        low, high = T_SCORE_RANGE
        for site, value in scores.items():
            if not low <= value <= high:
                raise DxaError(f"{site} T-score {value} is outside {low:+.0f}..{high:+.0f}")
        if self.dxa_date > dt.date.today():
            raise DxaError(f"dxa_date {self.dxa_date.isoformat()} is in the future")

    def t_scores(self) -> dict[str, float]:
        """The T-scores present, by site."""
        values = (self.t_lumbar_spine, self.t_femoral_neck, self.t_total_hip)
        return {site: v for site, v in zip(SITES, values) if v is not None}

    @property
    def lowest_t(self) -> float:
        return min(self.t_scores().values())

    @property
    def category(self) -> str:
        return who_category(self.lowest_t)

    def fingerprint(self) -> str:
        """Same patient, date and values -> same fingerprint, whichever route delivered it."""
        key = "|".join([self.patient_id.strip(), self.issuer_of_patient_id.strip(),
                        self.dxa_date.isoformat()]
                       + ["" if v is None else f"{v:.2f}" for v in
                          (self.t_lumbar_spine, self.t_femoral_neck, self.t_total_hip)])
        return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Recorded:
    """What `record` did: the row's id, and whether the same result was already stored."""

    id: int
    duplicate: bool


def record(engine: Engine, reading: DxaReading, *, actor: str = "",
           supersedes_id: int | None = None) -> Recorded:
    """Store `reading` once; a reading already stored (same fingerprint) is a duplicate."""
    fingerprint = reading.fingerprint()
    try:
        with Session(engine) as session, session.begin():
            row = DxaResult(
                patient_id=reading.patient_id.strip(),
                issuer_of_patient_id=reading.issuer_of_patient_id.strip(),
                dxa_date=reading.dxa_date,
                t_lumbar_spine=reading.t_lumbar_spine,
                t_femoral_neck=reading.t_femoral_neck,
                t_total_hip=reading.t_total_hip,
                source=reading.source,
                source_ref=reading.source_ref[:255],
                actor=actor[:64],
                fingerprint=fingerprint,
                supersedes_id=supersedes_id,
                received_at=utcnow(),
            )
            session.add(row)
            session.flush()
            return Recorded(row.id, duplicate=False)
    except IntegrityError:
        with Session(engine) as session:
            existing = session.scalar(select(DxaResult.id).where(DxaResult.fingerprint == fingerprint))
        if existing is None:
            raise
        return Recorded(existing, duplicate=True)


# --- Screened images: what an infer job records beside the live model's result ------------------

#: Header dates tried, in order, for the date of an image.
IMAGE_DATE_KEYWORDS = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")


def _header_text(ds: Dataset, keyword: str, length: int) -> str:
    value = ds.get(keyword, "")
    return (str(value).strip() if value is not None else "")[:length]


def image_date(ds: Dataset) -> dt.date | None:
    """StudyDate, else AcquisitionDate, ContentDate or SeriesDate; None when none is a date."""
    for keyword in IMAGE_DATE_KEYWORDS:
        try:
            return dt.datetime.strptime(_header_text(ds, keyword, 8), "%Y%m%d").date()
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class ScreenedFacts:
    """Who and what one screened image shows, from its header: the row of `screened_images`."""

    patient_id: str
    issuer_of_patient_id: str
    image_date: dt.date | None
    age: float | None
    manufacturer: str
    modality: str
    view_position: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "ScreenedFacts":
        """Read from the header only (the worker passes the header it already holds)."""
        return cls(
            patient_id=_header_text(ds, "PatientID", 64),
            issuer_of_patient_id=_header_text(ds, "IssuerOfPatientID", 64),
            image_date=image_date(ds),
            age=patient_age_years(ds),
            manufacturer=_header_text(ds, "Manufacturer", 64),
            modality=_header_text(ds, "Modality", 16).upper(),
            view_position=_header_text(ds, "ViewPosition", 16).upper(),
        )

    def row(self, instance_id: int) -> ScreenedImage:
        return ScreenedImage(instance_id=instance_id, created_at=utcnow(), **self.__dict__)


def add_screened(session: Session, row: ScreenedImage) -> None:
    """Add `row` in the caller's transaction (the one that records the live result), unless its
    instance already has one (a retried job)."""
    known = session.scalar(select(ScreenedImage.id).where(ScreenedImage.instance_id == row.instance_id))
    if known is None:
        session.add(row)


# --- Pairing a result with a screened image ----------------------------------------------------

@dataclass(frozen=True)
class Match:
    """The screened image a DXA result is paired with: the nearest in time to the DXA date."""

    screened_image_id: int
    instance_id: int
    image_date: dt.date
    #: DXA date minus image date, in days (negative: the DXA came first).
    days: int


def _patient(patient_id: str, issuer: str):  # type: ignore[no-untyped-def]
    return (ScreenedImage.patient_id == patient_id.strip()) & (
        ScreenedImage.issuer_of_patient_id == issuer.strip())


def is_screened(session: Session, patient_id: str, issuer: str) -> bool:
    """Whether this node has screened an image of this patient (PatientID + Issuer, exactly)."""
    return session.scalar(select(ScreenedImage.id).where(_patient(patient_id, issuer)).limit(1)) \
        is not None


def screened_key(session: Session, candidates: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The first (PatientID, Issuer) of `candidates` that this node has screened (an HL7 PID-3
    lists several identifiers of one patient), or None."""
    for patient_id, issuer in candidates:
        if patient_id.strip() and is_screened(session, patient_id, issuer):
            return patient_id.strip(), issuer.strip()
    return None


def nearest_image(session: Session, patient_id: str, issuer: str, when: dt.date,
                  window_days: int) -> Match | None:
    """The patient's screened image dated nearest to `when`, within `window_days` either side
    (ties: the earlier image, then the first recorded); None when there is none."""
    low, high = when - dt.timedelta(days=window_days), when + dt.timedelta(days=window_days)
    rows = session.execute(
        select(ScreenedImage.id, ScreenedImage.instance_id, ScreenedImage.image_date)
        .where(_patient(patient_id, issuer), ScreenedImage.image_date.is_not(None),
               ScreenedImage.image_date >= low, ScreenedImage.image_date <= high)
    ).all()
    if not rows:
        return None
    best = min(rows, key=lambda r: (abs((when - r.image_date).days), r.image_date, r.id))
    return Match(best.id, best.instance_id, best.image_date, (when - best.image_date).days)


def pair(session: Session, reading: DxaReading, window_days: int) -> Match:
    """The image `reading` pairs with; DxaError (with the reason, no patient data) when none."""
    if not is_screened(session, reading.patient_id, reading.issuer_of_patient_id):
        raise DxaError("unknown patient: no screened image has this PatientID and Issuer of "
                       "Patient ID")
    match = nearest_image(session, reading.patient_id, reading.issuer_of_patient_id,
                          reading.dxa_date, window_days)
    if match is None:
        raise DxaError(f"no screened image of this patient within {window_days} days of the DXA "
                       "date ([validation] match_window_days)")
    return match


@dataclass(frozen=True)
class Accepted:
    """What `accept` did: the row (new or the duplicate's) and the image it pairs with."""

    recorded: Recorded
    match: Match


def accept(engine: Engine, reading: DxaReading, window_days: int, *, actor: str = "",
           correction: bool = False) -> Accepted:
    """Pair `reading` with a screened image, then record it (DxaError when it pairs with none).

    `correction` (an HL7 OBX-11 "C", a FHIR status "corrected"/"amended"): the new row supersedes
    the patient's latest result of the same DXA date.
    """
    with Session(engine) as session:
        match = pair(session, reading, window_days)
        supersedes = _same_day(session, reading) if correction else None
    recorded = record(engine, reading, actor=actor, supersedes_id=supersedes)
    return Accepted(recorded, match)


def accept_reported(engine: Engine, patient_keys: Sequence[tuple[str, str]], dxa_date: dt.date,
                    t_scores: Mapping[str, float], *, source: str, source_ref: str, window_days: int,
                    actor: str, correction: bool = False) -> Accepted:
    """`accept` a result as a route reports it: every (PatientID, Issuer) it names for the
    patient (HL7 PID-3 repetitions, FHIR identifiers; the one this node screened is used, else
    the first) and the T-scores by site. DxaError when it cannot be used."""
    with Session(engine) as session:
        key = screened_key(session, patient_keys) or patient_keys[0]
    reading = DxaReading(
        patient_id=key[0], issuer_of_patient_id=key[1], dxa_date=dxa_date,
        t_lumbar_spine=t_scores.get("lumbar_spine"), t_femoral_neck=t_scores.get("femoral_neck"),
        t_total_hip=t_scores.get("total_hip"), source=source, source_ref=source_ref)
    return accept(engine, reading, window_days, actor=actor, correction=correction)


def _same_day(session: Session, reading: DxaReading) -> int | None:
    return session.scalar(
        select(DxaResult.id).where(
            DxaResult.patient_id == reading.patient_id.strip(),
            DxaResult.issuer_of_patient_id == reading.issuer_of_patient_id.strip(),
            DxaResult.dxa_date == reading.dxa_date,
            DxaResult.fingerprint != reading.fingerprint(),
        ).order_by(DxaResult.id.desc()).limit(1))


# --- Reading results back ---------------------------------------------------------------------

@dataclass(frozen=True)
class LastDxa:
    """A patient's most recent DXA result (for the worklist and the repeat-window rule)."""

    id: int
    dxa_date: dt.date
    t_lumbar_spine: float | None
    t_femoral_neck: float | None
    t_total_hip: float | None
    source: str

    @property
    def lowest_t(self) -> float:
        return min(v for v in (self.t_lumbar_spine, self.t_femoral_neck, self.t_total_hip)
                   if v is not None)

    @property
    def category(self) -> str:
        return who_category(self.lowest_t)


def latest_results(session: Session, patients: Iterable[tuple[str, str]]
                   ) -> dict[tuple[str, str], LastDxa]:
    """Each patient's (PatientID, Issuer) latest DXA result by DXA date (then the latest
    received), leaving out rows superseded by a correction; patients without one are absent. One
    query for a page of patients (the worklist)."""
    wanted = {(p.strip(), i.strip()) for p, i in patients}
    if not wanted:
        return {}
    newer = aliased(DxaResult)
    rows = session.scalars(
        select(DxaResult)
        .where(DxaResult.patient_id.in_({p for p, _ in wanted}),
               ~select(newer.id).where(newer.supersedes_id == DxaResult.id).exists())
        .order_by(DxaResult.dxa_date, DxaResult.id))
    found: dict[tuple[str, str], LastDxa] = {}
    for row in rows:
        key = (row.patient_id, row.issuer_of_patient_id)
        if key in wanted:  # ordered by date, then id: the last one wins
            found[key] = LastDxa(row.id, row.dxa_date, row.t_lumbar_spine, row.t_femoral_neck,
                                 row.t_total_hip, row.source)
    return found


def last_result(session: Session, patient_id: str, issuer: str) -> LastDxa | None:
    """One patient's latest DXA result (`latest_results`), or None when the node has none."""
    return latest_results(session, [(patient_id, issuer)]).get((patient_id.strip(), issuer.strip()))
