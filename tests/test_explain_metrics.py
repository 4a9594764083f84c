"""training.explain_metrics on 4 x 4 maps whose IoU and mass values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.explain_metrics import (
    ThresholdRule,
    area_fraction,
    bone_mass_fraction,
    chance_iou,
    iou_bone,
    per_structure_area_fraction,
    per_structure_iou,
    per_structure_mass_fraction,
    salient_region,
    union_mask,
)

# values 0..15 row by row; total mass 120
RAMP = np.arange(16, dtype=np.float32).reshape(4, 4)


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    m = np.zeros((4, 4), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


COL3 = _mask((0, 3), (1, 3), (2, 3), (3, 3))  # values 3, 7, 11, 15: mass 36
TOP_LEFT = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # values 0, 1, 4, 5: mass 10
RIGHT_HALF = COL3 | _mask((0, 2), (1, 2), (2, 2), (3, 2))  # mass 32 + 36 = 68


def test_default_rule_is_top_20_percent():
    # ceil(0.2 * 16) = 4 pixels: the last row (12..15)
    region = salient_region(RAMP)
    assert region.sum() == 4 and region[3].all()
    assert ThresholdRule().describe() == "top 20% of pixels"


def test_iou_top_fraction_by_hand():
    assert iou_bone(RAMP, COL3) == pytest.approx(1 / 7)  # {15} / (4 + 4 - 1)
    assert iou_bone(RAMP, TOP_LEFT) == 0.0
    assert iou_bone(RAMP, RIGHT_HALF) == pytest.approx(2 / 10)  # {14, 15} / (4 + 8 - 2)
    # top 50 %: values 8..15 (rows 2 and 3) vs column 3: {11, 15} / (8 + 4 - 2)
    assert iou_bone(RAMP, COL3, ThresholdRule(top_fraction=0.5)) == pytest.approx(2 / 10)


def test_iou_absolute_threshold_by_hand():
    rule = ThresholdRule(absolute=10.0)
    assert rule.top_fraction is None and rule.describe() == "saliency >= 10"
    # values >= 10: six pixels; with column 3: {11, 15} / (6 + 4 - 2)
    assert iou_bone(RAMP, COL3, rule) == pytest.approx(2 / 8)


def test_ties_and_zeros():
    ties = np.zeros((4, 4))
    ties[:2] = 1.0  # 8 tied pixels; top 20 % asks for 4: all ties are taken, zeros never
    assert salient_region(ties).sum() == 8
    zero = np.zeros((4, 4))
    assert salient_region(zero).sum() == 0
    assert iou_bone(zero, COL3) == 0.0
    assert math.isnan(bone_mass_fraction(zero, COL3))
    assert math.isnan(iou_bone(zero, np.zeros((4, 4), bool)))


def test_mass_fraction_by_hand():
    assert bone_mass_fraction(RAMP, COL3) == pytest.approx(36 / 120)
    assert bone_mass_fraction(RAMP, TOP_LEFT) == pytest.approx(10 / 120)
    assert bone_mass_fraction(RAMP, RIGHT_HALF) == pytest.approx(68 / 120)
    assert bone_mass_fraction(RAMP, np.ones((4, 4), bool)) == pytest.approx(1.0)
    # a uniform map puts exactly the area fraction in the mask: the chance baseline
    assert bone_mass_fraction(np.ones((4, 4)), COL3) == pytest.approx(area_fraction(COL3)) == 0.25


def test_chance_iou():
    # q = 0.25 region, a = 0.5 mask: 0.125 / (0.75 - 0.125)
    assert chance_iou(0.5, 0.25) == pytest.approx(0.2)
    assert chance_iou(1.0, 0.2) == pytest.approx(0.2)
    assert math.isnan(chance_iou(0.0, 0.0))
    with pytest.raises(ValueError, match="mask_area_fraction"):
        chance_iou(1.5, 0.2)


def test_per_structure_and_union():
    masks = {"spine": COL3, "clavicles": TOP_LEFT}
    bone = union_mask(masks, ["spine", "clavicles"])
    assert bone.sum() == 8
    assert per_structure_mass_fraction(RAMP, masks) == pytest.approx({"spine": 0.3, "clavicles": 10 / 120})
    assert per_structure_iou(RAMP, masks) == pytest.approx({"spine": 1 / 7, "clavicles": 0.0})
    assert per_structure_area_fraction(masks) == {"spine": 0.25, "clavicles": 0.25}
    # disjoint structures: the mass fractions add up to the union's
    assert bone_mass_fraction(RAMP, bone) == pytest.approx(46 / 120)
    with pytest.raises(KeyError, match="ribs"):
        union_mask(masks, ["ribs"])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="top_fraction"):
        ThresholdRule(top_fraction=0.0)
    with pytest.raises(ValueError, match="absolute"):
        ThresholdRule(absolute=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        bone_mass_fraction(-RAMP, COL3)
    with pytest.raises(ValueError, match="shape"):
        iou_bone(RAMP, np.ones((2, 2), bool))
