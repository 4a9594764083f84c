"""How much bone signal a phantom cohort carries, without any deep model.

Six hand-made features per frontal image, decoded as the node decodes it (osteo_node.pixels): in
the spine, rib and clavicle masks, the bone's mean minus that of a 4-pixel ring around it, and
the bone's standard deviation. A 5-fold cross-validated logistic regression on them gives a
low-BMD AUC: a floor for what a model can reach on the cohort, used to compare rendering chains
(docs/shadow-models.md).

    python -m training.bone_signal runs/site
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from osteo_node.pixels import decode

MASKS = ("spine", "ribs", "clavicles")


def features(folder: Path, row: dict[str, str]) -> list[float]:
    image = decode(pydicom.dcmread(folder / row["file"])).astype(np.float32)
    values = []
    for name in MASKS:
        bone = np.asarray(Image.open(folder / row[f"mask_{name}"])) > 0
        ring = cv2.dilate(bone.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~bone
        contrast = float(image[bone].mean() - image[ring].mean()) if bone.any() and ring.any() else 0.0
        values += [contrast, float(image[bone].std()) if bone.any() else 0.0]
    return values


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.bone_signal PHANTOM_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["view"] != "LATERAL"]
    x = np.array([features(folder, row) for row in rows])
    low_bmd = np.array([row["class"] != "normal" for row in rows])
    t_scores = np.array([float(row["t_score"]) for row in rows])
    scaled = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    p = cross_val_predict(LogisticRegression(max_iter=1000), scaled, low_bmd, cv=folds, method="predict_proba")[:, 1]
    print(f"n={len(rows)} frontal images: low-BMD AUC of bone-contrast features (5-fold CV logistic) "
          f"{roc_auc_score(low_bmd, p):.3f}")
    for k, name in enumerate(MASKS):
        print(f"  corr(T-score, {name} contrast) = {np.corrcoef(t_scores, x[:, 2 * k])[0, 1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
