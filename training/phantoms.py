"""`osteo-train phantoms`: a synthetic cohort of chest radiographs with known bone density.

Each phantom is a digitally reconstructed radiograph (DRR) of the one real chest CT shipped in
`training/data/chest_ct` (see its README): Hounsfield units become linear attenuation at about
60 keV, the bone mineral of the labelled skeleton is scaled by a factor tied to a simulated T-score
(trabecular bone more than cortical bone), and parallel rays through the slightly rotated volume
give a PA (or lateral) line-integral image. Detector physics (quantum noise, blur) and a DX
processing chain (log, edge enhancement, 12-bit output, VOI window) follow. Everything except the
bone factors is drawn independently of the T-score, unless `--leak` asks otherwise (controls for
the explainability metrics: `soft-tissue`, the class shows in the density and fat of all soft
tissue; `off-bone`, the class shows only in the soft tissue that no bone overlies in the
projection: chest wall beside the ribs, mediastinum beside the spine, intercostal spaces; in both,
bone mineral does not change with the class).

Per image the command writes a DICOM DX For Presentation file, PNG masks of the projected bone
groups and the lungs (same geometry), and one `manifest.csv` row.

    osteo-train phantoms --n 1000 --seed 0 --out runs/phantoms
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from osteo_node.records import CLASS_NAMES, category_from_t_score
from osteo_node.uids import derived_uid

logger = logging.getLogger(__name__)

DATA_FILE = Path(__file__).resolve().parent / "data" / "chest_ct" / "chest_ct.npz"

#: Group ids of the compact label volume (see training/derive_ct.py).
GROUP_IDS: dict[str, int] = {
    "ribs": 1, "clavicles": 2, "spine": 3, "scapulae": 4, "humeri": 5, "sternum": 6, "lungs": 7,
}
#: Structures written as PNG masks, in manifest column order; "body" is every pixel whose ray
#: crosses at least BODY_CHORD_MM of tissue (the patient, not the air beside her).
MASK_NAMES: tuple[str, ...] = ("ribs", "clavicles", "spine", "scapulae", "humeri", "lungs", "body")
BODY_CHORD_MM = 5.0
#: Groups whose mineral follows the T-score.
BONE_GROUPS: tuple[str, ...] = ("ribs", "clavicles", "spine", "scapulae", "humeri", "sternum")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "file", "patient_id", "t_score", "class", "age", "sex", "view", "split",
    *(f"mask_{name}" for name in MASK_NAMES),
    "true_class",
)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MU_WATER = 0.02  # linear attenuation of water near 60 keV, 1/mm
#: Mineral attenuates relatively more at radiograph energies (~60 keV) than at CT energies
#: (~70 keV effective, where HU were measured): bilinear HU -> mu conversion above soft tissue.
BONE_ENERGY_FACTOR = 2.0
SOFT_HU = 40.0  # HU of marrow / soft tissue; bone mineral is the excess above it
TRABECULAR_MAX_HU = 450.0  # interior bone voxels below this are trabecular
MAGNIFICATION = 1.1  # estimated radiographic magnification factor (PA, 180 cm SID)
FIELD_OF_VIEW_MM = 330.0  # default patient-plane field of view at zoom 1
T_SCORE_RANGES: dict[str, tuple[float, float]] = {
    "osteoporosis": (-4.5, -2.5),
    "osteopenia": (-2.5, -1.0),
    "normal": (-1.0, 2.0),
}
LEAKS: tuple[str, ...] = ("none", "soft-tissue", "off-bone")
SPLITS: tuple[tuple[str, float], ...] = (("train", 0.70), ("val", 0.15), ("test", 0.15))
BASE_DATE = dt.date(2023, 1, 2)


#: Mineral change per T-score SD, (cortical, trabecular), relative to the CT's bone (T = 0).
#: Real areal BMD changes by about 10-12% per SD (cortical ~0.09, trabecular ~0.16 here would be
#: realistic). The phantoms exaggerate it about twofold so that a small ViT trained from scratch
#: on a few thousand images, on 2 CPU cores, learns the task; a pretrained foundation model on real
#: radiographs is what the study used for the subtle real effect.
BONE_CHANGE_PER_SD: tuple[float, float] = (0.18, 0.30)
#: Named bone effects for `--bone-change-per-sd`: the default (exaggerated) one and the realistic one.
BONE_EFFECTS: dict[str, tuple[float, float]] = {
    "exaggerated": BONE_CHANGE_PER_SD,
    "realistic": (0.09, 0.16),
}
#: Amplitude of the vertical trabecular striation at T = -4.5 with the default effect; it scales
#: with the trabecular change per SD, so a realistic effect also has subtler texture.
STRIATION_AMPLITUDE = 0.35


def bone_factors(t_score: float, per_sd: tuple[float, float] = BONE_CHANGE_PER_SD) -> tuple[float, float]:
    """(cortical, trabecular) mineral factors relative to the CT's bone (taken as T = 0).

    Trabecular bone, with its larger surface, loses mineral faster than cortical bone.
    """
    cortical, trabecular = per_sd
    return max(0.2, 1.0 + cortical * t_score), max(0.1, 1.0 + trabecular * t_score)


def parse_bone_change(text: str) -> tuple[float, float]:
    """`exaggerated`, `realistic` or `CORTICAL,TRABECULAR` (per T-score SD, each in 0..0.5)."""
    if text in BONE_EFFECTS:
        return BONE_EFFECTS[text]
    try:
        cortical, trabecular = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"bone change per SD must be one of {sorted(BONE_EFFECTS)} or CORTICAL,TRABECULAR, got {text!r}"
        ) from None
    if not (0.0 <= cortical <= 0.5 and 0.0 <= trabecular <= 0.5):
        raise ValueError(f"bone change per SD must be in 0..0.5, got {text!r}")
    return cortical, trabecular


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The compact CT as attenuation components, plane-major for one view.

    Arrays have shape (planes along the ray, detector-horizontal u, vertical v = inferior->superior):
    `soft` (all non-mineral attenuation, 1/mm), `cortical` and `trabecular` (bone mineral excess,
    1/mm), `bits` (bit g-1 set where bone group g is), `body` (projected tissue chord, mm, (u, v)).
    """

    view: str
    soft: np.ndarray
    cortical: np.ndarray
    trabecular: np.ndarray
    bits: np.ndarray
    body: np.ndarray
    step_mm: float
    du_mm: float
    dv_mm: float
    lung_v_range: tuple[float, float]  # lung extent along v, mm from the inferior edge


@functools.lru_cache(maxsize=4)
def load_anatomy(view: str = "PA", path: Path = DATA_FILE) -> Anatomy:
    """Load the compact CT and split it into attenuation components for `view` (PA or LATERAL)."""
    from scipy import ndimage

    if view not in ("PA", "LATERAL"):
        raise ValueError(f"load_anatomy: view must be PA or LATERAL, got {view!r}")
    if not path.is_file():
        raise FileNotFoundError(f"load_anatomy: compact CT {path} missing; run training.derive_ct")
    with np.load(path) as data:
        hu = data["hu"].astype(np.float32)
        groups = data["groups"]
        spacing = tuple(float(s) for s in data["spacing"])

    bone = np.isin(groups, [GROUP_IDS[name] for name in BONE_GROUPS])
    # Interior of each bone in-plane (slices are 2.5 mm thick, so no erosion along z).
    interior = np.zeros_like(bone)
    for group in BONE_GROUPS:
        member = groups == GROUP_IDS[group]
        interior |= ndimage.binary_erosion(member, structure=np.ones((3, 3, 1), bool))
    trabecular_voxels = interior & (hu < TRABECULAR_MAX_HU)

    soft = MU_WATER * np.clip(1.0 + np.minimum(hu, SOFT_HU) / 1000.0, 0.0, None)
    excess = MU_WATER * BONE_ENERGY_FACTOR * np.clip(hu - SOFT_HU, 0.0, None) / 1000.0
    # Unlabelled dense voxels (calcifications, contrast) stay with the soft component.
    soft += np.where(bone, 0.0, excess)
    cortical = np.where(bone & ~trabecular_voxels, excess, 0.0).astype(np.float32)
    trabecular = np.where(trabecular_voxels, excess, 0.0).astype(np.float32)
    bits = np.zeros(groups.shape, np.uint8)
    for gid in range(1, 8):
        bits |= np.where(groups == gid, np.uint8(1 << (gid - 1)), np.uint8(0))
    tissue = (hu > -500).astype(np.float32)

    ray_axis = 1 if view == "PA" else 0  # PA: posterior->anterior; lateral: right->left

    def plane_major(volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(volume, ray_axis, 0))

    lung_z = np.nonzero((groups == GROUP_IDS["lungs"]).any(axis=(0, 1)))[0]
    return Anatomy(
        view=view,
        soft=plane_major(soft.astype(np.float32)),
        cortical=plane_major(cortical),
        trabecular=plane_major(trabecular),
        bits=plane_major(bits),
        body=tissue.sum(axis=ray_axis) * spacing[ray_axis],
        step_mm=spacing[ray_axis],
        du_mm=spacing[1 - ray_axis],
        dv_mm=spacing[2],
        lung_v_range=(float(lung_z[0]) * spacing[2], float(lung_z[-1] + 1) * spacing[2]),
    )


def shear_project(planes: np.ndarray, shift_u: float, shift_v: float) -> np.ndarray:
    """Sum of planes, plane j shifted by (j - centre) * (shift_u, shift_v) voxels (bilinear).

    This is the parallel projection along a ray direction tilted by small angles.
    """
    n, nu, nv = planes.shape
    pad = int(math.ceil(max(abs(shift_u), abs(shift_v)) * n / 2)) + 2
    out = np.zeros((nu + 2 * pad + 1, nv + 2 * pad + 1), np.float32)
    centre = (n - 1) / 2
    row = np.empty((nu + 1, nv), np.float32)
    for j in range(n):
        su, sv = (j - centre) * shift_u, (j - centre) * shift_v
        iu, iv = math.floor(su), math.floor(sv)
        fu, fv = su - iu, sv - iv
        row[:nu] = (1 - fu) * planes[j]
        row[nu] = 0
        row[1:] += fu * planes[j]
        u0, v0 = pad + iu, pad + iv
        out[u0 : u0 + nu + 1, v0 : v0 + nv] += (1 - fv) * row
        out[u0 : u0 + nu + 1, v0 + 1 : v0 + 1 + nv] += fv * row
    return out[pad : pad + nu, pad : pad + nv]


def shear_project_bits(planes: np.ndarray, shift_u: float, shift_v: float) -> np.ndarray:
    """Bitwise OR of planes along the same tilted rays as `shear_project` (nearest voxel)."""
    n, nu, nv = planes.shape
    pad = int(math.ceil(max(abs(shift_u), abs(shift_v)) * n / 2)) + 2
    out = np.zeros((nu + 2 * pad, nv + 2 * pad), np.uint8)
    centre = (n - 1) / 2
    for j in range(n):
        iu, iv = round((j - centre) * shift_u), round((j - centre) * shift_v)
        out[pad + iu : pad + iu + nu, pad + iv : pad + iv + nv] |= planes[j]
    return out[pad : pad + nu, pad : pad + nv]


# --------------------------------------------------------------------------- cohort


@dataclass(frozen=True)
class GenerationOptions:
    """Settings of one `osteo-train phantoms` run."""

    size: int = 512
    pixel_spacing: float | None = None  # patient-plane mm per pixel; None: FIELD_OF_VIEW_MM / size
    label_noise: float = 0.05
    lateral_fraction: float = 0.1
    male_fraction: float = 0.15
    repeat_fraction: float = 0.05
    leak: str = "none"
    bone_change: bool = True
    bone_change_per_sd: tuple[float, float] = BONE_CHANGE_PER_SD
    #: Broad domain randomisation of everything that carries no label (see `randomise_spec`).
    randomise: bool = False
    #: Randomised acquisition physics: beam energy, scatter, phosphor halo, gain non-uniformity,
    #: collimation, a lead marker and portrait detectors (see `randomise_physics`).
    randomise_physics: bool = False

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 4096:
            raise ValueError(f"size must be in 32..4096, got {self.size!r}")
        if self.pixel_spacing is not None and not 0.05 <= self.pixel_spacing <= 5.0:
            raise ValueError(f"pixel_spacing must be in 0.05..5 mm, got {self.pixel_spacing!r}")
        for name in ("label_noise", "lateral_fraction", "male_fraction", "repeat_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.leak not in LEAKS:
            raise ValueError(f"leak must be one of {LEAKS}, got {self.leak!r}")
        if len(self.bone_change_per_sd) != 2 or not all(0.0 <= v <= 0.5 for v in self.bone_change_per_sd):
            raise ValueError(f"bone_change_per_sd must be two values in 0..0.5, got {self.bone_change_per_sd!r}")

    @property
    def spacing_mm(self) -> float:
        """Patient-plane pixel spacing (DICOM PixelSpacing)."""
        return self.pixel_spacing or round(FIELD_OF_VIEW_MM / self.size, 4)


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines one phantom image; drawn in order from the run's seed."""

    index: int
    patient_index: int
    study_index: int  # 0 first study, 1 repeat study
    seed: int
    t_score: float
    label_class: str  # after label noise
    sex: str
    birth_date: dt.date
    study_date: dt.date
    view: str  # PA or LATERAL
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    zoom: float  # anatomy scale: > 1 magnifies (body size variation / tighter crop)
    shift_u: float  # position of the field inside the available slack, 0..1
    shift_v: float
    soft_density: float
    fat_fraction: float
    breast: tuple[float, float, float, float] | None  # radius mm, thickness mm, dx mm, dz fraction
    photons: float  # quanta per pixel behind air
    blur_mm: float
    edge_amount: float
    edge_sigma_mm: float
    equalization: float  # share of the large-scale soft-tissue signal removed
    equalization_sigma_mm: float
    dn_low: float
    dn_high: float
    window_jitter: tuple[float, float]
    electronic_noise_dn: float
    bone_change: bool = True
    off_bone_density: float = 1.0  # soft tissue where no bone overlies it, relative (leak "off-bone")
    bone_change_per_sd: tuple[float, float] = BONE_CHANGE_PER_SD
    # Domain randomisation (GenerationOptions.randomise); the defaults are the plain chain.
    response: str = "log"  # detector/processing curve: log, gamma (power of the log image) or linear
    gamma: float = 1.0
    lut: float = 0.0  # strength of a sigmoid (S-curve) LUT on the output, 0 none
    lut_shift: float = 0.0  # centre of that S-curve, relative to mid-grey
    clahe_clip: float = 0.0  # contrast-limited adaptive histogram equalisation, 0 none
    clahe_tiles: int = 8
    second_edge_amount: float = 0.0  # a second, coarse unsharp mask (multi-frequency processing)
    second_edge_sigma_mm: float = 8.0
    # Acquisition physics (GenerationOptions.randomise_physics); the defaults are the plain chain.
    beam_kev: float = 0.0  # effective beam energy; 0: the chain's own attenuation (about 60 keV)
    scatter_ratio: float = 0.0  # scatter-to-primary ratio at the median (grid ~0.1-0.3, none ~0.5-1.4)
    scatter_sigma_mm: float = 60.0  # reach of the scatter veil
    halo_weight: float = 0.0  # share of a long-range (phosphor) blur
    halo_mm: float = 3.0
    gain_nonuniformity: float = 0.0  # relative amplitude of a smooth detector-gain pattern
    collimation_mm: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # top, bottom, left, right
    shutter_bright: bool = True  # collimated border bright (electronic shutter) or dark (unexposed)
    marker_corner: int = -1  # lead side marker in corner 0..3; -1 none
    aspect: float = 1.0  # detector columns / rows (a 35 x 43 cm cassette: 0.81); the columns are cropped
    aspect_shift: float = 0.5  # where the kept columns sit, 0 left .. 1 right

    @property
    def patient_id(self) -> str:
        return f"PHANTOM-{self.patient_index:06d}"

    @property
    def true_class(self) -> str:
        return category_from_t_score(self.t_score)

    @property
    def age(self) -> int:
        """Completed years at the study date."""
        years = self.study_date.year - self.birth_date.year
        before_birthday = (self.study_date.month, self.study_date.day) < (
            self.birth_date.month,
            self.birth_date.day,
        )
        return years - int(before_birthday)

    @property
    def stem(self) -> str:
        return f"{self.index:06d}"


def noisy_label(true_class: str, rng: np.random.Generator) -> str:
    """A neighbouring WHO class of `true_class`, drawn uniformly among the neighbours."""
    position = CLASS_NAMES.index(true_class)
    neighbours = [CLASS_NAMES[i] for i in (position - 1, position + 1) if 0 <= i < len(CLASS_NAMES)]
    return neighbours[int(rng.integers(len(neighbours)))]


def draw_image(
    rng: np.random.Generator,
    options: GenerationOptions,
    *,
    index: int,
    seed: int,
    patient_index: int,
    study_index: int,
    t_score: float,
    sex: str,
    birth_date: dt.date,
    study_date: dt.date,
) -> PhantomSpec:
    """Draw the per-image nuisance parameters (independent of the T-score unless leaking)."""
    label = category_from_t_score(t_score)
    if rng.random() < options.label_noise:
        label = noisy_label(label, rng)
    view = "LATERAL" if rng.random() < options.lateral_fraction else "PA"
    soft_density = float(rng.uniform(0.94, 1.06))
    fat_fraction = float(rng.uniform(0.0, 0.25))
    if options.leak == "soft-tissue":
        # The class shows in soft tissue instead: denser, thicker soft tissue at low T-score.
        soft_density = float(1.0 - 0.03 * (t_score + 1.25) + rng.uniform(-0.01, 0.01))
        fat_fraction = float(np.clip(0.12 - 0.06 * (t_score + 1.25), 0.0, 0.5))
    off_bone_density = 1.0
    if options.leak == "off-bone":
        # The class shows only where no bone overlies the soft tissue: denser at low T-score.
        off_bone_density = float(1.0 - 0.06 * (t_score + 1.25) + rng.uniform(-0.02, 0.02))
    breast = None
    if sex == "F" and rng.random() < 0.9:
        breast = (
            float(rng.uniform(45, 85)),
            float(rng.uniform(12, 40)),
            float(rng.uniform(60, 95)),
            float(rng.uniform(0.15, 0.4)),
        )
    spec = PhantomSpec(
        index=index,
        patient_index=patient_index,
        study_index=study_index,
        seed=seed,
        t_score=round(t_score, 2),
        label_class=label,
        sex=sex,
        birth_date=birth_date,
        study_date=study_date,
        view=view,
        yaw_deg=float(rng.uniform(-3, 3)),
        pitch_deg=float(rng.uniform(-3, 3)),
        roll_deg=float(rng.uniform(-3, 3)),
        zoom=float(rng.uniform(1.0, 1.15)),
        shift_u=float(rng.random()),
        shift_v=float(rng.random()),
        soft_density=soft_density,
        fat_fraction=fat_fraction,
        breast=breast,
        photons=float(np.exp(rng.uniform(np.log(2e4), np.log(2e5)))),
        blur_mm=float(rng.uniform(0.25, 0.7)),
        edge_amount=float(rng.uniform(0.3, 0.8)),
        edge_sigma_mm=float(rng.uniform(1.0, 2.0)),
        equalization=float(rng.uniform(0.6, 0.8)),
        equalization_sigma_mm=float(rng.uniform(15, 30)),
        dn_low=float(rng.uniform(150, 450)),
        dn_high=float(rng.uniform(3200, 3800)),
        window_jitter=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(0.9, 1.1))),
        electronic_noise_dn=float(rng.uniform(1.0, 4.0)),
        bone_change=options.bone_change and options.leak == "none",
        off_bone_density=off_bone_density,
        bone_change_per_sd=tuple(options.bone_change_per_sd),
    )
    spec = randomise_spec(spec, options) if options.randomise else spec
    return randomise_physics(spec) if options.randomise_physics else spec


def randomise_spec(spec: PhantomSpec, options: GenerationOptions) -> PhantomSpec:
    """Redraw the nuisance parameters over broad ranges, from a stream of their own.

    Detector response and processing (log / gamma / near-linear curves, one or two unsharp masks,
    equalisation, CLAHE, S-curve LUTs), exposure, windowing, soft tissue and breast, noise, blur,
    pose and field of view. The generator is seeded by (seed, index, 3), separate from the cohort's
    stream, so T-scores, labels, patients and splits are those of the same cohort without
    randomisation; nothing drawn here depends on the T-score (the soft-tissue leaks keep theirs).
    """
    rng = np.random.default_rng([spec.seed, spec.index, 3])
    changes: dict[str, object] = {}
    if options.leak == "none":
        changes["soft_density"] = float(rng.uniform(0.88, 1.12))
        changes["fat_fraction"] = float(rng.uniform(0.0, 0.45))
    breast = spec.breast
    if spec.sex == "F" and rng.random() < 0.9:
        breast = (float(rng.uniform(40, 110)), float(rng.uniform(10, 60)), float(rng.uniform(55, 105)),
                  float(rng.uniform(0.1, 0.45)))
    elif spec.sex == "F":
        breast = None
    response = str(rng.choice(["log", "gamma", "linear"], p=[0.5, 0.35, 0.15]))
    return dataclasses.replace(
        spec,
        **changes,
        breast=breast,
        yaw_deg=float(rng.uniform(-6, 6)),
        pitch_deg=float(rng.uniform(-6, 6)),
        roll_deg=float(rng.uniform(-6, 6)),
        zoom=float(rng.uniform(1.0, 1.35)),
        photons=float(np.exp(rng.uniform(np.log(1e4), np.log(5e5)))),
        blur_mm=float(rng.uniform(0.15, 1.2)),
        edge_amount=float(rng.uniform(0.0, 1.5)),
        edge_sigma_mm=float(rng.uniform(0.6, 3.0)),
        equalization=float(rng.uniform(0.2, 0.9)),
        equalization_sigma_mm=float(rng.uniform(8, 60)),
        dn_low=float(rng.uniform(0, 900)),
        dn_high=float(rng.uniform(2600, 4095)),
        window_jitter=(float(rng.uniform(-0.15, 0.15)), float(rng.uniform(0.7, 1.3))),
        electronic_noise_dn=float(rng.uniform(0.5, 12.0)),
        response=response,
        gamma=float(rng.uniform(0.6, 1.6)) if response == "gamma" else 1.0,
        lut=float(rng.uniform(0.0, 4.0)) if rng.random() < 0.5 else 0.0,
        lut_shift=float(rng.uniform(-0.2, 0.2)),
        clahe_clip=float(rng.uniform(1.0, 3.0)) if rng.random() < 0.35 else 0.0,
        clahe_tiles=int(rng.integers(4, 12)),
        second_edge_amount=float(rng.uniform(0.0, 0.8)) if rng.random() < 0.5 else 0.0,
        second_edge_sigma_mm=float(rng.uniform(5.0, 20.0)),
    )


def randomise_physics(spec: PhantomSpec) -> PhantomSpec:
    """Draw the acquisition physics the plain chain leaves out, from a stream of its own.

    Effective beam energy 42-66 keV (chest exposures at about 70-125 kVp; bone mineral's
    attenuation changes far more with it than soft tissue's, `energy_scales`), scatter with or
    without a grid, a phosphor's long-range halo, gain non-uniformity, collimation borders, a
    lead side marker and a portrait detector (fewer columns than rows, as a 35 x 43 cm cassette).
    Seeded by (seed, index, 4), so the cohort's labels, splits and the `randomise_spec` draws stay
    those of the same options without it; nothing here depends on the T-score.
    """
    rng = np.random.default_rng([spec.seed, spec.index, 4])
    grid = rng.random() < 0.4
    collimated = rng.random() < 0.5
    return dataclasses.replace(
        spec,
        beam_kev=float(rng.uniform(42, 66)) if rng.random() < 0.7 else 0.0,
        scatter_ratio=float(rng.uniform(0.1, 0.3) if grid else rng.uniform(0.5, 1.4)),
        scatter_sigma_mm=float(rng.uniform(30, 90)),
        halo_weight=float(rng.uniform(0.05, 0.25)) if rng.random() < 0.5 else 0.0,
        halo_mm=float(rng.uniform(2.0, 5.0)),
        gain_nonuniformity=float(rng.uniform(0.0, 0.03)),
        collimation_mm=tuple(float(x) for x in rng.uniform(0, 30, 4)) if collimated else (0.0, 0.0, 0.0, 0.0),
        shutter_bright=bool(rng.random() < 0.7),
        marker_corner=int(rng.integers(4)) if rng.random() < 0.6 else -1,
        aspect=float(rng.uniform(0.78, 0.95)) if rng.random() < 0.4 else 1.0,
        aspect_shift=float(rng.uniform(0.3, 0.7)),
    )


def energy_scales(beam_kev: float) -> tuple[float, float]:
    """(soft tissue, bone mineral) attenuation at an effective beam energy, relative to the chain's
    own (about 60 keV): power laws through water's and cortical mineral's (excess over water)
    attenuation at 40-80 keV (NIST XCOM), E^-0.6 and E^-2.3. 0 means the chain's own."""
    if not beam_kev:
        return 1.0, 1.0
    ratio = beam_kev / 60.0
    return ratio ** -0.6, ratio ** -2.3


def draw_cohort(n: int, seed: int, options: GenerationOptions) -> tuple[list[PhantomSpec], dict[int, str]]:
    """`n` image specs (a few patients imaged twice) and the split of each patient index."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    specs: list[PhantomSpec] = []
    patient = 0
    while len(specs) < n:
        t_class = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        low, high = T_SCORE_RANGES[t_class]
        t_score = float(rng.uniform(low, high))
        sex = "M" if rng.random() < options.male_fraction else "F"
        age = float(rng.uniform(40, 90))
        study_date = BASE_DATE + dt.timedelta(days=int(rng.integers(0, 730)))
        birth_date = study_date - dt.timedelta(days=int(age * 365.25))
        studies = 2 if rng.random() < options.repeat_fraction and len(specs) + 2 <= n else 1
        for study in range(studies):
            if study:
                study_date += dt.timedelta(days=int(rng.integers(30, 400)))
            specs.append(
                draw_image(
                    rng, options, index=len(specs), seed=seed, patient_index=patient,
                    study_index=study, t_score=t_score, sex=sex, birth_date=birth_date,
                    study_date=study_date,
                )
            )
        patient += 1
    order = rng.permutation(patient)
    splits: dict[int, str] = {}
    start = 0.0
    for name, share in SPLITS:
        stop = start + share
        for position in range(int(round(start * patient)), int(round(stop * patient))):
            splits[int(order[position])] = name
        start = stop
    for p in range(patient):
        splits.setdefault(p, SPLITS[-1][0])
    return specs, splits


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True, eq=False)
class Rendering:
    """One rendered phantom: 12-bit stored values, masks and the VOI window."""

    pixels: np.ndarray  # uint16 rows x cols, 0..4095, MONOCHROME2
    masks: dict[str, np.ndarray]  # name -> bool rows x cols (MASK_NAMES plus sternum)
    window_center: float
    window_width: float


def _detector_maps(
    spec: PhantomSpec, anatomy: Anatomy, size: int, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps from detector pixels to (u, v) indices of the projection grid."""
    nu, nv = anatomy.soft.shape[1:]
    extent_u, extent_v = nu * anatomy.du_mm, nv * anatomy.dv_mm
    n = anatomy.soft.shape[0]
    margin_u = abs(math.tan(math.radians(spec.yaw_deg))) * n * anatomy.step_mm / 2
    margin_v = abs(math.tan(math.radians(spec.pitch_deg))) * n * anatomy.step_mm / 2
    mm_per_px = spacing_mm / spec.zoom
    fov = size * mm_per_px
    slack_u = extent_u - fov - 2 * margin_u
    if slack_u >= 0:
        centre_u = margin_u + fov / 2 + spec.shift_u * slack_u
    else:  # the field is wider than the volume (lateral views): centre with a small shift
        centre_u = extent_u / 2 + (spec.shift_u - 0.5) * min(-slack_u, 30.0)
    slack_v = max(extent_v - fov - 2 * margin_v, 0.0)
    centre_v = extent_v - margin_v - fov / 2 - spec.shift_v * slack_v  # from the top down

    grid = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * mm_per_px
    pu, pv = np.meshgrid(grid, grid)  # pv grows downwards (towards the feet)
    cos, sin = math.cos(math.radians(spec.roll_deg)), math.sin(math.radians(spec.roll_deg))
    ru, rv = cos * pu - sin * pv, sin * pu + cos * pv
    if anatomy.view == "PA":  # patient's right on the viewer's left
        u_mm = centre_u + ru
    else:  # left lateral: anterior on the viewer's left
        u_mm = centre_u - ru
    v_mm = centre_v - rv
    map_u = (u_mm / anatomy.du_mm - 0.5).astype(np.float32)
    map_v = (v_mm / anatomy.dv_mm - 0.5).astype(np.float32)
    return map_u, map_v


def _breast_path(spec: PhantomSpec, anatomy: Anatomy) -> np.ndarray:
    """Water-equivalent breast thickness (mm) on the projection grid (u, v); zeros if none."""
    nu, nv = anatomy.soft.shape[1:]
    path = np.zeros((nu, nv), np.float32)
    if spec.breast is None or anatomy.view != "PA":
        return path
    radius, thickness, offset, height = spec.breast
    u = (np.arange(nu, dtype=np.float32) + 0.5) * anatomy.du_mm
    v = (np.arange(nv, dtype=np.float32) + 0.5) * anatomy.dv_mm
    lung_low, lung_high = anatomy.lung_v_range
    v_centre = lung_low + height * (lung_high - lung_low)
    dv = (v - v_centre)[None, :]
    # Rounded inferior border, gradual superior blend into the chest wall.
    scale_v = np.where(dv < 0, radius * 0.8, radius * 1.8)
    for side in (-1.0, 1.0):
        du = (u - (nu * anatomy.du_mm / 2 + side * offset))[:, None]
        r2 = (du / radius) ** 2 + (dv / scale_v) ** 2
        path += thickness * np.sqrt(np.clip(1.0 - r2, 0.0, None))
    return path


def line_integrals(spec: PhantomSpec, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total, soft-only, bits) on the projection grid (u, v) for the spec's pose and density."""
    rng = np.random.default_rng([spec.seed, spec.index, 1])
    shift_u = math.tan(math.radians(spec.yaw_deg)) * anatomy.step_mm / anatomy.du_mm
    shift_v = math.tan(math.radians(spec.pitch_deg)) * anatomy.step_mm / anatomy.dv_mm
    step = anatomy.step_mm
    soft = shear_project(anatomy.soft, shift_u, shift_v) * step
    cortical = shear_project(anatomy.cortical, shift_u, shift_v) * step
    trabecular = shear_project(anatomy.trabecular, shift_u, shift_v) * step
    bits = shear_project_bits(anatomy.bits, shift_u, shift_v)

    nu = soft.shape[0]
    lateral_weight = 0.5 + 1.5 * (np.abs(np.arange(nu) - nu / 2) / (nu / 2))[:, None] ** 2
    fat = spec.fat_fraction * anatomy.body * (lateral_weight if anatomy.view == "PA" else 1.0)
    soft_total = spec.soft_density * soft + 0.9 * MU_WATER * fat + 0.95 * MU_WATER * _breast_path(spec, anatomy)
    leak: np.ndarray | float = 0.0
    if spec.off_bone_density != 1.0:
        # Rays that meet no bone (the lungs' bit excluded), kept ~3 mm clear of bone edges. The
        # leak stays out of the soft-tissue-only image, so the window and equalization carry none.
        bone_bits = (1 << (GROUP_IDS["lungs"] - 1)) - 1
        free = ((bits & bone_bits) == 0).astype(np.float32)
        free = cv2.GaussianBlur(cv2.erode(free, np.ones((5, 5), np.uint8)), (0, 0), 1.0)
        leak = (spec.off_bone_density - 1.0) * spec.soft_density * soft * free

    per_sd = spec.bone_change_per_sd
    f_cortical, f_trabecular = bone_factors(spec.t_score, per_sd) if spec.bone_change else (1.0, 1.0)
    # Loss of horizontal trabeculae leaves coarse vertical striation (vertebral bodies).
    striation = cv2.GaussianBlur(rng.standard_normal(trabecular.shape).astype(np.float32), (0, 0), 1.5, sigmaY=0.4)
    striation /= max(float(striation.std()), 1e-6)
    strength = STRIATION_AMPLITUDE * per_sd[1] / BONE_CHANGE_PER_SD[1]
    amplitude = strength * float(np.clip(-spec.t_score / 4.5, 0.0, 1.0)) if spec.bone_change else 0.0
    texture = np.clip(1.0 + amplitude * striation, 0.0, None)
    if spec.beam_kev:
        soft_scale, mineral_scale = energy_scales(spec.beam_kev)
        soft_total, leak = soft_scale * soft_total, soft_scale * leak
        cortical, trabecular = mineral_scale * cortical, mineral_scale * trabecular
    total = soft_total + leak + f_cortical * cortical + f_trabecular * trabecular * texture
    return total.astype(np.float32), soft_total.astype(np.float32), bits


def _response(logged: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """A detector/processing curve other than the log: a power of the log image (`gamma`), or
    `linear`, i.e. the attenuated fraction 1 - exp(-log) (a detector read out without the log)."""
    if spec.response == "gamma":
        return np.power(np.clip(logged, 0.0, None), spec.gamma).astype(np.float32)
    if spec.response == "linear":
        return (4.0 * (1.0 - np.exp(-np.clip(logged, 0.0, None) / 4.0))).astype(np.float32)
    raise ValueError(f"unknown detector response {spec.response!r}")


def _output_processing(pixels: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """Randomised output LUT (an S-curve) and CLAHE on the 12-bit values; label-free by design."""
    values = pixels.astype(np.float32) / 4095.0
    if spec.lut:
        curve = 1.0 / (1.0 + np.exp(-spec.lut * (values - 0.5 - spec.lut_shift)))
        ends = 1.0 / (1.0 + np.exp(-spec.lut * (np.array([0.0, 1.0]) - 0.5 - spec.lut_shift)))
        values = (curve - ends[0]) / max(float(ends[1] - ends[0]), 1e-6)
    out = np.clip(np.rint(values * 4095.0), 0, 4095).astype(np.uint16)
    if spec.clahe_clip:
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
        out = (clahe.apply(out << 4) >> 4).astype(np.uint16)
    return out


def render(spec: PhantomSpec, size: int = 512, spacing_mm: float | None = None) -> Rendering:
    """Render one phantom: projection, detector, DX processing, 12-bit values and masks."""
    spacing_mm = spacing_mm or FIELD_OF_VIEW_MM / size
    anatomy = load_anatomy(spec.view)
    total, soft, bits = line_integrals(spec, anatomy)
    map_u, map_v = _detector_maps(spec, anatomy, size, spacing_mm)
    # The projection grid is (u, v) with v upwards; cv2 wants (rows, cols) = (v, u).
    line = cv2.remap(total.T, map_u, map_v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    line = np.clip(line, 0.0, None)
    # Dynamic-range equalization removes a share of the large-scale signal. Its low-pass image
    # comes from the soft-tissue-only projection, so processing carries no bone information.
    low_pass = cv2.GaussianBlur(
        np.ascontiguousarray(soft.T), (0, 0),
        sigmaX=spec.equalization_sigma_mm / anatomy.du_mm, sigmaY=spec.equalization_sigma_mm / anatomy.dv_mm,
    )
    soft_equalized = soft.T - spec.equalization * low_pass
    equalizer = spec.equalization * cv2.remap(low_pass, map_u, map_v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    coarse_u, coarse_v = map_u[::8, ::8].copy(), map_v[::8, ::8].copy()
    soft_line = cv2.remap(soft_equalized, coarse_u, coarse_v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # Detector: quantum noise on the transmitted intensity, then the scintillator blur.
    rng = np.random.default_rng([spec.seed, spec.index, 2])
    mm_per_px = spacing_mm / spec.zoom
    intensity = np.exp(-line)
    scattered = None
    if spec.scatter_ratio:
        intensity, scattered = _scatter(intensity, soft, map_u, map_v, spec, mm_per_px, size)
    if spec.marker_corner >= 0:
        intensity = np.where(_marker(spec.marker_corner, size), intensity * 0.02, intensity).astype(np.float32)
    intensity += rng.standard_normal(intensity.shape).astype(np.float32) * np.sqrt(intensity / spec.photons)
    blurred = cv2.GaussianBlur(intensity, (0, 0), spec.blur_mm / mm_per_px)
    if spec.halo_weight:
        halo = cv2.GaussianBlur(intensity, (0, 0), spec.halo_mm / mm_per_px)
        blurred = (1 - spec.halo_weight) * blurred + spec.halo_weight * halo
    intensity = blurred
    if spec.gain_nonuniformity:
        pattern = np.random.default_rng([spec.seed, spec.index, 5]).standard_normal((size, size)).astype(np.float32)
        pattern = cv2.GaussianBlur(pattern, (0, 0), size / 12)
        intensity = intensity * (1.0 + spec.gain_nonuniformity * pattern / max(float(pattern.std()), 1e-6))
    logged = -np.log(np.clip(intensity, 1e-6, None))
    if scattered is not None:  # the window sees the soft-only image through the same scatter
        soft_line = -np.log(np.exp(-scattered[0]) + scattered[1]) - equalizer[::8, ::8]
    low, high = np.percentile(soft_line, [0.5, 99.0])
    high += 0.3
    if spec.response != "log":  # randomised detector response, applied alike to the soft-only image
        logged, equalizer = _response(logged, spec), _response(equalizer, spec)
        low, high = float(_response(np.float32(low), spec)), float(_response(np.float32(high), spec))
    # DX processing: edge enhancement (unsharp mask), then a linear map to 12 bits.
    blurred = cv2.GaussianBlur(logged, (0, 0), spec.edge_sigma_mm / mm_per_px)
    processed = logged + spec.edge_amount * (logged - blurred) - equalizer
    if spec.second_edge_amount:
        coarse = cv2.GaussianBlur(logged, (0, 0), spec.second_edge_sigma_mm / mm_per_px)
        processed = processed + spec.second_edge_amount * (logged - coarse)
    # Mapping and window come from the soft-tissue-only image so they carry no bone information.
    gain = (spec.dn_high - spec.dn_low) / max(float(high - low), 1e-3)
    values = spec.dn_low + gain * (processed - low)
    values += rng.standard_normal(values.shape).astype(np.float32) * spec.electronic_noise_dn
    pixels = np.clip(np.rint(values), 0, 4095).astype(np.uint16)
    if spec.lut or spec.clahe_clip:
        pixels = _output_processing(pixels, spec)

    width = (spec.dn_high - spec.dn_low) * spec.window_jitter[1]
    centre = (spec.dn_high + spec.dn_low) / 2 + spec.window_jitter[0] * width
    masks = projected_masks(bits, anatomy.body > BODY_CHORD_MM, map_u, map_v)
    if any(spec.collimation_mm):
        field = _field(spec.collimation_mm, spacing_mm, size)
        pixels[~field] = 4095 if spec.shutter_bright else int(spec.dn_low)
        masks = {name: mask & field for name, mask in masks.items()}
    if spec.aspect != 1.0:
        cols = round(size * spec.aspect)
        left = round(spec.aspect_shift * (size - cols))
        pixels = np.ascontiguousarray(pixels[:, left : left + cols])
        masks = {name: np.ascontiguousarray(mask[:, left : left + cols]) for name, mask in masks.items()}
    return Rendering(pixels, masks, round(float(centre), 1), round(float(width), 1))


def _scatter(intensity: np.ndarray, soft: np.ndarray, map_u: np.ndarray, map_v: np.ndarray, spec: PhantomSpec,
             mm_per_px: float, size: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Add a scatter veil: a wide low-pass of the soft-tissue-only primary (so it carries no bone
    information) scaled to `scatter_ratio` times the median primary. Returns the new intensity and
    (soft-only line integral, veil) on every eighth pixel, for the window."""
    soft_line = cv2.remap(np.ascontiguousarray(soft.T), map_u, map_v, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    primary = np.exp(-np.clip(soft_line, 0.0, None))
    coarse = cv2.resize(primary, (64, 64), interpolation=cv2.INTER_AREA)
    low = cv2.GaussianBlur(coarse, (0, 0), spec.scatter_sigma_mm / mm_per_px * 64 / size)
    low = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    veil = (spec.scatter_ratio * float(np.median(primary)) / max(float(np.median(low)), 1e-6) * low).astype(np.float32)
    return (intensity + veil).astype(np.float32), (soft_line[::8, ::8], veil[::8, ::8])


def _marker(corner: int, size: int) -> np.ndarray:
    """A lead side marker ("R") near one corner of the detector, as a bool mask."""
    marker = np.zeros((size, size), np.uint8)
    scale = size / 512
    x = round(20 * scale) if corner % 2 == 0 else size - round(60 * scale)
    y = round(60 * scale) if corner < 2 else size - round(20 * scale)
    cv2.putText(marker, "R", (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.3 * scale, 255, max(1, round(3 * scale)))
    return marker > 0


def _field(collimation_mm: tuple[float, float, float, float], spacing_mm: float, size: int) -> np.ndarray:
    """The collimated (exposed) field: False in the top, bottom, left and right borders."""
    top, bottom, left, right = (round(c / spacing_mm) for c in collimation_mm)
    field = np.ones((size, size), bool)
    field[:top] = False
    field[size - bottom:] = False
    field[:, :left] = False
    field[:, size - right:] = False
    return field


def projected_masks(bits: np.ndarray, body: np.ndarray, map_u: np.ndarray, map_v: np.ndarray) -> dict[str, np.ndarray]:
    """Each group's mask and the body's on the detector: the (u, v) projections `bits` and
    `body` (bool: the ray crosses the patient) warped by the detector maps, linear interpolation
    + threshold for smooth outlines."""
    layers = {name: ((bits.T >> (gid - 1)) & 1).astype(np.float32) for name, gid in GROUP_IDS.items()}
    layers["body"] = body.T.astype(np.float32)
    return {name: cv2.remap(layer, map_u, map_v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0) >= 0.5
            for name, layer in layers.items()}


# --------------------------------------------------------------------------- DICOM


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_dataset(spec: PhantomSpec, rendering: Rendering, spacing_mm: float) -> Dataset:
    """The DX For Presentation object (PS3.3 A.26) of one phantom, with file meta."""
    seed, patient = str(spec.seed), spec.patient_id
    study_uid = derived_uid("osteo-node phantom", seed, patient, "study", str(spec.study_index))
    series_uid = derived_uid("osteo-node phantom", seed, patient, "series", str(spec.study_index))
    instance_uid = derived_uid("osteo-node phantom", seed, patient, "instance", str(spec.index))
    date = spec.study_date.strftime("%Y%m%d")
    time_of_day = f"{9 + spec.index % 8:02d}{(spec.index * 7) % 60:02d}00"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = derived_uid("osteo-node", "implementation")
    meta.ImplementationVersionName = "OSTEO_NODE_010"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = instance_uid
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time_of_day
    ds.AccessionNumber = f"PH{spec.patient_index:06d}{spec.study_index}"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "osteo-node phantom generator"
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST (synthetic phantom)"
    ds.SeriesDescription = f"Chest {spec.view} DRR phantom"
    ds.ManufacturerModelName = "osteo-train phantoms"
    ds.PatientName = f"PHANTOM^{spec.patient_index:06d}"
    ds.PatientID = patient
    ds.PatientBirthDate = spec.birth_date.strftime("%Y%m%d")
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "CHEST"
    ds.SoftwareVersions = "osteo-node 0.1.0"
    ds.ImagerPixelSpacing = [round(spacing_mm * MAGNIFICATION, 6)] * 2
    ds.PixelSpacing = [round(spacing_mm, 6)] * 2
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Estimated radiographic magnification factor applied"
    ds.EstimatedRadiographicMagnificationFactor = MAGNIFICATION
    ds.DistanceSourceToDetector = 1800
    ds.DistanceSourceToPatient = round(1800 / MAGNIFICATION, 1)
    ds.KVP = 120
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorID = "PHANTOM"
    ds.DetectorConfiguration = "AREA"
    ds.PositionerType = "NONE"
    ds.ViewPosition = "PA" if spec.view == "PA" else "LL"  # DICOM's left lateral
    ds.ViewCodeSequence = Sequence(
        [_code("399348003", "SCT", "postero-anterior") if spec.view == "PA"
         else _code("399352003", "SCT", "left lateral")]
    )
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.AcquisitionContextSequence = Sequence([])
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"] if spec.view == "PA" else ["P", "F"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{spec.study_index + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rendering.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = rendering.window_center
    ds.WindowWidth = rendering.window_width
    ds.WindowCenterWidthExplanation = "DRR phantom default"
    ds.PixelData = rendering.pixels.astype("<u2").tobytes()
    return ds


# --------------------------------------------------------------------------- files


def _write_one(job: tuple[PhantomSpec, Path, int, float]) -> dict[str, str]:
    """Render and write one phantom; return its manifest fields (without split)."""
    spec, out, size, spacing_mm = job
    rendering = render(spec, size, spacing_mm)
    ds = build_dataset(spec, rendering, spacing_mm)
    image_path = Path("images") / f"{spec.stem}.dcm"
    ds.save_as(out / image_path, enforce_file_format=True)
    row = {
        "file": image_path.as_posix(),
        "patient_id": spec.patient_id,
        "t_score": f"{spec.t_score:.2f}",
        "class": spec.label_class,
        "age": str(spec.age),
        "sex": spec.sex,
        "view": spec.view,
    }
    for name in MASK_NAMES:
        mask_path = Path("masks") / f"{spec.stem}_{name}.png"
        Image.fromarray(rendering.masks[name].astype(np.uint8) * 255).save(out / mask_path, optimize=False)
        row[f"mask_{name}"] = mask_path.as_posix()
    row["true_class"] = spec.true_class
    return row


def generate(out: Path, n: int, seed: int, options: GenerationOptions, workers: int = 1) -> Path:
    """Write `n` phantoms and `manifest.csv` into `out`; return the manifest path."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    specs, splits = draw_cohort(n, seed, options)
    jobs = [(spec, out, options.size, options.spacing_mm) for spec in specs]
    return write_cohort(out, jobs, _write_one, [splits[spec.patient_index] for spec in specs],
                        workers, "phantoms")


def write_cohort(out: Path, jobs: list[Any], write_one: Callable[[Any], dict[str, str]],
                 splits: list[str], workers: int, what: str) -> Path:
    """Write each job's image and masks with `write_one` (in `workers` forked processes), then
    `manifest.csv` with each row's split; the one writer of a cohort, for every rendering chain."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if workers == 1:
        rows = [write_one(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    for row, split in zip(rows, splits):
        row["split"] = split
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d %s to %s in %.1f s", len(rows), what, out, time.perf_counter() - started)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`osteo-train phantoms --n N --seed S --out DIR [options]`."""
    parser = argparse.ArgumentParser(prog="osteo-train phantoms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=512, help="detector pixels per side (default 512)")
    parser.add_argument("--pixel-spacing", type=float, default=None,
                        help=f"patient-plane mm per pixel (default {FIELD_OF_VIEW_MM:.0f} mm / size)")
    parser.add_argument("--label-noise", type=float, default=0.05,
                        help="fraction of images labelled with a neighbouring class (default 0.05)")
    parser.add_argument("--lateral-fraction", type=float, default=0.1, help="share of lateral views")
    parser.add_argument("--male-fraction", type=float, default=0.15, help="share of male patients")
    parser.add_argument("--repeat-fraction", type=float, default=0.05,
                        help="share of patients with a repeat study (same split)")
    parser.add_argument("--leak", choices=LEAKS, default="none",
                        help="control: the class shows in all soft tissue (soft-tissue) or only in soft tissue "
                             "that no bone overlies (off-bone); bone mineral does not change with the class")
    parser.add_argument("--no-bone-change", action="store_true",
                        help="bone mineral fixed: labels carry no image information (null control)")
    parser.add_argument("--bone-change-per-sd", default="exaggerated", metavar="EFFECT",
                        help=f"mineral change per T-score SD: exaggerated (default, {BONE_EFFECTS['exaggerated']}), "
                             f"realistic ({BONE_EFFECTS['realistic']}) or CORTICAL,TRABECULAR")
    parser.add_argument("--randomise", action="store_true",
                        help="broad domain randomisation of everything that carries no label (detector "
                             "response and processing, LUTs, exposure, window, soft tissue, noise, blur, pose, "
                             "field of view); labels and splits stay those of the same --seed without it")
    parser.add_argument("--randomise-physics", action="store_true",
                        help="randomised acquisition physics: beam energy, scatter (with or without a grid), "
                             "phosphor halo, gain non-uniformity, collimation, a lead marker, portrait detectors; "
                             "labels, splits and --randomise's draws stay those of the same options without it")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        per_sd = parse_bone_change(args.bone_change_per_sd)
    except ValueError as exc:
        parser.error(f"--bone-change-per-sd: {exc}")
    options = GenerationOptions(
        bone_change_per_sd=per_sd,
        randomise=args.randomise,
        randomise_physics=args.randomise_physics,
        size=args.size,
        pixel_spacing=args.pixel_spacing,
        label_noise=args.label_noise,
        lateral_fraction=args.lateral_fraction,
        male_fraction=args.male_fraction,
        repeat_fraction=args.repeat_fraction,
        leak=args.leak,
        bone_change=not args.no_bone_change,
    )
    logger.info("phantoms: n=%d seed=%d out=%s %s", args.n, args.seed, args.out, options)
    generate(args.out, args.n, args.seed, options, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
