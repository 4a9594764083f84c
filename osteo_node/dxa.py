"""DXA results: the one place that writes the `dxa_results` table, whatever the route (HL7, CSV,
FHIR, manual entry on the worklist).

A result is a frozen `DxaReading`, checked on construction (T-scores within -7..+7, at least one
site, a date not in the future); `record()` stores it once (a delivery seen before is a
duplicate, not an error) and never updates a row: a correction is a new row that supersedes
the old one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import DxaResult, utcnow
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
