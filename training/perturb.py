"""Image perturbations for controls and explainability (e.g. Delta_bone: the prediction change when
bone is removed from a radiograph)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: Gaussian scales (pixels at full resolution) of the fill, finest first.
FILL_SIGMAS: tuple[float, ...] = (3.0, 12.0, 48.0)
#: Relative weight of valid neighbours below which a finer scale hands over to a coarser one.
MIN_SUPPORT = 0.3


def _normalized_blur(values: np.ndarray, weights: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian normalized convolution: (weighted local mean, local weight), at reduced size for large sigma."""
    factor = max(1, int(sigma // 6))
    rows, cols = values.shape
    if factor > 1:
        size = (max(1, cols // factor), max(1, rows // factor))
        values = cv2.resize(values * weights, size, interpolation=cv2.INTER_AREA)
        weights = cv2.resize(weights, size, interpolation=cv2.INTER_AREA)
    else:
        values = values * weights
    local_sigma = sigma / factor
    numerator = cv2.GaussianBlur(values, (0, 0), local_sigma, borderType=cv2.BORDER_REFLECT)
    support = cv2.GaussianBlur(weights, (0, 0), local_sigma, borderType=cv2.BORDER_REFLECT)
    mean = numerator / np.maximum(support, 1e-6)
    if factor > 1:
        mean = cv2.resize(mean, (cols, rows), interpolation=cv2.INTER_LINEAR)
        support = cv2.resize(support, (cols, rows), interpolation=cv2.INTER_LINEAR)
    return mean, support


def inpaint_bone(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` with the `mask` pixels replaced by plausible surrounding tissue.

    The fill is a multi-scale Gaussian-weighted mean of the unmasked neighbourhood (coarser scales
    where no neighbour is near) plus noise matched to the fine-scale texture of the pixels around
    the mask. Unmasked pixels are returned unchanged; the result is float32 of the same shape.
    """
    if image.ndim != 2:
        raise ValueError(f"inpaint_bone: image must be 2-D, got shape {image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"inpaint_bone: mask shape {mask.shape} differs from image shape {image.shape}")
    values = np.asarray(image, dtype=np.float32)
    hole = np.asarray(mask, dtype=bool)
    if not hole.any():
        return values.copy()
    if hole.all():
        raise ValueError("inpaint_bone: mask covers the whole image; nothing to fill from")
    weights = (~hole).astype(np.float32)

    fill: np.ndarray | None = None
    for sigma in reversed(FILL_SIGMAS):  # coarse to fine
        mean, support = _normalized_blur(values, weights, sigma)
        if fill is None:
            fill = mean
            continue
        trust = np.clip(support / MIN_SUPPORT, 0.0, 1.0)
        fill = trust * mean + (1.0 - trust) * fill
    assert fill is not None

    # Matched noise: the fine-scale residual's spread in a ring around the mask.
    detail = values - _normalized_blur(values, weights, 1.5)[0]
    ring = cv2.dilate(hole.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~hole
    spread = float(detail[ring].std()) if ring.any() else float(detail[~hole].std())
    noise = cv2.GaussianBlur(rng.standard_normal(values.shape).astype(np.float32), (0, 0), 0.7)
    noise *= spread / max(float(noise.std()), 1e-6)

    out = values.copy()
    out[hole] = fill[hole] + noise[hole]
    return out


#: Pixels kept clear between the (grown) bone mask and the off-bone region: the bone's immediate
#: surroundings, against which its contrast is read, stay intact (4 px of the stored 512 px phantom
#: is 2.6 mm, about the ~3 mm clearance the phantoms' own off-bone leak keeps from bone edges).
OFF_BONE_MARGIN = 4


def off_bone_region(bone: np.ndarray, rng: np.random.Generator, margin: int = OFF_BONE_MARGIN, *,
                    within: np.ndarray | None = None) -> np.ndarray:
    """A control region for `bone` (a 2-D mask): pixels more than `margin` pixels from any bone pixel
    (and inside `within`, e.g. the body, when given), as many as `bone` has where the image has room
    for that, else every such pixel.

    With room to spare, the region is random blobs of about the bone's own width (a Gaussian random
    field from `rng`, smoothed over twice the mean distance to the bone's edge, whose highest values
    among the allowed pixels are taken: exactly bone.sum() of them). Without room, which is the rule
    in chest radiographs (the ribs' projection covers most of the thorax: the bone masks grown by
    3 px cover 61-75% of a 512 px phantom), the region is all of the image that far from bone and
    its area is smaller than the bone's; callers report the ratio.
    """
    if bone.ndim != 2:
        raise ValueError(f"off_bone_region: bone must be 2-D, got shape {bone.shape}")
    if margin < 0:
        raise ValueError(f"off_bone_region: margin must be >= 0, got {margin}")
    bone = np.asarray(bone, dtype=bool)
    if within is not None and within.shape != bone.shape:
        raise ValueError(f"off_bone_region: within has shape {within.shape}, bone {bone.shape}")
    area = int(bone.sum())
    if area == 0:
        return np.zeros_like(bone)
    # Distance of each pixel to the nearest bone pixel (L2, exact 5x5 mask).
    distance = cv2.distanceTransform((~bone).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    allowed = distance > margin
    if within is not None:
        allowed &= np.asarray(within, dtype=bool)
    n_allowed = int(allowed.sum())
    if n_allowed <= area:
        return allowed
    inside = cv2.distanceTransform(bone.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    sigma = max(1.0, 2.0 * float(inside[bone].mean()))
    field = cv2.GaussianBlur(rng.standard_normal(bone.shape).astype(np.float32), (0, 0), sigma,
                             borderType=cv2.BORDER_REFLECT)
    candidates = np.flatnonzero(allowed)
    chosen = candidates[np.argsort(-field.ravel()[candidates], kind="stable")[:area]]
    region = np.zeros(bone.size, dtype=bool)
    region[chosen] = True
    return region.reshape(bone.shape)
