"""Where does saliency fall relative to bone? Pure numpy functions on one saliency map and its masks.

Conventions:

- `saliency`: a 2-D float map with values >= 0 (e.g. `Heatmap.values` in [0, 1] on the display
  grid); `mask`: a boolean 2-D array of the same shape (True = the structure).
- Thresholding (`ThresholdRule`): the salient region is either the top `top_fraction` of pixels
  (default: the top 20 %, i.e. the k = ceil(0.2 * N) highest pixels, all pixels tied with the
  k-th highest value included) or every pixel at or above an `absolute` value. Pixels with zero
  saliency are never salient, so an all-zero map has an empty salient region.
- `iou_bone`: |salient AND mask| / |salient OR mask| (NaN when both are empty).
- `bone_mass_fraction`: sum(saliency inside mask) / sum(saliency): the share of saliency mass on
  the structure, independent of any threshold (NaN for an all-zero map).
- Chance baselines: a map that ignores anatomy puts on average `area_fraction(mask)` of its mass
  inside the mask, and a salient region of area fraction q drawn independently of a mask of area
  fraction a has expected IoU q a / (q + a - q a) (`chance_iou`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: Structures whose union is "bone" (all phantom bone masks; sternum has no mask of its own).
BONE_STRUCTURES: tuple[str, ...] = ("ribs", "clavicles", "spine", "scapulae", "humeri")


@dataclass(frozen=True)
class ThresholdRule:
    """How a saliency map becomes a salient region: top fraction of pixels, or an absolute cut.

    Exactly one of `top_fraction` (in (0, 1]; default 0.2 = top 20 %) and `absolute` (>= 0) is
    in effect: giving `absolute` switches the rule to "saliency >= absolute".
    """

    top_fraction: float | None = 0.2
    absolute: float | None = None

    def __post_init__(self) -> None:
        if self.absolute is not None:
            if not (math.isfinite(self.absolute) and self.absolute >= 0):
                raise ValueError(f"ThresholdRule.absolute must be a finite value >= 0, got {self.absolute!r}")
            object.__setattr__(self, "top_fraction", None)
        elif self.top_fraction is None or not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"ThresholdRule.top_fraction must be in (0, 1], got {self.top_fraction!r}")

    def describe(self) -> str:
        """One line for reports, e.g. 'top 20% of pixels'."""
        if self.absolute is not None:
            return f"saliency >= {self.absolute:g}"
        assert self.top_fraction is not None
        return f"top {100 * self.top_fraction:g}% of pixels"


DEFAULT_RULE = ThresholdRule()


def _check_saliency(saliency: np.ndarray) -> np.ndarray:
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"saliency must be a non-empty 2-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("saliency must be finite")
    if values.min() < 0:
        raise ValueError(f"saliency must be >= 0, got a minimum of {values.min()!r}")
    return values


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from saliency shape {shape}")
    return m.astype(bool)


def salient_region(saliency: np.ndarray, rule: ThresholdRule = DEFAULT_RULE) -> np.ndarray:
    """Boolean map of the salient pixels under `rule` (see the module docstring for ties/zeros)."""
    values = _check_saliency(saliency)
    if rule.absolute is not None:
        cut = rule.absolute
    else:
        assert rule.top_fraction is not None
        k = max(1, math.ceil(rule.top_fraction * values.size - 1e-9))
        cut = float(np.partition(values.ravel(), values.size - k)[values.size - k])  # k-th highest
    return (values >= cut) & (values > 0)


def iou(region: np.ndarray, mask: np.ndarray) -> float:
    """|region AND mask| / |region OR mask|; NaN when both are empty."""
    a = np.asarray(region, dtype=bool)
    b = _check_mask(mask, a.shape)
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b) / union) if union else float("nan")


def iou_bone(saliency: np.ndarray, bone_mask: np.ndarray, rule: ThresholdRule = DEFAULT_RULE) -> float:
    """IoU between the salient region (under `rule`) and the bone mask."""
    return iou(salient_region(saliency, rule), bone_mask)


def bone_mass_fraction(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the saliency mass inside `mask` (in [0, 1]; NaN for an all-zero map)."""
    values = _check_saliency(saliency)
    m = _check_mask(mask, values.shape)
    total = float(values.sum())
    return float(values[m].sum() / total) if total > 0 else float("nan")


def area_fraction(mask: np.ndarray) -> float:
    """Share of pixels in `mask`: the bone_mass_fraction expected from a map that ignores anatomy."""
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        raise ValueError("area_fraction of an empty mask array")
    return float(np.count_nonzero(m) / m.size)


def chance_iou(mask_area_fraction: float, region_area_fraction: float) -> float:
    """Expected IoU of a region of area fraction q placed independently of a mask of fraction a.

    E|R AND M| = q a N and E|R OR M| = (q + a - q a) N, so IoU ~ q a / (q + a - q a).
    """
    a, q = float(mask_area_fraction), float(region_area_fraction)
    for name, v in (("mask_area_fraction", a), ("region_area_fraction", q)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    denominator = q + a - q * a
    return q * a / denominator if denominator > 0 else float("nan")


def union_mask(masks: Mapping[str, np.ndarray], names: Iterable[str] = BONE_STRUCTURES) -> np.ndarray:
    """Union of the named masks (all must be present and of one shape)."""
    names = list(names)
    missing = [n for n in names if n not in masks]
    if missing:
        raise KeyError(f"masks lack structures {missing} (have {sorted(masks)})")
    if not names:
        raise ValueError("union_mask needs at least one structure name")
    out = np.zeros(np.asarray(masks[names[0]]).shape, dtype=bool)
    for name in names:
        out |= _check_mask(masks[name], out.shape)
    return out


def per_structure_mass_fraction(saliency: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """bone_mass_fraction for each structure's mask."""
    return {name: bone_mass_fraction(saliency, m) for name, m in masks.items()}


def per_structure_iou(saliency: np.ndarray, masks: Mapping[str, np.ndarray],
                      rule: ThresholdRule = DEFAULT_RULE) -> dict[str, float]:
    """iou_bone for each structure's mask (one salient region shared by all)."""
    region = salient_region(saliency, rule)
    return {name: iou(region, m) for name, m in masks.items()}


def per_structure_area_fraction(masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """area_fraction for each structure's mask (the chance baselines of the mass fractions)."""
    return {name: area_fraction(m) for name, m in masks.items()}


__all__ = [
    "BONE_STRUCTURES",
    "DEFAULT_RULE",
    "ThresholdRule",
    "area_fraction",
    "bone_mass_fraction",
    "chance_iou",
    "iou",
    "iou_bone",
    "per_structure_area_fraction",
    "per_structure_iou",
    "per_structure_mass_fraction",
    "salient_region",
    "union_mask",
]
