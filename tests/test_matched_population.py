"""training.matched_population: a model's AUC on one cohort, resampled to another's T-scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from osteo_node.records import category_from_t_score
from training import matched_population


def write_cohort(folder: Path, t: np.ndarray, rng: np.random.Generator) -> None:
    """manifest.csv and an evaluate-style predictions.csv whose low-BMD score is -T plus noise."""
    folder.mkdir()
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient_id", "t_score", "class", "view", "split"])
        for i, value in enumerate(t):
            label = category_from_t_score(value)
            writer.writerow([f"images/{i:06d}.dcm", f"P{i}", f"{value:.2f}", label, "PA", "test"])
    low_bmd = 1.0 / (1.0 + np.exp(t + 1.0 + rng.normal(0, 1.0, t.size)))
    with (folder / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient_id", "class", "p_normal", "p_osteopenia", "p_osteoporosis"])
        for i, (value, p) in enumerate(zip(t, low_bmd, strict=True)):
            writer.writerow([str(folder / f"images/{i:06d}.dcm"), f"P{i}", category_from_t_score(value),
                             1 - p, p / 2, p / 2])


def run(capsys: pytest.CaptureFixture[str], *args: Path) -> tuple[float, float]:
    """(A's AUC, the matched AUC) as printed."""
    assert matched_population.main([str(a) for a in args]) == 0
    lines = capsys.readouterr().out.splitlines()
    return float(lines[0].split("AUC ")[1].split()[0]), float(lines[2].split("AUC ")[1].split()[0])


def test_a_population_near_the_boundary_lowers_the_same_models_auc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    spread, screening = tmp_path / "spread", tmp_path / "screening"
    write_cohort(spread, rng.uniform(-4.5, 2.0, 600), rng)
    write_cohort(screening, rng.normal(-1.1, 0.6, 400), rng)
    auc, matched = run(capsys, spread / "predictions.csv", spread / "manifest.csv", screening / "manifest.csv")
    assert auc > 0.85
    assert matched < auc - 0.1  # the same model, women near -1.0
    # Resampled to its own population, a cohort keeps its AUC.
    auc, itself = run(capsys, spread / "predictions.csv", spread / "manifest.csv", spread / "manifest.csv")
    assert itself == pytest.approx(auc, abs=0.02)


def test_predictions_of_another_cohort_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a", tmp_path / "b"
    write_cohort(a, rng.uniform(-4, 1, 20), rng)
    write_cohort(b, rng.uniform(-4, 1, 10), rng)
    assert matched_population.main([str(a / "predictions.csv"), str(b / "manifest.csv"), str(b / "manifest.csv")]) == 2
    assert f"{a}/images/000000.dcm has no T-score in {b}/manifest.csv" in capsys.readouterr().err
    assert matched_population.main([str(a / "predictions.csv")]) == 2
    assert "usage: python -m training.matched_population" in capsys.readouterr().err
