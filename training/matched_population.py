"""A model's low-BMD AUC on cohort A, re-weighted to cohort B's T-scores: how much of a gap is population.

A low-BMD AUC depends on the women as much as on the model: a cohort with many T-scores near the
-1.0 boundary gives a lower AUC than one spread evenly from -4.5 to +2, for the same model. A
screening population (the site chain's, a hospital's) is of the first kind, the training phantoms
of the second. This script takes A's predictions (`osteo-train evaluate --out`) and resamples
them to B's T-score distribution: for each of B's frontal images, one of A's images whose
manifest T-score lies within 0.2 of it (the nearest one when none does). The low-BMD AUC of each
resample, with the labels of A's manifest, is what the model would reach on B's population if it
read B's images as well as A's. Comparing it with the model's AUC on B itself splits the gap
into population (A's AUC - matched) and images (matched - B's AUC).

    python -m training.matched_population A/predictions.csv A/manifest.csv B/manifest.csv

Prints the median and 2.5-97.5 percentiles of 1000 resamples (seed 0).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from osteo_node import metrics
from training.data import read_manifest
from training.delta_auc import read_predictions

#: Largest T-score difference between an image of B and the images of A that stand in for it.
WINDOW = 0.2


def t_scores_of(predictions: Sequence[str], manifest: Path) -> np.ndarray:
    """The manifest T-score of each predicted file; evaluate names a file manifest folder / file."""
    by_file = {str(r.path): r.t_score for r in read_manifest(manifest)}
    t = []
    for file in predictions:
        value = by_file.get(file)
        if value is None:
            raise ValueError(f"{file} has no T-score in {manifest} (give the manifest as it was given to "
                             "osteo-train evaluate, from the same folder)")
        t.append(value)
    return np.array(t, dtype=np.float64)


def matched_aucs(t_a: np.ndarray, low_bmd: np.ndarray, scores: np.ndarray, t_b: np.ndarray,
                 n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Low-BMD AUCs of A's (labels, scores) resampled to the T-scores `t_b`, one per resample."""
    candidates = []
    for t in t_b:
        near = np.flatnonzero(np.abs(t_a - t) <= WINDOW)
        candidates.append(near if near.size else np.array([np.argmin(np.abs(t_a - t))]))
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        pick = np.array([c[rng.integers(c.size)] for c in candidates])
        aucs.append(metrics.rank_auc(low_bmd[pick], scores[pick]))
    return np.array(aucs)


def population(t: np.ndarray) -> str:
    """n, spread and share near the normal / osteopenia boundary of a cohort's T-scores."""
    return f"n = {len(t)}, T-score SD {t.std():.2f}, {np.mean(np.abs(t + 1.0) < 0.5):.0%} within 0.5 of -1.0"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m training.matched_population A/predictions.csv A/manifest.csv B/manifest.csv",
              file=sys.stderr)
        return 2
    files, _, labels, probs = read_predictions(Path(args[0]))
    try:
        t_a = t_scores_of(files, Path(args[1]))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    t_b = np.array([r.t_score for r in read_manifest(Path(args[2])) if r.t_score is not None], dtype=np.float64)
    low_bmd, scores = labels >= 1, metrics.low_bmd_score(probs)
    aucs = matched_aucs(t_a, low_bmd, scores, t_b)
    low, mid, high = np.percentile(aucs, [2.5, 50, 97.5])
    print(f"A: low-BMD AUC {metrics.rank_auc(low_bmd, scores):.3f} ({population(t_a)})")
    print(f"B's population: {population(t_b)}")
    print(f"A resampled to B's T-scores: low-BMD AUC {mid:.3f} [{low:.3f}, {high:.3f}] (1000 resamples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
