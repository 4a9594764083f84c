"""training.delta_auc: the paired AUC drop of a perturbation, from two predictions.csv files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from osteo_node import metrics
from osteo_node.records import CLASS_NAMES
from training import delta_auc


def write(path: Path, labels: np.ndarray, probs: np.ndarray, files: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient_id", "class", *(f"p_{name}" for name in CLASS_NAMES)])
        for i, (label, p) in enumerate(zip(labels, probs)):
            name = files[i] if files else f"img{i}.dcm"
            writer.writerow([name, f"P{i // 2}", CLASS_NAMES[label], *(f"{v:.9g}" for v in p)])
    return path


def cohort(n: int = 240) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    informative = np.eye(3)[labels] * 2.0 + rng.normal(0, 1.0, (n, 3))
    plain = np.exp(informative) / np.exp(informative).sum(axis=1, keepdims=True)
    noise = rng.dirichlet(np.ones(3), n)
    return labels, plain, noise


def test_delta_is_the_difference_of_the_two_aucs_with_a_paired_interval(tmp_path: Path, capsys) -> None:
    labels, plain, noise = cohort()
    d = delta_auc.delta_low_bmd_auc(labels, plain, noise, [f"P{i // 2}" for i in range(len(labels))])
    assert d.value == pytest.approx(metrics.low_bmd_auc(labels, plain) - metrics.low_bmd_auc(labels, noise))
    assert d.ci_low < d.value < d.ci_high and d.ci_low > 0.1
    same = delta_auc.delta_low_bmd_auc(labels, plain, plain, [str(i) for i in range(len(labels))])
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    a, b = write(tmp_path / "a.csv", labels, plain), write(tmp_path / "b.csv", labels, noise)
    assert delta_auc.main([str(a), str(b)]) == 0
    assert f"delta low-BMD AUC {d.value:.3f} [{d.ci_low:.3f}, {d.ci_high:.3f}]" in capsys.readouterr().out


def test_refuses_predictions_of_other_cases(tmp_path: Path) -> None:
    labels, plain, noise = cohort(20)
    a = write(tmp_path / "a.csv", labels, plain)
    b = write(tmp_path / "b.csv", labels, noise, files=[f"other{i}.dcm" for i in range(20)])
    assert delta_auc.main([str(a), str(b)]) == 2
    assert delta_auc.main([str(a)]) == 2
