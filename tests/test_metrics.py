"""osteo_node.metrics: AUCs, operating points, patient-level stratified bootstrap, DeLong's test."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from osteo_node import metrics


def random_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels 0..2 and (n, 3) probabilities that carry some signal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


# --------------------------------------------------------------------------- point metrics


def test_aucs_equal_sklearn_on_random_data() -> None:
    labels, probs = random_data(300)
    per_class = [roc_auc_score(labels == k, probs[:, k]) for k in range(3)]
    assert metrics.per_class_auc(labels, probs) == pytest.approx(per_class)
    assert metrics.macro_auc(labels, probs) == pytest.approx(np.mean(per_class))
    assert metrics.macro_auc(labels, probs) == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert metrics.low_bmd_auc(labels, probs) == pytest.approx(roc_auc_score(labels >= 1, probs[:, 1] + probs[:, 2]))
    assert metrics.osteoporosis_auc(labels, probs) == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))
    assert metrics.accuracy(labels, probs) == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_auc_of_one_class_is_nan_and_macro_skips_it() -> None:
    assert math.isnan(metrics.auc(np.ones(5), np.arange(5)))
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0]])
    assert math.isnan(metrics.per_class_auc(labels, probs)[2])
    assert metrics.macro_auc(labels, probs) == pytest.approx(1.0)


def test_binary_rates_by_hand() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.75, 0.3, 0.1, 0.1, 0.0, 0.6])
    rates = metrics.binary_rates(y, score, 0.65)  # TP 3, FN 1, FP 1, TN 5
    assert rates == metrics.BinaryRates(sensitivity=3 / 4, specificity=5 / 6, ppv=3 / 4, npv=5 / 6)
    assert math.isnan(metrics.binary_rates(y, score, 2.0).ppv)  # no positive calls


def test_threshold_for_sensitivity() -> None:
    y = np.array([1] * 10 + [0] * 5)
    score = np.concatenate([np.linspace(0.1, 1.0, 10), np.full(5, 0.05)])
    t = metrics.threshold_for_sensitivity(y, score, 0.9)
    assert t == pytest.approx(0.2)
    assert metrics.binary_rates(y, score, t).sensitivity >= 0.9
    assert metrics.binary_rates(y, score, t + 1e-6).sensitivity < 0.9
    with pytest.raises(ValueError, match="no positives"):
        metrics.threshold_for_sensitivity(np.zeros(3), np.arange(3), 0.9)


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.slow
def test_bootstrap_ci_contains_the_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (100, 1600):
        labels, probs = random_data(n, seed=1)
        ids = [f"P{i}" for i in range(n)]
        ci = metrics.bootstrap_ci(metrics.macro_auc, labels, probs, ids, n=300, seed=0)
        assert ci.value == pytest.approx(metrics.macro_auc(labels, probs))
        assert ci.ci_low <= ci.value <= ci.ci_high
        widths.append(ci.ci_high - ci.ci_low)
    assert widths[1] < 0.5 * widths[0]  # width ~ 1/sqrt(n): 16x the data, about 1/4 the width


def test_bootstrap_is_reproducible_by_seed() -> None:
    labels, probs = random_data(80)
    ids = [f"P{i // 2}" for i in range(80)]
    a = metrics.bootstrap_ci(metrics.accuracy, labels, probs, ids, n=100, seed=7)
    b = metrics.bootstrap_ci(metrics.accuracy, labels, probs, ids, n=100, seed=7)
    assert a == b


def test_patient_resampling_keeps_a_patients_images_together_within_strata() -> None:
    # 12 patients with 1-3 images each; the patient's images share the class
    ids, labels = [], []
    for p in range(12):
        for _ in range(1 + p % 3):
            ids.append(f"P{p}")
            labels.append(p % 3)
    labels_arr = np.array(labels)
    strata = metrics.patient_strata(labels_arr, ids)
    images_of = {pid: [i for i, q in enumerate(ids) if q == pid] for pid in set(ids)}
    patients_per_stratum = Counter(strata.values())
    for idx in metrics.bootstrap_indices(ids, strata, n=200, seed=3):
        counts = Counter(idx.tolist())
        draws: Counter[str] = Counter()
        for pid, images in images_of.items():
            times = {counts.get(i, 0) for i in images}
            assert len(times) == 1, f"patient {pid} split apart: {times}"
            draws[pid] = times.pop()
        # every stratum keeps its number of patients
        per_stratum = Counter()
        for pid, times in draws.items():
            per_stratum[strata[pid]] += times
        assert per_stratum == patients_per_stratum


def test_patient_strata_take_the_highest_class() -> None:
    assert metrics.patient_strata(np.array([0, 2, 1]), ["A", "A", "B"]) == {"A": 2, "B": 1}


# --------------------------------------------------------------------------- DeLong

# Hand example: positives A = (0.9, 0.7, 0.5), negatives A = (0.6, 0.5, 0.2) (one tie).
# Structural components (psi = 1 if x > y, 1/2 if tied):
#   V10 = (1, 1, 1/2), V01 = (2/3, 5/6, 1); AUC = 5/6
#   S10 = var(V10, ddof 1) = 1/12, S01 = 1/36; Var = S10/3 + S01/3 = 1/27
# Scorer B: positives (0.8, 0.3, 0.6), negatives (0.4, 0.2, 0.7):
#   V10 = (1, 1/3, 2/3), V01 = (2/3, 1, 1/3); AUC = 2/3; S10 = S01 = 1/9; Var = 2/27
#   cov10(A, B) = 0, cov01(A, B) = -1/36; Cov = 0/3 + (-1/36)/3 = -1/108
Y_HAND = np.array([1, 1, 1, 0, 0, 0])
A_HAND = np.array([0.9, 0.7, 0.5, 0.6, 0.5, 0.2])
B_HAND = np.array([0.8, 0.3, 0.6, 0.4, 0.2, 0.7])


def test_delong_matches_the_structural_components_computed_by_hand() -> None:
    aucs, cov = metrics.delong_covariance(Y_HAND, np.vstack([A_HAND, B_HAND]))
    assert aucs == pytest.approx([5 / 6, 2 / 3])
    assert cov == pytest.approx(np.array([[1 / 27, -1 / 108], [-1 / 108, 2 / 27]]))
    result = metrics.delong_test(Y_HAND, A_HAND, B_HAND)
    var_diff = 1 / 27 + 2 / 27 + 2 / 108
    assert result.difference == pytest.approx(1 / 6)
    assert result.z == pytest.approx((1 / 6) / math.sqrt(var_diff))
    assert result.p_value == pytest.approx(math.erfc(abs(result.z) / math.sqrt(2)))


def structural_components_covariance(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """DeLong et al. 1988 by definition, O(m n): the reference for the fast algorithm."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    return np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


def test_fast_delong_equals_the_definition_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=120)
    a = np.round(y + rng.normal(size=120), 1)  # rounding makes ties
    b = np.round(0.5 * a + rng.normal(size=120), 1)
    aucs, cov = metrics.delong_covariance(y, np.vstack([a, b]))
    assert aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    assert cov == pytest.approx(structural_components_covariance(y, np.vstack([a, b])))


def test_delong_of_identical_scorers_is_not_significant() -> None:
    labels, probs = random_data(100)
    result = metrics.delong_test(labels == 2, probs[:, 2], probs[:, 2])
    assert result.z == 0.0 and result.p_value == pytest.approx(1.0)


def test_weighted_auc_equals_sklearn_with_sample_weights():
    """Every row of weights (bootstrap multiplicities here) gives sklearn's weighted AUC, ties
    counting one half; a row without both classes is NaN."""
    rng = np.random.default_rng(7)
    y = rng.random(300) < 0.4
    score = np.round(rng.random(300), 1)  # many ties
    weights = metrics.bootstrap_weights(metrics.bootstrap_indices([str(i) for i in range(300)], None, 50, 3), 300)
    expected = [roc_auc_score(y, score, sample_weight=w) for w in weights]
    assert metrics.weighted_auc(y, score, weights) == pytest.approx(expected, abs=1e-12)
    only_negatives = (~y).astype(float)[None, :]
    assert np.isnan(metrics.weighted_auc(y, score, only_negatives)).all()
    assert metrics.weighted_auc(y, score, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, score))
