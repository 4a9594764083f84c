"""osteo_node.metrics (ECE), training.calibration (temperature scaling) and osteo_node.metrics.rank_auc."""

from __future__ import annotations

import numpy as np
import pytest

from osteo_node import metrics
from osteo_node.metrics import expected_calibration_error, rank_auc, reliability
from training.calibration import fit_temperature, nll, softmax


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 images at confidence 0.7 of which 7 are right, 4 at 0.5 of which 2 are right
    probs = np.array([[0.7, 0.2, 0.1]] * 10 + [[0.5, 0.3, 0.2]] * 4)
    labels = np.array([0] * 7 + [1] * 3 + [0, 0, 1, 2])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_value():
    # half at confidence 0.9 all right (gap 0.1), half at 0.6 all wrong (gap 0.6): ECE 0.35
    probs = np.array([[0.9, 0.05, 0.05]] * 5 + [[0.6, 0.3, 0.1]] * 5)
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.35)
    bins = reliability(probs, labels, 15)
    assert bins.counts.sum() == 10 and int((bins.counts > 0).sum()) == 2
    # one bin: |mean accuracy - mean confidence| = |0.5 - 0.75|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.25)


def test_temperature_scaling_lowers_nll_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    n = 600
    labels = rng.integers(0, 3, n)
    clean = rng.normal(0, 1, (n, 3))
    clean[np.arange(n), labels] += 1.0
    logits = 6.0 * clean  # strongly over-confident
    t = fit_temperature(logits, labels)
    assert t > 2.0
    assert nll(logits, labels, t) < nll(logits, labels) - 0.1
    assert np.array_equal(softmax(logits, t).argmax(1), softmax(logits).argmax(1))
    assert expected_calibration_error(softmax(logits, t), labels) < expected_calibration_error(softmax(logits), labels)


def test_temperature_of_calibrated_logits_is_near_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 3))
    p = softmax(logits)
    labels = np.array([rng.choice(3, p=row) for row in p])  # labels drawn from the model itself
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_rank_auc_equals_sklearn_auc_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.random(40), 1)  # many ties
        assert rank_auc(y, s) == pytest.approx(metrics.auc(y, s), abs=1e-12)
    assert np.isnan(rank_auc(np.ones(5), np.arange(5)))
