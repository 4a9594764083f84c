"""Delta_bone / Delta_off-bone: how much a perturbation lowers a bundle's low-BMD AUC, with a paired CI.

Reads two `osteo-train evaluate --out` predictions.csv files of the same cases (plain, then with
--perturb-bone or --perturb-off-bone) and prints AUC(plain) - AUC(perturbed) with a 95% percentile
interval from the same bootstrap as evaluate's (osteo_node.metrics.bootstrap_many: patients drawn
with replacement within their class, 1000 resamples, seed 0): both AUCs are taken on each
resample, so the interval is that of the paired difference.

    python -m training.delta_auc PLAIN/predictions.csv PERTURBED/predictions.csv
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from osteo_node import metrics
from osteo_node.records import CLASS_NAMES


def read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Files, patient ids, labels (class indices) and probabilities (N, 3) of a predictions.csv."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([CLASS_NAMES.index(r["class"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[f"p_{name}"]) for name in CLASS_NAMES] for r in rows], dtype=np.float64)
    return [r["file"] for r in rows], [r["patient_id"] for r in rows], labels, probs


def delta_low_bmd_auc(labels: np.ndarray, plain: np.ndarray, perturbed: np.ndarray, patient_ids: Sequence[str],
                      *, n_bootstrap: int = 1000, seed: int = 0) -> metrics.Interval:
    """Low-BMD AUC of `plain` minus that of `perturbed` (probabilities of the same cases), paired
    class-stratified patient-level bootstrap CI."""
    scores = np.stack([metrics.low_bmd_score(plain), metrics.low_bmd_score(perturbed)], axis=1)

    def delta(y: np.ndarray, s: np.ndarray) -> float:
        return metrics.rank_auc(y >= 1, s[:, 0]) - metrics.rank_auc(y >= 1, s[:, 1])

    return metrics.bootstrap_ci(delta, labels, scores, patient_ids, n_bootstrap, seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m training.delta_auc PLAIN/predictions.csv PERTURBED/predictions.csv", file=sys.stderr)
        return 2
    files_a, patients, labels, plain = read_predictions(Path(args[0]))
    files_b, _, labels_b, perturbed = read_predictions(Path(args[1]))
    if files_a != files_b or not np.array_equal(labels, labels_b):
        print(f"{args[0]} and {args[1]} are not predictions of the same cases in the same order", file=sys.stderr)
        return 2
    d = delta_low_bmd_auc(labels, plain, perturbed, patients)
    print(f"delta low-BMD AUC {d.value:.3f} [{d.ci_low:.3f}, {d.ci_high:.3f}] (n = {len(labels)}, paired "
          "class-stratified patient-level bootstrap, 1000 resamples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
