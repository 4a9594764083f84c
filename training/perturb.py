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
