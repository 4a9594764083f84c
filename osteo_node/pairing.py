"""Pairing: each DXA result meets the screened image it validates.

A DXA result (one not superseded by a correction) is paired with a screened image of the same
patient (PatientID + Issuer of Patient ID) taken at most `[validation] match_window_days` days
before or after the DXA; when several images qualify, the nearest in time wins (then the earlier
one, then the first recorded, as osteo_node.dxa.nearest_image decides when a result comes in).
The lowest T-score gives the WHO category, the truth the model is measured against. Images
without a date cannot be paired.

Pairing does not depend on the model: each model that screened the paired image (live or shadow)
is measured on that pair, so two models are compared on the same images.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .db import DxaResult, Result, ScreenedImage
from .dxa import who_category
from .records import CLASS_NAMES

#: Results are read for this many paired instances per query (below every database's limit).
_CHUNK = 2000


@dataclass(frozen=True)
class DxaRow:
    """A DXA result as pairing needs it."""

    id: int
    patient: tuple[str, str]  # (PatientID, Issuer of Patient ID)
    dxa_date: dt.date
    lowest_t: float
    supersedes_id: int | None = None


@dataclass(frozen=True)
class ImageRow:
    """A screened image as pairing needs it."""

    instance_id: int
    patient: tuple[str, str]
    image_date: dt.date | None
    age: float | None = None
    manufacturer: str = ""
    modality: str = ""
    view_position: str = ""


@dataclass(frozen=True)
class Pair:
    """One DXA result and the screened image nearest to it."""

    dxa: DxaRow
    image: ImageRow

    @property
    def label(self) -> int:
        """The WHO category of the lowest T-score, as a class index (CLASS_NAMES)."""
        return CLASS_NAMES.index(who_category(self.dxa.lowest_t))

    @property
    def days_apart(self) -> int:
        assert self.image.image_date is not None
        return abs((self.dxa.dxa_date - self.image.image_date).days)


def current(rows: Iterable[DxaRow]) -> list[DxaRow]:
    """The DXA results still in force: those no other row supersedes."""
    rows = list(rows)
    superseded = {r.supersedes_id for r in rows if r.supersedes_id is not None}
    return [r for r in rows if r.id not in superseded]


def pair(dxa_rows: Iterable[DxaRow], images: Iterable[ImageRow], window_days: int) -> list[Pair]:
    """Each current DXA result with its patient's nearest screened image within `window_days`."""
    by_patient: dict[tuple[str, str], list[ImageRow]] = {}
    for image in images:
        if image.image_date is not None and image.patient[0]:
            by_patient.setdefault(image.patient, []).append(image)
    pairs = []
    for dxa in current(dxa_rows):
        candidates = [i for i in by_patient.get(dxa.patient, ())
                      if abs((dxa.dxa_date - i.image_date).days) <= window_days]  # type: ignore[operator]
        if candidates:
            best = min(candidates, key=lambda i: (abs((dxa.dxa_date - i.image_date).days),  # type: ignore[operator]
                                                   i.image_date, i.instance_id))
            pairs.append(Pair(dxa, best))
    return pairs


def load_pairs(session: Session, window_days: int) -> list[Pair]:
    """Pairs from the database: current DXA results and the screened images of their patients."""
    dxa_rows = [
        DxaRow(id=r.id, patient=(r.patient_id, r.issuer_of_patient_id), dxa_date=r.dxa_date,
               lowest_t=min(v for v in (r.t_lumbar_spine, r.t_femoral_neck, r.t_total_hip)
                            if v is not None),
               supersedes_id=r.supersedes_id)
        for r in session.execute(select(
            DxaResult.id, DxaResult.patient_id, DxaResult.issuer_of_patient_id, DxaResult.dxa_date,
            DxaResult.t_lumbar_spine, DxaResult.t_femoral_neck, DxaResult.t_total_hip,
            DxaResult.supersedes_id))
    ]
    patients = (select(DxaResult.patient_id, DxaResult.issuer_of_patient_id).distinct().subquery())
    images = [
        ImageRow(instance_id=r.instance_id, patient=(r.patient_id, r.issuer_of_patient_id),
                 image_date=r.image_date, age=r.age, manufacturer=r.manufacturer,
                 modality=r.modality, view_position=r.view_position)
        for r in session.execute(
            select(ScreenedImage.instance_id, ScreenedImage.patient_id,
                   ScreenedImage.issuer_of_patient_id, ScreenedImage.image_date, ScreenedImage.age,
                   ScreenedImage.manufacturer, ScreenedImage.modality, ScreenedImage.view_position)
            .join(patients, and_(ScreenedImage.patient_id == patients.c.patient_id,
                                 ScreenedImage.issuer_of_patient_id == patients.c.issuer_of_patient_id))
            .where(ScreenedImage.image_date.is_not(None)))
    ]
    return pair(dxa_rows, images, window_days)


@dataclass(frozen=True)
class ModelKey:
    """A model version that has produced results here."""

    device_uid: str
    name: str
    version: str


@dataclass(frozen=True, eq=False)
class ModelPairs:
    """The pairs one model screened, as arrays for the metrics (same order everywhere)."""

    model: ModelKey
    pairs: tuple[Pair, ...]
    labels: np.ndarray  # (N,) class indices of the DXA category
    probs: np.ndarray  # (N, 3) the model's probabilities for the paired image

    @property
    def patients(self) -> list[str]:
        """One opaque key per pair for the patient-level bootstrap (held in memory only)."""
        return [f"{p.dxa.patient[1]}\x00{p.dxa.patient[0]}" for p in self.pairs]

    def subset(self, keep: Sequence[int] | np.ndarray) -> ModelPairs:
        index = np.asarray(keep, dtype=np.int64)
        return ModelPairs(self.model, tuple(self.pairs[i] for i in index), self.labels[index],
                          self.probs[index])


def models(session: Session) -> list[ModelKey]:
    """Every model version (Device UID) that has produced results, in the order it first did."""
    rows = session.execute(
        select(Result.device_uid, Result.model_name, Result.model_version, func.min(Result.id))
        .group_by(Result.device_uid, Result.model_name, Result.model_version)
        .order_by(func.min(Result.id)))
    seen: dict[str, ModelKey] = {}
    for uid, name, version, _ in rows:
        seen.setdefault(uid, ModelKey(uid, name, version))
    return list(seen.values())


def by_model(session: Session, pairs: Sequence[Pair]) -> dict[str, ModelPairs]:
    """Device UID -> the pairs whose image that model screened, with its probabilities."""
    index_of: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        index_of.setdefault(p.image.instance_id, []).append(i)
    rows: dict[str, list[tuple[int, tuple[float, float, float]]]] = {}
    keys: dict[str, ModelKey] = {}
    instance_ids = sorted(index_of)
    for start in range(0, len(instance_ids), _CHUNK):
        chunk = instance_ids[start:start + _CHUNK]
        for r in session.execute(
                select(Result.instance_id, Result.device_uid, Result.model_name, Result.model_version,
                       Result.p_normal, Result.p_osteopenia, Result.p_osteoporosis)
                .where(Result.instance_id.in_(chunk))):
            keys.setdefault(r.device_uid, ModelKey(r.device_uid, r.model_name, r.model_version))
            for i in index_of[r.instance_id]:
                rows.setdefault(r.device_uid, []).append(
                    (i, (r.p_normal, r.p_osteopenia, r.p_osteoporosis)))
    out = {}
    for uid, items in rows.items():
        items.sort()
        chosen = tuple(pairs[i] for i, _ in items)
        out[uid] = ModelPairs(keys[uid], chosen, np.array([p.label for p in chosen], dtype=np.int64),
                              np.array([probs for _, probs in items], dtype=np.float64).reshape(-1, 3))
    return out


def load_model_pairs(engine: Engine, window_days: int) -> dict[str, ModelPairs]:
    """Device UID -> that model's pairs, straight from the database."""
    with Session(engine) as session:
        return by_model(session, load_pairs(session, window_days))

