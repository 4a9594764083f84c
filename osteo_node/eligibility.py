"""Which received images the node screens: frontal chest CR/DX of adult women (configurable).

Decided from the DICOM header alone, before any pixel is decoded. Every decision carries its
reason, which the queue records with the instance.

Rules and their fallbacks when a tag is missing or empty:
- SOP Class must be CR, DX For Presentation or DX For Processing (the receiver only accepts those).
- Modality must be in `modalities` (default CR, DX). Missing Modality: refused.
- BodyPartExamined must be in `body_parts` (default CHEST). Missing: accepted only when
  `allow_missing_body_part` is true (default), since many CR readers leave it empty; a value
  naming another part (e.g. EXTREMITY) is refused.
- ViewPosition must be in `views` (default PA, AP). Missing: accepted only when
  `allow_missing_view` is true (default true: chest CRs often omit it); LL/RL/LATERAL refused.
- PatientSex must be in `sexes` (default F). Missing or O: refused.
- Age: PatientAge (nnnY/M/W/D) if present; otherwise PatientBirthDate vs StudyDate (or
  AcquisitionDate/ContentDate). Unknown age: accepted only when `allow_unknown_age` is true
  (default false). Age below `min_age` (default 50): refused.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID

from .config import EligibilitySettings

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
#: SOP classes the receiver accepts and the worker can screen.
SCREENED_SOP_CLASSES: tuple[UID, ...] = (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)


#: The rules are the validated `[eligibility]` section itself: its defaults are defined once, there.
EligibilityRules = EligibilitySettings


@dataclass(frozen=True)
class Decision:
    """Whether an instance is screened, and why."""

    eligible: bool
    reason: str
    age_years: float | None = field(default=None)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def _parse_age_string(value: str) -> float | None:
    """DICOM AS value 'nnnY' / 'nnnM' / 'nnnW' / 'nnnD' -> years, None when malformed."""
    if len(value) != 4 or not value[:3].isdigit() or value[3] not in "YMWD":
        return None
    n = int(value[:3])
    return {"Y": n, "M": n / 12, "W": n * 7 / 365.25, "D": n / 365.25}[value[3]]


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """Age at the study from PatientAge, else from PatientBirthDate and the study date."""
    age = _parse_age_string(_text(ds, "PatientAge"))
    if age is not None:
        return age
    birth = _parse_date(_text(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        when = _parse_date(_text(ds, keyword))
        if when is not None and when >= birth:
            return (when - birth).days / 365.25
    return None


def decide(ds: Dataset, rules: EligibilityRules) -> Decision:
    """Apply `rules` to the header of `ds` (pixel data is never touched)."""
    sop_class = ds.get("SOPClassUID")
    if sop_class not in SCREENED_SOP_CLASSES:
        return Decision(False, f"SOP class {sop_class} is not CR or DX")
    modality = _text(ds, "Modality")
    if modality not in rules.modalities:
        return Decision(False, f"modality {modality or 'missing'} not in {list(rules.modalities)}")
    body_part = _text(ds, "BodyPartExamined")
    if not body_part:
        if not rules.allow_missing_body_part:
            return Decision(False, "BodyPartExamined missing")
    elif body_part not in rules.body_parts:
        return Decision(False, f"body part {body_part} not in {list(rules.body_parts)}")
    view = _text(ds, "ViewPosition")
    if not view:
        if not rules.allow_missing_view:
            return Decision(False, "ViewPosition missing")
    elif view not in rules.views:
        return Decision(False, f"view {view} not in {list(rules.views)}")
    sex = _text(ds, "PatientSex")
    if sex not in rules.sexes:
        return Decision(False, f"patient sex {sex or 'missing'} not in {list(rules.sexes)}")
    age = patient_age_years(ds)
    if age is None:
        if not rules.allow_unknown_age:
            return Decision(False, "patient age unknown (no PatientAge, no usable BirthDate)")
        return Decision(True, "eligible (age unknown, allowed by rules)")
    if age < rules.min_age:
        return Decision(False, f"age {age:.0f} below minimum {rules.min_age}", age)
    return Decision(True, "eligible", age)
