"""`osteo-node dxa import`: DXA results from a CSV file or a FHIR R4 Bundle, into `dxa_results`.

Both routes check each result exactly as the HL7 listener does (osteo_node.dxa: T-scores within
-7..+7, a date not in the future, a patient this node screened, an image within
`[validation] match_window_days`) and record it once: importing the same file again adds nothing.
Each refused result is reported with its place in the file (CSV line number, FHIR entry) and the
reason; the reasons carry no patient identifiers.

CSV columns (a header line first; UTF-8, an Excel BOM is fine): `patient_id`, optional
`issuer_of_patient_id`, `dxa_date` (YYYY-MM-DD), and at least one of `lumbar_spine_t`,
`femoral_neck_t`, `total_hip_t` (empty cell: site not measured).

FHIR: a Bundle (JSON) whose entries include Observations coded with the LOINC T-score codes of
osteo_node.codes; the other entries are ignored. An Observation's patient is
`subject.identifier` (system -> Issuer of Patient ID, value -> PatientID), or the identifiers of
the Patient entry its `subject.reference` names; the date is `effectiveDateTime`, the T-score
`valueQuantity.value`. Observations of one patient and one date make one DXA result.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from . import codes, dxa
from .errors import DxaError

#: CSV column -> `DxaReading` site.
CSV_SCORES = {"lumbar_spine_t": "lumbar_spine", "femoral_neck_t": "femoral_neck",
              "total_hip_t": "total_hip"}
CSV_REQUIRED = ("patient_id", "dxa_date")
#: FHIR Observation.status values that are results; corrected/amended supersede an earlier one.
FHIR_FINAL, FHIR_CORRECTIONS = ("final",), ("corrected", "amended")


@dataclass(frozen=True)
class Rejected:
    """One result the import refused: where it is in the file, and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class ImportReport:
    imported: int = 0
    duplicate: int = 0
    rejected: tuple[Rejected, ...] = ()
    #: FHIR entries that are not DXA T-score Observations (patients, reports, other codes).
    ignored: int = 0


@dataclass(frozen=True)
class _Candidate:
    """A result read from the file, not yet checked against the database."""

    where: str
    patient_keys: tuple[tuple[str, str], ...]
    dxa_date: dt.date
    t_scores: dict[str, float] = field(default_factory=dict)
    source_ref: str = ""
    correction: bool = False


def import_file(engine: Engine, path: Path, match_window_days: int) -> ImportReport:
    """Import `path`: a FHIR Bundle when it is JSON (by extension or content), else CSV.

    DxaError for a file that cannot be read at all (missing columns, not a Bundle).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DxaError(f"cannot read {path}: {exc.strerror}") from None
    text = raw.decode("utf-8-sig", errors="replace")
    is_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    source = "fhir" if is_json else "csv"
    items, ignored = (_read_fhir(text, path.name) if is_json else (_read_csv(text, path.name), 0))
    imported = duplicate = 0
    rejected: list[Rejected] = []
    for item in items:
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        try:
            accepted = dxa.accept_reported(
                engine, item.patient_keys, item.dxa_date, item.t_scores, source=source,
                source_ref=item.source_ref, window_days=match_window_days, actor="import",
                correction=item.correction)
        except DxaError as exc:
            rejected.append(Rejected(item.where, str(exc)))
            continue
        if accepted.recorded.duplicate:
            duplicate += 1
        else:
            imported += 1
    return ImportReport(imported, duplicate, tuple(rejected), ignored)


# --- CSV -----------------------------------------------------------------------------------------

def _read_csv(text: str, name: str) -> Iterator[_Candidate | Rejected]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in CSV_REQUIRED if c not in columns]
    if missing or not any(c in columns for c in CSV_SCORES):
        raise DxaError(f"{name}: the header must name {', '.join(CSV_REQUIRED)} and at least one of "
                       f"{', '.join(CSV_SCORES)}; missing: {', '.join(missing) or 'a T-score column'}"
                       f" (found: {', '.join(columns) or 'nothing'})")
    reader.fieldnames = columns
    for row in reader:
        line = reader.line_num
        where = f"line {line}"
        try:
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if None in row:
                raise DxaError(f"more cells than the header has columns ({len(columns)})")
            try:
                when = dt.datetime.strptime(values.get("dxa_date", ""), "%Y-%m-%d").date()
            except ValueError:
                raise DxaError("dxa_date is not a date in the form YYYY-MM-DD") from None
            scores = {}
            for column, site in CSV_SCORES.items():
                if values.get(column):
                    try:
                        scores[site] = float(values[column])
                    except ValueError:
                        raise DxaError(f"{column} is not a number") from None
            patient_id = values.get("patient_id", "")
            if not patient_id:
                raise DxaError("patient_id is empty")
            yield _Candidate(where, ((patient_id, values.get("issuer_of_patient_id", "")),), when,
                             scores, source_ref=f"{name} line {line}")
        except DxaError as exc:
            yield Rejected(where, str(exc))


# --- FHIR ------------------------------------------------------------------------------------------

def _read_fhir(text: str, name: str) -> tuple[list[_Candidate | Rejected], int]:
    """(candidates and rejections, number of entries ignored) of a FHIR Bundle's Observations."""
    from fhir.resources.R4B.observation import Observation  # R4B: the R4 structure of these fields
    from pydantic import ValidationError

    try:
        bundle = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DxaError(f"{name}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
            or not isinstance(bundle.get("entry", []), list):
        raise DxaError(f"{name}: not a FHIR Bundle (resourceType must be \"Bundle\" with a list of "
                       "entries)")
    entries = bundle.get("entry", [])
    patients = _patients(entries)
    groups: dict[tuple[tuple[tuple[str, str], ...], dt.date], list[tuple[str, str, float, bool, str]]] = {}
    out: list[_Candidate | Rejected] = []
    ignored = 0
    for index, entry in enumerate(entries, start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
            ignored += 1
            continue
        where = f"entry {index}" + (f" (Observation {str(resource.get('id'))[:64]})"
                                    if resource.get("id") else "")
        site_code = _site_code(resource)
        if site_code is None:
            ignored += 1
            continue
        try:
            observation = Observation.model_validate(resource)
        except ValidationError as exc:  # name the fields, never echo their values
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            out.append(Rejected(where, f"not a valid R4 Observation ({', '.join(fields)[:200]})"))
            continue
        try:
            key, when, value, correction = _observation(observation, patients)
        except DxaError as exc:
            out.append(Rejected(where, str(exc)))
            continue
        groups.setdefault((key, when), []).append(
            (where, codes.DXA_T_SCORE_SITES[site_code], value, correction, observation.id or ""))
    for (key, when), members in groups.items():
        scores: dict[str, float] = {}
        for _, site, value, _, _ in members:
            scores[site] = min(value, scores.get(site, value))
        places = ", ".join(m[0] for m in members)
        refs = ",".join(m[4] for m in members if m[4])
        out.append(_Candidate(places, key, when, scores,
                              source_ref=f"{name} Observation {refs}" if refs else name,
                              correction=any(m[3] for m in members)))
    return out, ignored


def _site_code(resource: dict[str, Any]) -> str | None:
    """The LOINC T-score code of a raw Observation, else None (not ours: ignored)."""
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and coding.get("system") == codes.LOINC_FHIR \
                and coding.get("code") in codes.DXA_T_SCORE_SITES:
            return str(coding["code"])
    return None


def _identifier_keys(identifiers: Any) -> list[tuple[str, str]]:
    """(value, system) and, for an OID system, (value, the bare OID): DICOM issuers are names."""
    keys = []
    for identifier in identifiers or []:
        value, system = (identifier.value or "").strip(), (identifier.system or "").strip()
        if value:
            keys.append((value, system))
            if system.startswith("urn:oid:"):
                keys.append((value, system[len("urn:oid:"):]))
    return keys


def _patients(entries: list[Any]) -> dict[str, list[tuple[str, str]]]:
    """Patient entries by the references that may name them ("Patient/id", fullUrl)."""
    from fhir.resources.R4B.patient import Patient
    from pydantic import ValidationError

    found: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            continue
        try:
            patient = Patient.model_validate(resource)
        except ValidationError:
            continue
        keys = _identifier_keys(patient.identifier)
        if patient.id:
            found[f"Patient/{patient.id}"] = keys
        if entry.get("fullUrl"):
            found[str(entry["fullUrl"])] = keys
    return found


def _observation(observation: Any, patients: dict[str, list[tuple[str, str]]]
                 ) -> tuple[tuple[tuple[str, str], ...], dt.date, float, bool]:
    """(patient keys, date, T-score, is a correction) of a validated T-score Observation."""
    status = str(observation.status)
    if status not in FHIR_FINAL + FHIR_CORRECTIONS:
        raise DxaError(f"status {status} is not final, corrected or amended")
    subject = observation.subject
    keys = _identifier_keys([subject.identifier] if subject and subject.identifier else [])
    if not keys and subject and subject.reference:
        keys = patients.get(subject.reference, [])
    if not keys:
        raise DxaError("no patient: subject.identifier (or a Patient entry with an identifier "
                       "that subject.reference names) is required")
    when = observation.effectiveDateTime
    if when is None:
        raise DxaError("no effectiveDateTime")
    if isinstance(when, dt.datetime):
        when = when.date()
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None:
        raise DxaError("no valueQuantity.value")
    if quantity.comparator:
        raise DxaError(f"valueQuantity is a bound ({quantity.comparator}), not a T-score")
    return tuple(keys), when, float(quantity.value), status in FHIR_CORRECTIONS
