"""Training data: manifest rows -> decoded, prepared, cached images -> augmented batches.

Images go through osteo_node.pixels (the node's own pipeline) once; the letterboxed [0, 1] model
input is cached in memory, augmented per batch, then normalised with the spec's mean/std.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from osteo_node.errors import ImageError
from osteo_node.pixels import decode, load_png, prepare
from osteo_node.records import CLASS_NAMES, category_from_t_score

logger = logging.getLogger(__name__)

FRONTAL_VIEWS = frozenset({"PA", "AP"})
REQUIRED_COLUMNS = ("file", "patient_id", "class", "view")
#: Shares of patients per split when the manifest has no split column (or leaves it empty).
DEFAULT_SPLIT_SHARES: tuple[tuple[str, float], ...] = (("train", 0.70), ("val", 0.15), ("test", 0.15))
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Row:
    """One manifest row that training uses."""

    path: Path
    patient_id: str
    label: int  # index into CLASS_NAMES
    t_score: float | None
    view: str
    split: str  # train, val or test
    age: float | None = None  # years, from the optional "age" column


def read_manifest(manifest: str | Path, *, frontal_only: bool = True, split_seed: int = 0) -> list[Row]:
    """Rows of a manifest CSV (paths relative to the manifest's folder); lateral views dropped.

    Without a split column (or with every split cell empty) patients are assigned to
    train/val/test by `assign_patient_splits(rows, split_seed)`: deterministic, and a patient's
    images always share one split. A column with some cells empty is refused.
    """
    manifest = Path(manifest)
    base = manifest.parent
    rows: list[Row] = []
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {manifest} lacks columns {missing} (has {reader.fieldnames})")
        records = list(reader)
    auto_split = all(not (rec.get("split") or "").strip() for rec in records)
    for n, rec in enumerate(records, start=2):
        view = (rec.get("view") or "").strip().upper()
        if frontal_only and view not in FRONTAL_VIEWS:
            continue
        split = "" if auto_split else SPLIT_ALIASES.get((rec.get("split") or "").strip().lower())
        if split is None:
            raise ValueError(f"manifest {manifest} line {n}: split {rec.get('split')!r} not in {sorted(SPLIT_ALIASES)}")
        t_text = (rec.get("t_score") or "").strip()
        t_score = float(t_text) if t_text else None
        name = (rec.get("class") or "").strip().lower()
        if not name and t_score is not None:
            name = category_from_t_score(t_score)
        if name not in CLASS_NAMES:
            raise ValueError(f"manifest {manifest} line {n}: class {rec.get('class')!r} not in {CLASS_NAMES}")
        age_text = (rec.get("age") or "").strip()
        try:
            age = float(age_text) if age_text else None
        except ValueError as exc:
            raise ValueError(f"manifest {manifest} line {n}: age {age_text!r} is not a number") from exc
        rows.append(Row(path=base / rec["file"], patient_id=rec["patient_id"], label=CLASS_NAMES.index(name),
                        t_score=t_score, view=view, split=split, age=age))
    if auto_split:
        rows = assign_patient_splits(rows, split_seed)
        logger.info("manifest %s has no split column: patient-level splits drawn with seed %d", manifest, split_seed)
    return rows


def read_manifests(manifests: Sequence[str | Path], *, split_seed: int = 0) -> list[Row]:
    """The rows of several manifests as one cohort (`osteo-train train --manifest A --manifest
    B`): each manifest's rows keep their own splits (or draw them, as `read_manifest` does). With
    more than one, patient ids are prefixed with the manifest's position (1:, 2:, ...): cohorts
    made apart, e.g. two `osteo-train phantoms` runs, use the same ids for different women, who
    must not become one patient (one split, one weight in the patient-level bootstrap)."""
    if len(manifests) == 1:
        return read_manifest(manifests[0], split_seed=split_seed)
    return [replace(row, patient_id=f"{position}:{row.patient_id}")
            for position, manifest in enumerate(manifests, start=1)
            for row in read_manifest(manifest, split_seed=split_seed)]


def assign_patient_splits(
    rows: Sequence[Row], seed: int, shares: Sequence[tuple[str, float]] = DEFAULT_SPLIT_SHARES
) -> list[Row]:
    """`rows` with `split` set per patient: deterministic from `seed`, no patient in two splits.

    Patients are stratified by their highest class, shuffled with `seed` within each stratum
    (after sorting by id, so the manifest's row order does not matter) and cut by `shares`.
    """
    total = sum(share for _, share in shares)
    if total <= 0 or any(share < 0 for _, share in shares):
        raise ValueError(f"split shares must be >= 0 with a positive sum, got {list(shares)}")
    stratum: dict[str, int] = {}
    for row in rows:
        stratum[row.patient_id] = max(stratum.get(row.patient_id, -1), row.label)
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for k in sorted(set(stratum.values())):
        patients = sorted(p for p, s in stratum.items() if s == k)
        order = [patients[i] for i in rng.permutation(len(patients))]
        start = 0.0
        for name, share in shares:
            stop = start + share / total
            for pid in order[int(round(start * len(order))) : int(round(stop * len(order)))]:
                split_of[pid] = name
            start = stop
    return [replace(row, split=split_of.get(row.patient_id, shares[-1][0])) for row in rows]


def load_image01(path: Path) -> np.ndarray:
    """A training image as [0, 1] display space: PNG through load_png, anything else as DICOM."""
    if path.suffix.lower() == ".png":
        return load_png(path)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ImageError(f"{path}: not a readable DICOM file: {exc}") from exc
    return decode(ds)


class CachedImages:
    """Letterboxed [0, 1] model inputs (N, S, S) float16 plus labels, decoded once (after the
    model's input transform, osteo_node.pixels.INPUT_TRANSFORMS)."""

    def __init__(self, rows: Sequence[Row], input_size: int, transform: str = "none") -> None:
        start = time.perf_counter()
        self.rows = list(rows)
        self.images = torch.zeros((len(self.rows), input_size, input_size), dtype=torch.float16)
        for i, row in enumerate(self.rows):
            # mean 0 / std 1: the tensor is the letterboxed [0, 1] image itself
            prepared = prepare(load_image01(row.path), input_size, (0.0,) * 3, (1.0,) * 3, display_max=1,
                               transform=transform)
            self.images[i] = torch.from_numpy(prepared.tensor[0]).to(torch.float16)
        self.labels = torch.tensor([r.label for r in self.rows], dtype=torch.long)
        logger.info("cached %d images at %d px in %.1f s", len(self.rows), input_size, time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.rows)


def normalise(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, S, S) or (B, 1, S, S) in [0, 1] -> (B, 3, S, S) normalised model input."""
    if x01.dim() == 3:
        x01 = x01[:, None]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x01.float().expand(-1, 3, -1, -1) - m) / s


def augment(x01: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Small random affine, brightness/contrast/gamma and noise on (B, S, S) [0, 1] images."""
    x = x01.float()[:, None]
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = u(-5, 5) * strength * math.pi / 180
    scale = 1 + u(-0.07, 0.07) * strength
    tx, ty = u(-0.04, 0.04) * strength * 2, u(-0.04, 0.04) * strength * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gamma = torch.exp(u(-0.25, 0.25) * strength).view(b, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    mean = x.mean(dim=(2, 3), keepdim=True)
    contrast = (1 + u(-0.15, 0.15) * strength).view(b, 1, 1, 1)
    brightness = (u(-0.08, 0.08) * strength).view(b, 1, 1, 1)
    x = (x - mean) * contrast + mean + brightness
    sigma = (u(0.0, 0.02) * strength).view(b, 1, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)[:, 0]
