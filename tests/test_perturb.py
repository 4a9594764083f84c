"""inpaint_bone: masked pixels become plausible surrounding tissue, the rest is untouched."""

from __future__ import annotations

import time

import numpy as np
import pytest

from training.perturb import inpaint_bone


def textured_image(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A smooth soft-tissue gradient with noise, and a bright 'bone' band with its mask."""
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    tissue = 1000.0 + 2.0 * cols + rng.normal(0.0, 10.0, (size, size)).astype(np.float32)
    mask = (np.abs(rows - size / 2) < size / 16) & (cols > size / 8) & (cols < 7 * size / 8)
    image = tissue.copy()
    image[mask] += 800.0
    return image, mask


def test_fill_is_in_the_range_of_surrounding_tissue() -> None:
    image, mask = textured_image()
    out = inpaint_bone(image, mask, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.float32
    assert np.array_equal(out[~mask], image[~mask])
    filled = out[mask]
    assert filled.max() < image[~mask].max() + 50 and filled.min() > image[~mask].min() - 50
    # It follows the tissue gradient (left darker than right), not a flat value or the bone.
    cols = np.nonzero(mask.any(axis=0))[0]
    left, right = out[mask.any(axis=1)][:, cols[:20]].mean(), out[mask.any(axis=1)][:, cols[-20:]].mean()
    assert right - left > 500
    expected = 1000.0 + 2.0 * np.nonzero(mask)[1]
    assert np.abs(filled - expected).mean() < 30
    # Matched noise: the fill is not smoother than the tissue around it.
    assert 3.0 < np.std(np.diff(out[mask.any(axis=1)][:, cols[100:300]], axis=1)) < 40.0


def test_empty_mask_and_bad_arguments() -> None:
    image, _ = textured_image(64)
    unchanged = inpaint_bone(image, np.zeros_like(image, bool), np.random.default_rng(0))
    assert np.array_equal(unchanged, image)
    with pytest.raises(ValueError, match="mask shape"):
        inpaint_bone(image, np.zeros((3, 3), bool), np.random.default_rng(0))
    with pytest.raises(ValueError, match="whole image"):
        inpaint_bone(image, np.ones_like(image, bool), np.random.default_rng(0))


def test_fast_enough_for_explanations() -> None:
    image, mask = textured_image(512)
    rng = np.random.default_rng(0)
    inpaint_bone(image, mask, rng)
    started = time.perf_counter()
    for _ in range(5):
        inpaint_bone(image, mask, rng)
    assert (time.perf_counter() - started) / 5 < 0.05
