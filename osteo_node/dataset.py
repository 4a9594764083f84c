"""`osteo-node dataset export`: the site's paired images, de-identified, as a training set.

An image is exported when a DXA result pairs with it (`pair_dxa`, over osteo_node.pairing, the
pairing site validation uses): each DXA result with the same patient's (PatientID + Issuer)
screened image nearest in time, within `[validation] match_window_days`. The copy is
de-identified (osteo_node.deidentify) and one row goes into `manifest.csv`, in the columns
`osteo-train train`, `sweep` and `evaluate` read
(training/data.py): `file`, `patient_id` (pseudonym), `t_score` (the lowest of the DXA's
T-scores), `class` (its WHO category), `age`, `sex`, `view`, `split`; plus `modality`,
`manufacturer` and `dxa_interval_days` for subgroups. Splits are per patient and stable: a
patient's split is a function of the pseudonym (70/15/15), so a later, larger export never moves a
patient from train to test.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import pairing
from .db import Instance, ScreenedImage
from .deidentify import Pseudonymizer, deidentify
from .dxa import who_category
from .errors import ImageError
from .store import FileStore

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "file", "patient_id", "t_score", "class", "age", "sex", "view", "split",
    "modality", "manufacturer", "dxa_interval_days",
)
#: Patient shares of the splits, as in training/data.py's DEFAULT_SPLIT_SHARES.
SPLIT_SHARES: tuple[tuple[str, float], ...] = (("train", 0.70), ("val", 0.15), ("test", 0.15))


@dataclass(frozen=True)
class Pair:
    """A screened image and the DXA result that labels it."""

    instance_id: int
    dxa_id: int
    image_date: dt.date
    dxa_date: dt.date
    lowest_t: float

    @property
    def interval_days(self) -> int:
        """DXA date minus image date (negative: the DXA came first)."""
        return (self.dxa_date - self.image_date).days


def pair_dxa(engine: Engine, window_days: int) -> list[Pair]:
    """The images site validation pairs with a DXA result (osteo_node.pairing: each current DXA
    result with its patient's nearest screened image within `window_days`), each with its DXA; an
    image that is the nearest of several DXA results takes the nearest of them (then the newer)."""
    with Session(engine) as session:
        found = pairing.load_pairs(session, window_days)
    best: dict[int, pairing.Pair] = {}
    for p in found:
        kept = best.get(p.image.instance_id)
        if kept is None or (p.days_apart, -p.dxa.id) < (kept.days_apart, -kept.dxa.id):
            best[p.image.instance_id] = p
    return [Pair(p.image.instance_id, p.dxa.id, p.image.image_date, p.dxa.dxa_date, p.dxa.lowest_t)
            for p in sorted(best.values(), key=lambda p: p.image.instance_id)
            if p.image.image_date is not None]


def split_of(pseudonym: str) -> str:
    """The patient's split, a pure function of the pseudonym."""
    position = int(hashlib.sha256(pseudonym.encode()).hexdigest()[:8], 16) / 0x100000000
    start = 0.0
    for name, share in SPLIT_SHARES:
        start += share
        if position < start:
            return name
    return SPLIT_SHARES[-1][0]


@dataclass(frozen=True)
class ExportSummary:
    exported: int
    patients: int
    skipped: dict[str, int]
    manifest: Path


def export(engine: Engine, store: FileStore, out: Path, pseudonymizer: Pseudonymizer,
           window_days: int) -> ExportSummary:
    """Write the de-identified paired images under `out/images/` and `out/manifest.csv`.

    Images that cannot be exported (file purged by retention, unreadable, burned-in annotation)
    are counted by reason in the summary, never fatal; the export writes what it can.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = pair_dxa(engine, window_days)
    skipped: Counter[str] = Counter()
    rows = []
    with Session(engine) as session:
        for pair in pairs:
            instance = session.get(Instance, pair.instance_id)
            image = session.scalar(select(ScreenedImage).where(ScreenedImage.instance_id == pair.instance_id))
            assert image is not None  # pair_dxa found it
            if instance is None or instance.purged_at is not None or not instance.path:
                skipped["file purged"] += 1
                continue
            try:
                source = dcmread(store.absolute(instance.path))
            except (OSError, InvalidDicomError) as exc:
                skipped[f"unreadable ({type(exc).__name__})"] += 1
                continue
            pseudonym = pseudonymizer.patient(image.patient_id, image.issuer_of_patient_id)
            try:
                copy = deidentify(source, pseudonym, pseudonymizer)
            except ImageError as exc:
                skipped[str(exc).split(":")[0]] += 1
                continue
            name = Path("images") / f"{copy.SOPInstanceUID}.dcm"
            copy.save_as(out / name, enforce_file_format=True)
            view = (image.view_position or str(source.get("ViewPosition", ""))).upper()
            rows.append({
                "file": name.as_posix(),
                "patient_id": pseudonym,
                "t_score": f"{pair.lowest_t:.2f}",
                "class": who_category(pair.lowest_t),
                "age": "" if image.age is None else f"{image.age:g}",
                "sex": str(source.get("PatientSex", "")),
                "view": "LATERAL" if view in ("LL", "RL", "LATERAL") else view,
                "split": split_of(pseudonym),
                "modality": image.modality,
                "manufacturer": image.manufacturer,
                "dxa_interval_days": str(pair.interval_days),
            })
    rows.sort(key=lambda r: (r["patient_id"], r["file"]))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    summary = ExportSummary(len(rows), len({r["patient_id"] for r in rows}), dict(skipped), manifest)
    log.info("dataset export: %d images of %d patients to %s; skipped %s", summary.exported,
             summary.patients, out, summary.skipped or "none")
    return summary
