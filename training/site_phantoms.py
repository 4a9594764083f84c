"""`osteo-train site-phantoms`: a second, independent rendering chain ("a simulated new site").

The default chain (training/phantoms.py) renders every image the same way: monochromatic 60 keV
attenuation, parallel rays, a DX chain (log, one unsharp mask, linear 12-bit map), and a bone
change per T-score SD exaggerated about twofold. A model that has only seen those images has
learnt that chain as much as it has learnt bone. This module renders the same shipped chest CT
(training/data/chest_ct) through a chain that shares nothing with it except the anatomy and the
label, to see what a model does at a hospital it has never seen:

- **Bone**: the realistic effect of `BONE_CHANGE_PER_SD`'s comment in phantoms.py,
  (cortical, trabecular) = `SITE_BONE_CHANGE_PER_SD` = (0.09, 0.16) per T-score SD, no trabecular
  striation. T-scores follow a screening population (normal around -1.2 SD, not class-balanced),
  and the manifest's T-score is the DXA *measurement* (true value + 0.15 SD precision error), so
  a few labels sit on the wrong side of a class boundary, as at a real site.
- **Projection**: a divergent (cone) beam from a point source at the room's source-image
  distance: each CT plane is magnified by SID / (source-to-plane distance), so the posterior ribs
  of an AP bedside film are smaller than the anterior ones, and the reverse on a PA. A
  polychromatic spectrum (a filtered Kramers spectrum at the exposure's kVp, energy-integrating
  detector) with separate energy dependence of soft tissue and bone mineral gives beam hardening;
  scatter (scatter-to-primary ratio per room: no grid at the bedside) adds a low-pass veil.
- **Rooms** (drawn per image): a bedside CR room (AP, SID 100-120 cm, 70-95 kVp, no grid, plate
  grain and scan-line noise, a two-component phosphor blur, logarithmic plate reader, multi-scale
  (Laplacian pyramid) contrast amplification, a sigmoid film-like LUT, 10-bit MONOCHROME1, a
  cassette field of 35 x 43 cm, collimation borders and a lead side marker) and a DR room (PA or
  lateral, SID 180 cm, 110-125 kVp, grid, gain non-uniformity, a gamma (power-law) response
  instead of a log, adaptive histogram equalisation (CLAHE), unsharp masking, 14-bit MONOCHROME2).
- **Body**: a subcutaneous fat shell whose path grows toward the tangent at the body's edge, soft
  tissue density, and a supine / erect breast model of its own; larger pose ranges (yaw, lordotic
  pitch, roll) and field positions.
- **Headers**: CR Image Storage (Modality CR) or DX For Presentation (Modality DX), with this
  chain's own Manufacturer, model names, institution and dates (2024-2025).

The manifest has the columns of phantoms.MANIFEST_COLUMNS (patient ids `SITE-nnnnnn`,
patient-level splits), so `osteo-train evaluate --manifest DIR/manifest.csv --split all` and
`osteo-train train` read it as they read the default chain's.

    osteo-train site-phantoms --n 400 --seed 0 --out runs/site
    osteo-train site-phantoms --n 400 --seed 0 --out runs/site-square --without portrait  # see WITHOUT
    python -c "from training.site_phantoms import generate_site; generate_site('runs/site', 400, 0)"
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from osteo_node.records import category_from_t_score
from osteo_node.uids import derived_uid

from .phantoms import (
    BODY_CHORD_MM,
    DX_FOR_PRESENTATION,
    MASK_NAMES,
    MU_WATER,
    SPLITS,
    Anatomy,
    load_anatomy,
    projected_masks,
    write_cohort,
)

logger = logging.getLogger(__name__)

#: Mineral change per T-score SD (cortical, trabecular): the realistic effect (about 10-16% per
#: SD), half the default chain's exaggerated (0.18, 0.30).
SITE_BONE_CHANGE_PER_SD: tuple[float, float] = (0.09, 0.16)
#: DXA precision error (SD of repeated measurements), in T-score units.
DXA_PRECISION_SD = 0.15
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
#: Parts of the chain that `--without` switches off, to find which of them a model fails on. The
#: draws stay the same (same patients, labels and nuisance values); only the named part changes.
WITHOUT: dict[str, str] = {
    "scatter": "no scatter (scatter-to-primary 0)",
    "noise": "no quantum noise",
    "spectrum": "a single 65 keV energy instead of the polychromatic spectrum",
    "cone": "parallel rays (a source 1 km away, so no magnification) instead of the divergent beam",
    "pose": "no yaw, pitch or roll",
    "body": "no fat shell and no breasts",
    "collimation": "no collimation borders",
    "halo": "CR: a 0.25 mm detector blur and no phosphor halo",
    "portrait": "CR: a 43 x 43 cm field instead of the 35 x 43 cm portrait cassette",
    "pyramid": "CR: no multi-scale contrast amplification",
    "lut": "CR: a linear display instead of the sigmoid film-like LUT",
    "clahe": "DR: no adaptive histogram equalisation",
    "unsharp": "DR: no unsharp masking",
}
ROOMS: tuple[str, ...] = ("CR", "DX")
MANUFACTURER = {"CR": "Simulated Site B Imaging", "DX": "Simulated Site B Imaging"}
MODEL_NAME = {"CR": "SiteB CR bedside reader", "DX": "SiteB DR wall stand"}
BASE_DATE = dt.date(2024, 3, 4)
#: Energy bins (keV) of the spectrum and the linear attenuation of water and of bone mineral's
#: excess over water (cortical bone, 1.92 g/cm3, minus water; NIST XCOM), relative to 60 keV.
ENERGIES_KEV = np.array([35.0, 45.0, 55.0, 65.0, 80.0, 100.0])
WATER_RELATIVE = np.array([1.44, 1.20, 1.05, 0.97, 0.89, 0.83])
MINERAL_RELATIVE = np.array([3.55, 2.02, 1.27, 0.87, 0.61, 0.47])


def bone_factors(t_score: float) -> tuple[float, float]:
    """(cortical, trabecular) mineral factors at the realistic effect (the CT's bone is T = 0)."""
    cortical, trabecular = SITE_BONE_CHANGE_PER_SD
    return max(0.3, 1.0 + cortical * t_score), max(0.2, 1.0 + trabecular * t_score)


def spectrum_weights(kvp: float) -> np.ndarray:
    """Energy-integrating detector weights of the bins for a tube at `kvp`.

    Kramers' bremsstrahlung (fluence ~ (kVp - E) / E), through ~3 mm Al of inherent + added
    filtration (photoelectric ~ E^-3), times the energy deposited (~E).
    """
    fluence = np.clip(kvp - ENERGIES_KEV, 0.0, None) / ENERGIES_KEV
    filtered = fluence * np.exp(-1.9 * (30.0 / ENERGIES_KEV) ** 3)
    weights = filtered * ENERGIES_KEV
    return weights / weights.sum()


@dataclass(frozen=True)
class SiteOptions:
    """Settings of one site cohort."""

    size: int = 512  # detector pixels along the image's long side
    cr_fraction: float = 0.6
    lateral_fraction: float = 0.05  # of the DR room's images
    male_fraction: float = 0.1
    repeat_fraction: float = 0.08
    without: frozenset[str] = frozenset()  # names of WITHOUT: parts of the chain switched off

    def __post_init__(self) -> None:
        if not 64 <= self.size <= 4096:
            raise ValueError(f"size must be in 64..4096, got {self.size!r}")
        unknown = sorted(set(self.without) - set(WITHOUT))
        if unknown:
            raise ValueError(f"without must name parts of the chain among {sorted(WITHOUT)}, got {unknown}")
        for name in ("cr_fraction", "lateral_fraction", "male_fraction", "repeat_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class SiteSpec:
    """Everything that defines one image of the site; drawn in order from the run's seed."""

    index: int
    patient_index: int
    study_index: int
    seed: int
    t_true: float
    t_measured: float  # the DXA result: what the manifest and the label carry
    sex: str
    birth_date: dt.date
    study_date: dt.date
    room: str  # CR or DX
    view: str  # AP, PA or LATERAL
    kvp: float
    sid_mm: float
    table_gap_mm: float  # body surface to detector
    scatter_ratio: float  # scatter-to-primary at the body's centre
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    zoom: float
    shift_u: float
    shift_v: float
    soft_density: float
    fat_shell_mm: float
    breast: tuple[float, float, float, float, float] | None  # radius, depth, offset, height, density
    photons: float
    blur_mm: float
    halo_mm: float  # CR: the phosphor's long-range tail
    halo_weight: float
    gain_nonuniformity: float
    response_gamma: float  # DX: power-law response; CR uses a log
    detail_gain: float  # CR: multi-scale amplification; DX: unsharp amount
    detail_sigma_mm: float
    clahe_clip: float
    lut_slope: float
    lut_shift: float
    collimation: tuple[float, float, float, float]  # mm from each edge: top, bottom, left, right
    marker_corner: int
    without: frozenset[str] = frozenset()  # SiteOptions.without

    @property
    def patient_id(self) -> str:
        return f"SITE-{self.patient_index:06d}"

    @property
    def label_class(self) -> str:
        return category_from_t_score(self.t_measured)

    @property
    def true_class(self) -> str:
        return category_from_t_score(self.t_true)

    @property
    def age(self) -> int:
        years = self.study_date.year - self.birth_date.year
        return years - int((self.study_date.month, self.study_date.day) < (self.birth_date.month, self.birth_date.day))

    @property
    def stem(self) -> str:
        return f"{self.index:06d}"

    @property
    def field_mm(self) -> tuple[float, float]:
        """(rows, cols) of the detector field in mm: a 35 x 43 cm cassette, or a 43 cm square."""
        return (430.0, 350.0) if self.room == "CR" and "portrait" not in self.without else (430.0, 430.0)


def draw_image(rng: np.random.Generator, options: SiteOptions, **fixed: object) -> SiteSpec:
    """Draw the room, exposure, body and processing of one image (none depends on the T-score)."""
    room = "CR" if rng.random() < options.cr_fraction else "DX"
    if room == "CR":
        view = "AP"
        kvp, sid, gap, spr = rng.uniform(70, 95), rng.uniform(1000, 1200), rng.uniform(20, 60), rng.uniform(0.6, 1.2)
        photons = float(np.exp(rng.uniform(np.log(6e3), np.log(4e4))))
        blur, halo, halo_weight = rng.uniform(0.35, 0.7), rng.uniform(2.0, 4.0), rng.uniform(0.1, 0.25)
        collimation = tuple(float(x) for x in rng.uniform(0, 30, 4))
    else:
        view = "LATERAL" if rng.random() < options.lateral_fraction else "PA"
        kvp, sid, gap, spr = rng.uniform(110, 125), 1800.0, rng.uniform(10, 30), rng.uniform(0.1, 0.3)
        photons = float(np.exp(rng.uniform(np.log(4e4), np.log(3e5))))
        blur, halo, halo_weight = rng.uniform(0.15, 0.4), 1.0, 0.0
        collimation = (0.0, 0.0, 0.0, 0.0)
    breast = None
    if fixed["sex"] == "F" and rng.random() < 0.85:
        supine = view == "AP"
        breast = (
            float(rng.uniform(50, 100)),
            float(rng.uniform(20, 70) * (0.6 if supine else 1.0)),  # supine breasts flatten
            float(rng.uniform(80, 120) if supine else rng.uniform(55, 90)),  # and fall sideways
            float(rng.uniform(0.05, 0.35)),
            float(rng.uniform(0.85, 1.05)),  # fatty to dense, relative to water
        )
    spec = SiteSpec(
        **fixed,  # type: ignore[arg-type]
        room=room,
        view=view,
        kvp=float(kvp),
        sid_mm=float(sid),
        table_gap_mm=float(gap),
        scatter_ratio=float(spr),
        yaw_deg=float(rng.uniform(-6, 6)),
        pitch_deg=float(rng.uniform(-4, 10) if view == "AP" else rng.uniform(-4, 4)),
        roll_deg=float(rng.uniform(-5, 5)),
        zoom=float(rng.uniform(1.2, 1.35) if room == "CR" else rng.uniform(1.3, 1.45)),  # field inside the CT
        shift_u=float(rng.uniform(0.2, 0.8)),
        shift_v=float(rng.uniform(0.0, 1.0)),
        soft_density=float(rng.uniform(0.9, 1.1)),
        fat_shell_mm=float(rng.gamma(2.0, 8.0)),
        breast=breast,
        photons=photons,
        blur_mm=float(blur),
        halo_mm=float(halo),
        halo_weight=float(halo_weight),
        gain_nonuniformity=float(rng.uniform(0.0, 0.03)),
        response_gamma=float(rng.uniform(0.35, 0.6)),
        detail_gain=float(rng.uniform(0.6, 1.4) if room == "CR" else rng.uniform(0.5, 1.2)),
        detail_sigma_mm=float(rng.uniform(2.0, 6.0)),
        clahe_clip=float(rng.uniform(1.5, 3.0)),
        lut_slope=float(rng.uniform(5.0, 8.0)),
        lut_shift=float(rng.uniform(-0.1, 0.1)),
        collimation=collimation,  # type: ignore[arg-type]
        marker_corner=int(rng.integers(4)),
        without=frozenset(options.without),
    )
    return _switch_off(spec)


def _switch_off(spec: SiteSpec) -> SiteSpec:
    """The spec with the draws of the parts in `spec.without` replaced (render() does the rest)."""
    changes: dict[str, object] = {}
    if "scatter" in spec.without:
        changes["scatter_ratio"] = 0.0
    if "noise" in spec.without:
        changes["photons"] = math.inf
    if "cone" in spec.without:
        changes["sid_mm"] = 1e6
    if "pose" in spec.without:
        changes.update(yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0)
    if "body" in spec.without:
        changes.update(fat_shell_mm=0.0, breast=None)
    if "collimation" in spec.without:
        changes["collimation"] = (0.0, 0.0, 0.0, 0.0)
    if "halo" in spec.without and spec.room == "CR":
        changes.update(blur_mm=0.25, halo_weight=0.0)
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def draw_cohort(n: int, seed: int, options: SiteOptions) -> tuple[list[SiteSpec], dict[int, str]]:
    """`n` image specs of a screening population and the split of each patient index."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    rng = np.random.default_rng([seed, 0x517E])
    specs: list[SiteSpec] = []
    patient = 0
    while len(specs) < n:
        sex = "M" if rng.random() < options.male_fraction else "F"
        age = float(np.clip(rng.normal(71, 10), 45, 98))
        # T-scores fall with age in a screening population; about 45% normal, 20% osteoporosis.
        t_true = float(np.clip(rng.normal(-1.2 - 0.02 * (age - 71), 1.35), -4.8, 2.8))
        study_date = BASE_DATE + dt.timedelta(days=int(rng.integers(0, 640)))
        birth_date = study_date - dt.timedelta(days=int(age * 365.25))
        studies = 2 if rng.random() < options.repeat_fraction and len(specs) + 2 <= n else 1
        t_measured = round(t_true + float(rng.normal(0, DXA_PRECISION_SD)), 1)
        for study in range(studies):
            if study:
                study_date += dt.timedelta(days=int(rng.integers(14, 300)))
            specs.append(draw_image(
                rng, options, index=len(specs), patient_index=patient, study_index=study, seed=seed,
                t_true=round(t_true, 2), t_measured=t_measured, sex=sex, birth_date=birth_date,
                study_date=study_date,
            ))
        patient += 1
    order = rng.permutation(patient)
    splits: dict[int, str] = {}
    start = 0.0
    for name, share in SPLITS:
        for position in range(round(start * patient), round((start + share) * patient)):
            splits[int(order[position])] = name
        start += share
    for p in range(patient):
        splits.setdefault(p, SPLITS[-1][0])
    return specs, splits


# --------------------------------------------------------------------------- projection


def cone_project(planes: np.ndarray, spec: SiteSpec, step_mm: float, du_mm: float, dv_mm: float,
                 *, nearest: bool = False) -> np.ndarray:
    """Divergent-beam projection of `planes` (ray axis first) onto the (u, v) grid at the isocentre.

    Plane j sits at distance d_j from the detector (the first plane is posterior; an AP beam has
    its detector posterior, a PA or lateral beam anterior / on the left); its magnification
    relative to the isocentre is (SID - d_iso) / (SID - d_j). The beam's tilt (yaw, pitch) shifts
    each plane by its depth times the tangent. `nearest` ORs bit planes instead of summing.
    """
    n, nu, nv = planes.shape
    depth = np.arange(n) * step_mm
    to_detector = depth if spec.view == "AP" else depth[::-1]
    distances = to_detector + spec.table_gap_mm
    iso = spec.table_gap_mm + n * step_mm / 2
    tan_u, tan_v = math.tan(math.radians(spec.yaw_deg)), math.tan(math.radians(spec.pitch_deg))
    cu, cv = (nu - 1) / 2, (nv - 1) / 2
    out = np.zeros((nu, nv), np.uint8 if nearest else np.float32)
    for j in range(n):
        scale = (spec.sid_mm - distances[j]) / (spec.sid_mm - iso)  # grid position -> plane position
        du = (distances[j] - iso) * tan_u / du_mm
        dv = (distances[j] - iso) * tan_v / dv_mm
        # Inverse map: out[u, v] = plane[cu + scale (u - cu) + du, cv + scale (v - cv) + dv];
        # cv2 indexes (x = column = v, y = row = u).
        matrix = np.array([[scale, 0.0, cv * (1 - scale) + dv], [0.0, scale, cu * (1 - scale) + du]], np.float32)
        flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        warped = cv2.warpAffine(planes[j], matrix, (nv, nu), flags=flags, borderMode=cv2.BORDER_CONSTANT)
        if nearest:
            out |= warped
        else:
            out += warped
    return out if nearest else out * step_mm


def _body_paths(spec: SiteSpec, anatomy: Anatomy) -> np.ndarray:
    """Water-equivalent path (mm) of the fat shell and the breasts on the projection grid (u, v)."""
    nu, nv = anatomy.body.shape
    covered = anatomy.body > BODY_CHORD_MM
    u = np.arange(nu, dtype=np.float32)
    path = np.zeros((nu, nv), np.float32)
    for k in range(nv):
        columns = np.nonzero(covered[:, k])[0]
        if columns.size < 4:
            continue
        lo, hi = columns[0], columns[-1]
        half = (hi - lo) / 2 + spec.fat_shell_mm / anatomy.du_mm
        x = np.clip(np.abs(u - (lo + hi) / 2) / max(half, 1.0), 0.0, 0.995)
        # A shell of thickness t around an ellipse: the chord through it grows like 1/sqrt(1-x^2).
        path[:, k] = np.where(np.abs(u - (lo + hi) / 2) <= half, 2 * spec.fat_shell_mm / np.sqrt(1 - x ** 2), 0.0)
    path = (np.minimum(path, 6 * spec.fat_shell_mm) * 0.92).astype(np.float32)  # fat attenuates ~8% less than water
    if spec.breast is not None and spec.view != "LATERAL":
        radius, depth, offset, height, density = spec.breast
        uu = (u[:, None] + 0.5) * anatomy.du_mm
        vv = (np.arange(nv, dtype=np.float32)[None, :] + 0.5) * anatomy.dv_mm
        lung_low, lung_high = anatomy.lung_v_range
        centre_v = lung_low + height * (lung_high - lung_low)
        for side in (-1.0, 1.0):
            r2 = (((uu - (nu * anatomy.du_mm / 2 + side * offset)) / radius) ** 2
                  + ((vv - centre_v) / (0.9 * radius)) ** 2)
            path += density * depth * np.clip(1.0 - r2, 0.0, None) ** 0.7
    return path


def projections(spec: SiteSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(soft path in 1/mm-at-60-keV units, bone mineral path, bits, body) on the grid (u, v); body
    is where the ray crosses more than BODY_CHORD_MM of water-equivalent tissue."""
    anatomy = load_anatomy("LATERAL" if spec.view == "LATERAL" else "PA")
    args = (spec, anatomy.step_mm, anatomy.du_mm, anatomy.dv_mm)
    soft = cone_project(anatomy.soft, *args)
    cortical = cone_project(anatomy.cortical, *args)
    trabecular = cone_project(anatomy.trabecular, *args)
    bits = cone_project(anatomy.bits, *args, nearest=True)
    f_cortical, f_trabecular = bone_factors(spec.t_true)
    soft_total = spec.soft_density * soft + 0.02 * _body_paths(spec, anatomy)
    return soft_total, f_cortical * cortical + f_trabecular * trabecular, bits, soft > BODY_CHORD_MM * MU_WATER


# --------------------------------------------------------------------------- detector


@dataclass(frozen=True, eq=False)
class SiteRendering:
    pixels: np.ndarray  # uint16 rows x cols
    masks: dict[str, np.ndarray]
    bits_stored: int
    photometric: str
    window_center: float
    window_width: float


def _detector_maps(spec: SiteSpec, nu: int, nv: int, du: float, dv: float,
                   rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps from detector pixels (rows, cols) to (u, v) indices of the projection grid."""
    field_rows = spec.field_mm[0]
    magnification = spec.sid_mm / (spec.sid_mm - spec.table_gap_mm - 150.0)  # at the isocentre
    mm = field_rows / rows / magnification / spec.zoom  # isocentre mm per detector pixel
    extent_u, extent_v = nu * du, nv * dv
    centre_u = extent_u / 2 + (spec.shift_u - 0.5) * max(extent_u - cols * mm, 40.0)
    centre_v = extent_v - rows * mm / 2 + 30.0 - spec.shift_v * max(extent_v - rows * mm + 30.0, 20.0)
    x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * mm
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * mm
    px, py = np.meshgrid(x, y)
    cos, sin = math.cos(math.radians(spec.roll_deg)), math.sin(math.radians(spec.roll_deg))
    ru, rv = cos * px - sin * py, sin * px + cos * py
    # PA and AP both display the patient's right on the viewer's left; lateral: anterior left.
    u_mm = centre_u + (ru if spec.view != "LATERAL" else -ru)
    v_mm = centre_v - rv
    return (u_mm / du - 0.5).astype(np.float32), (v_mm / dv - 0.5).astype(np.float32)


def _pyramid_enhance(image: np.ndarray, gain: float, levels: int = 4) -> np.ndarray:
    """Multi-scale contrast amplification (Laplacian pyramid, MUSICA-like): detail coefficients
    are boosted by a power law that lifts faint detail more than strong edges."""
    gaussians = [image]
    for _ in range(levels):
        gaussians.append(cv2.pyrDown(gaussians[-1]))
    out = gaussians[-1]
    for level in range(levels - 1, -1, -1):
        up = cv2.pyrUp(out, dstsize=(gaussians[level].shape[1], gaussians[level].shape[0]))
        size = (gaussians[level].shape[1], gaussians[level].shape[0])
        detail = gaussians[level] - cv2.pyrUp(gaussians[level + 1], dstsize=size)
        scale = float(np.percentile(np.abs(detail), 99)) + 1e-6
        boosted = scale * np.sign(detail) * (np.abs(detail) / scale) ** 0.7
        out = up + (1.0 + gain * (level >= 1)) * boosted
    return out


def render(spec: SiteSpec, size: int = 512) -> SiteRendering:
    """Render one site image: cone-beam polychromatic projection, room detector and processing."""
    anatomy = load_anatomy("LATERAL" if spec.view == "LATERAL" else "PA")
    soft, mineral, bits, body = projections(spec)
    nu, nv = soft.shape
    field_rows, field_cols = spec.field_mm
    rows, cols = size, round(size * field_cols / field_rows)
    map_u, map_v = _detector_maps(spec, nu, nv, anatomy.du_mm, anatomy.dv_mm, rows, cols)
    soft_d = cv2.remap(np.ascontiguousarray(soft.T), map_u, map_v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT)
    mineral_d = cv2.remap(np.ascontiguousarray(mineral.T), map_u, map_v, cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT)
    soft_d, mineral_d = np.clip(soft_d, 0, None), np.clip(mineral_d, 0, None)

    # Polychromatic primary: each energy bin attenuated by soft tissue and mineral separately.
    weights = spectrum_weights(spec.kvp)
    if "spectrum" in spec.without:
        weights = (ENERGIES_KEV == 65.0).astype(np.float64)
    primary = np.zeros_like(soft_d)
    for w, water, mineral_rel in zip(weights, WATER_RELATIVE, MINERAL_RELATIVE):
        if w > 0:
            primary += w * np.exp(-(water * soft_d + mineral_rel * mineral_d))
    rng = np.random.default_rng([spec.seed, spec.index, 0x517E])
    mm_px = field_rows / rows
    # Lead side marker ("R" on the patient's right, the viewer's left), in the beam.
    corner_r = 18 + (rows - 60) * (spec.marker_corner // 2)
    corner_c = 12 if spec.marker_corner % 2 == 0 else cols // 2 - 50
    marker = np.zeros((rows, cols), np.uint8)
    cv2.putText(marker, "R", (corner_c, corner_r + 30), cv2.FONT_HERSHEY_SIMPLEX, rows / 512, 255, 3)
    primary = np.where(marker > 0, primary * 0.02, primary).astype(np.float32)
    scatter = cv2.GaussianBlur(primary, (0, 0), 60.0 / mm_px) * spec.scatter_ratio * float(np.median(primary))
    scatter /= max(float(np.median(cv2.GaussianBlur(primary, (0, 0), 60.0 / mm_px))), 1e-6)
    intensity = primary + scatter
    # Quantum noise, then the detector's blur (and a CR phosphor's long-range halo).
    quantum = rng.standard_normal(intensity.shape, dtype=np.float32)
    intensity = intensity + quantum * np.sqrt(np.clip(intensity, 1e-6, None) / spec.photons)
    blurred = cv2.GaussianBlur(intensity, (0, 0), spec.blur_mm / mm_px)
    if spec.halo_weight:
        halo = cv2.GaussianBlur(intensity, (0, 0), spec.halo_mm / mm_px)
        blurred = (1 - spec.halo_weight) * blurred + spec.halo_weight * halo
    pattern = rng.standard_normal((rows, cols)).astype(np.float32)
    gain = 1.0 + spec.gain_nonuniformity * cv2.GaussianBlur(pattern, (0, 0), 40)
    signal = np.clip(blurred * gain, 1e-5, None)

    field = np.ones((rows, cols), bool)
    top, bottom, left, right = (round(c / mm_px) for c in spec.collimation)
    field[:top] = field[rows - bottom:] = False
    field[:, :left] = False
    field[:, cols - right:] = False

    if spec.room == "CR":
        # Plate grain (fixed pattern per plate) and scan-line jitter; log amplifier of the reader.
        grain = 1.0 + 0.01 * cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), 0.8)
        lines = 1.0 + 0.004 * rng.standard_normal((rows, 1)).astype(np.float32)
        value = np.log(signal * grain * lines)
        inside = value[field]
        lo, hi = np.percentile(inside, [1, 99.5])
        value = (value - lo) / max(hi - lo, 1e-3)
        value = value.astype(np.float32)
        if "pyramid" not in spec.without:
            value = _pyramid_enhance(value, spec.detail_gain)
        # Sigmoid film-like LUT; MONOCHROME1 (high values dark): attenuation shows bright.
        if "lut" in spec.without:
            display = np.clip(value, 0.0, 1.0)
        else:
            display = 1.0 / (1.0 + np.exp(-spec.lut_slope * (value - 0.5 - spec.lut_shift)))
        display[~field] = 0.0  # unexposed plate outside the collimation: white in MONOCHROME1
        bits_stored, photometric = 10, "MONOCHROME1"
        pixels = np.clip(np.rint(display * 1023), 0, 1023).astype(np.uint16)
    else:
        # Gamma (power-law) response of the DR detector instead of a log, inverted so that
        # attenuation is bright (MONOCHROME2), then CLAHE and an unsharp mask.
        response = signal ** spec.response_gamma
        value = 1.0 - response / max(float(np.percentile(response, 99.8)), 1e-6)
        value = np.clip(value, 0.0, 1.0)
        if "clahe" in spec.without:
            equalised = value.astype(np.float32)
        else:
            clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(8, 8))
            scaled = np.clip(np.rint(value * 65535), 0, 65535).astype(np.uint16)
            equalised = clahe.apply(scaled).astype(np.float32) / 65535
        if "unsharp" in spec.without:
            sharpened = equalised
        else:
            smooth = cv2.GaussianBlur(equalised, (0, 0), spec.detail_sigma_mm / mm_px)
            sharpened = equalised + spec.detail_gain * (equalised - smooth)
        bits_stored, photometric = 14, "MONOCHROME2"
        sharpened += rng.standard_normal(sharpened.shape).astype(np.float32) * 0.002
        pixels = np.clip(np.rint(sharpened * 16383), 0, 16383).astype(np.uint16)
    top_value = (1 << bits_stored) - 1
    masks = {name: mask & field for name, mask in projected_masks(bits, body, map_u, map_v).items()}
    centre = top_value / 2 * (1 + 0.1 * spec.lut_shift)
    return SiteRendering(pixels, masks, bits_stored, photometric, round(centre, 1), float(top_value))


# --------------------------------------------------------------------------- DICOM


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def build_dataset(spec: SiteSpec, rendering: SiteRendering, size: int) -> Dataset:
    """CR Image Storage (PS3.3 A.2) for the bedside room, DX For Presentation (A.26) for the DR room."""
    seed, patient = str(spec.seed), spec.patient_id
    study_uid = derived_uid("osteo-node site phantom", seed, patient, "study", str(spec.study_index))
    series_uid = derived_uid("osteo-node site phantom", seed, patient, "series", str(spec.study_index))
    instance_uid = derived_uid("osteo-node site phantom", seed, patient, "instance", str(spec.index))
    sop_class = UID(CR_IMAGE_STORAGE) if spec.room == "CR" else UID(DX_FOR_PRESENTATION)
    date = spec.study_date.strftime("%Y%m%d")
    time_of_day = f"{(spec.index * 5) % 24:02d}{(spec.index * 13) % 60:02d}{(spec.index * 29) % 60:02d}"
    rows, cols = rendering.pixels.shape
    imager_spacing = round(spec.field_mm[0] / rows, 6)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = derived_uid("osteo-node", "implementation")
    meta.ImplementationVersionName = "OSTEO_NODE_010"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if spec.room == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time_of_day
    ds.AccessionNumber = f"SB{spec.patient_index:07d}{spec.study_index}"
    ds.Modality = spec.room
    ds.Manufacturer = MANUFACTURER[spec.room]
    ds.ManufacturerModelName = MODEL_NAME[spec.room]
    ds.InstitutionName = "SIMULATED SITE B"
    ds.StationName = "WARD4-PORTABLE" if spec.room == "CR" else "XR-ROOM2"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST 1 VIEW" if spec.room == "CR" else "XR CHEST"
    ds.SeriesDescription = f"CHEST {spec.view}"
    ds.PatientName = f"SITEB^{spec.patient_index:06d}"
    ds.PatientID = patient
    ds.IssuerOfPatientID = "SITEB"
    ds.PatientBirthDate = spec.birth_date.strftime("%Y%m%d")
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SoftwareVersions = "site-phantoms 1.0"
    ds.DeviceSerialNumber = "SB-0001" if spec.room == "CR" else "SB-0002"
    ds.KVP = round(spec.kvp, 1)
    ds.DistanceSourceToDetector = round(spec.sid_mm, 1)
    ds.ImagerPixelSpacing = [imager_spacing, imager_spacing]
    ds.ViewPosition = {"AP": "AP", "PA": "PA", "LATERAL": "LL"}[spec.view]
    ds.PatientOrientation = ["P", "F"] if spec.view == "LATERAL" else ["L", "F"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{spec.study_index + 1}"
    ds.SeriesNumber = 1 + spec.study_index
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = rendering.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = rendering.bits_stored
    ds.HighBit = rendering.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = rendering.window_center
    ds.WindowWidth = rendering.window_width
    ds.BurnedInAnnotation = "NO"
    if spec.room == "CR":
        ds.PlateType = "ST-VI"
        ds.PhosphorType = "BaFBr:Eu"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    else:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.DetectorID = "SB-DR-1"
        ds.PositionerType = "COLUMN"
        ds.DistanceSourceToPatient = round(spec.sid_mm - spec.table_gap_mm - 150.0, 1)
        ds.ViewCodeSequence = Sequence(
            [_code("399352003", "SCT", "left lateral") if spec.view == "LATERAL"
             else _code("399348003", "SCT", "postero-anterior")]
        )
        ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
        ds.AcquisitionContextSequence = Sequence([])
        ds.ImageLaterality = "U"
        ds.LossyImageCompression = "00"
        ds.QualityControlImage = "NO"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = rendering.pixels.astype("<u2").tobytes()
    return ds


# --------------------------------------------------------------------------- files


def _write_one(job: tuple[SiteSpec, Path, int]) -> dict[str, str]:
    spec, out, size = job
    rendering = render(spec, size)
    ds = build_dataset(spec, rendering, size)
    image_path = Path("images") / f"{spec.stem}.dcm"
    ds.save_as(out / image_path, enforce_file_format=True)
    row = {
        "file": image_path.as_posix(),
        "patient_id": spec.patient_id,
        "t_score": f"{spec.t_measured:.2f}",
        "class": spec.label_class,
        "age": str(spec.age),
        "sex": spec.sex,
        "view": "LATERAL" if spec.view == "LATERAL" else spec.view,
    }
    for name in MASK_NAMES:
        mask_path = Path("masks") / f"{spec.stem}_{name}.png"
        Image.fromarray(rendering.masks[name].astype(np.uint8) * 255).save(out / mask_path, optimize=False)
        row[f"mask_{name}"] = mask_path.as_posix()
    row["true_class"] = spec.true_class
    return row


def generate_site(out: str | Path, n: int, seed: int = 0, options: SiteOptions | None = None,
                  workers: int = 1) -> Path:
    """Write `n` site images and `manifest.csv` into `out`; return the manifest path.

    The function that other code (retraining with a held-out chain, the end-to-end test) calls.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    out = Path(out)
    options = options or SiteOptions()
    specs, splits = draw_cohort(n, seed, options)
    jobs = [(spec, out, options.size) for spec in specs]
    return write_cohort(out, jobs, _write_one, [splits[spec.patient_index] for spec in specs],
                        workers, "site images")


def main(argv: list[str] | None = None) -> int:
    """`osteo-train site-phantoms --n N --seed S --out DIR [options]`."""
    parser = argparse.ArgumentParser(prog="osteo-train site-phantoms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=512, help="detector pixels along the long side (default 512)")
    parser.add_argument("--cr-fraction", type=float, default=0.6, help="share of bedside CR images (default 0.6)")
    parser.add_argument("--lateral-fraction", type=float, default=0.05, help="share of lateral views in the DR room")
    parser.add_argument("--male-fraction", type=float, default=0.1, help="share of male patients")
    parser.add_argument("--repeat-fraction", type=float, default=0.08, help="share of patients with a repeat study")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--without", action="append", default=[], choices=sorted(WITHOUT), metavar="PART",
                        help="switch one part of the chain off, keeping every draw (repeat it): "
                        + "; ".join(f"{name}: {what}" for name, what in WITHOUT.items()))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = SiteOptions(size=args.size, cr_fraction=args.cr_fraction, lateral_fraction=args.lateral_fraction,
                              male_fraction=args.male_fraction, repeat_fraction=args.repeat_fraction,
                              without=frozenset(args.without))
    except ValueError as exc:
        parser.error(str(exc))
    logger.info("site-phantoms: n=%d seed=%d out=%s %s", args.n, args.seed, args.out, options)
    generate_site(args.out, args.n, args.seed, options, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
