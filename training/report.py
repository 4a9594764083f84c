"""The comparison report: OUT/report.md plus PNG figures (matplotlib Agg) in OUT/figures/.

Input: training.compare's result dict (with the per-model confusion matrices and reliability
bins) and each run's epoch log; ROC curves are drawn from the runs' cached test predictions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from osteo_node.records import CLASS_NAMES

FIGURES = ("roc_low_bmd.png", "roc_osteoporosis.png", "confusion_matrices.png", "reliability.png",
           "training_curves.png")
REPORT_FILE = "report.md"


def _v(m: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not m or m.get("value") is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "n/a"
    return f"{m['value']:.{digits}f}"


def _ci(m: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not m or _v(m) == "n/a":
        return "n/a"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{m['value']:.{digits}f} [n/a]"
    return f"{m['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3 if n <= 9 else 4)
    return math.ceil(n / cols), cols


def _predictions(folder: Path) -> dict[str, np.ndarray] | None:
    path = folder / "test_predictions.npz"
    return dict(np.load(path, allow_pickle=False)) if path.is_file() else None


def plot_roc(out: Path, results: Mapping[str, Any], target: str) -> Path:
    from training.calibration import softmax

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for m in results["models"]:
        data = _predictions(Path(results["runs"][m["name"]]["folder"]))
        if data is None:
            continue
        p = softmax(np.log(np.clip(data["probs_raw"], 1e-300, None)), m["temperature"])
        y = data["labels"] >= 1 if target == "low_bmd" else data["labels"] == 2
        score = p[:, 1] + p[:, 2] if target == "low_bmd" else p[:, 2]
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, score)
        auc_key = "low_bmd_auc" if target == "low_bmd" else "osteoporosis_auc"
        ax.plot(fpr, tpr, lw=1.2, label=f"{m['name']} ({_v(m[auc_key])})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC, {'low BMD vs normal' if target == 'low_bmd' else 'osteoporosis vs rest'} (test)")
    ax.legend(fontsize=7, loc="lower right")
    path = out / f"roc_{target}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusions(out: Path, results: Mapping[str, Any]) -> Path:
    models = results["models"]
    rows, cols = _grid(len(models))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    short = ["norm", "penia", "porosis"]
    for ax in axes.ravel()[len(models):]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), models):
        cm = np.asarray(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(3), short, fontsize=7)
        ax.set_yticks(range(3), short, fontsize=7)
        ax.set_title(m["name"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    path = out / "confusion_matrices.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(out: Path, results: Mapping[str, Any]) -> Path:
    models = results["models"]
    rows, cols = _grid(len(models))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(models):]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), models):
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        for key, colour, label in (("reliability_before", "tab:red", "before"),
                                   ("reliability_after", "tab:blue", f"T={m['temperature']:.2f}")):
            bins = m[key]
            conf = [c for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None and a is not None]
            acc = [a for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None and a is not None]
            ax.plot(conf, acc, "o-", color=colour, ms=3, lw=1, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.set_title(f"{m['name']}\nECE {_v(m['ece_before'])} -> {_v(m['ece_after'])}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.legend(fontsize=6, loc="upper left")
    path = out / "reliability.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(out: Path, work_dirs: Mapping[str, Path]) -> Path:
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, work in work_dirs.items():
        log = Path(work) / "train_log.jsonl"
        if not log.is_file():
            continue
        records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        epochs = [r["epoch"] for r in records]
        (line,) = ax_loss.plot(epochs, [r["train_loss"] for r in records], "-", lw=1, label=name)
        ax_loss.plot(epochs, [r["val_loss"] for r in records], "--", lw=1, color=line.get_color())
        ax_auc.plot(epochs, [r["val_auc"] for r in records], "o-", ms=3, lw=1, label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training (solid) and validation (dashed) loss")
    ax_auc.set(xlabel="epoch", ylabel="macro AUC", title="validation macro AUC")
    ax_auc.legend(fontsize=6, ncol=2)
    path = out / "training_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(results: Mapping[str, Any]) -> str:
    models = results["models"]
    first = models[0]
    target = first.get("threshold_target") or {}
    target_text = (f"sensitivity {target.get('value')} on the {target.get('split')} split"
                   if target else "fixed thresholds (no target given)")
    lines = [
        "# Backbone x adaptation comparison", "",
        (f"Test split of `{results.get('manifest', '?')}`: {first['n']} frontal images of "
         f"{first['n_patients']} patients, classes {first['class_counts']}."),
        f"95% confidence intervals: {results['n_bootstrap']} bootstrap resamples, {results['bootstrap']}.",
        (f"Thresholds: per model, chosen for {target_text}; probabilities after each model's "
         "temperature (fitted on the validation split)."), "",
        "## Main table", "",
        ("| backbone | method | trainable params | macro AUC [95% CI] | low-BMD AUC [95% CI] | osteoporosis AUC "
         "| accuracy | sens / spec at threshold (low BMD) | ECE (15 bins) |"),
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(
            f"| {m['family']} | {m['method']} | {m['trainable_parameters']:,} | {_ci(m['macro_auc'])} | "
            f"{_ci(m['low_bmd_auc'])} | {_ci(m['osteoporosis_auc'])} | {_ci(m['accuracy'])} | "
            f"{_v(m['low_bmd_sensitivity'])} / {_v(m['low_bmd_specificity'])} "
            f"(t={m['thresholds'].get('low_bmd', float('nan')):.3f}) | {_v(m['ece_after'])} |")
    lines += ["", "## Per-class AUC (one vs rest)", "",
              "| model | " + " | ".join(CLASS_NAMES) + " |", "|---|" + "---|" * len(CLASS_NAMES)]
    for m in models:
        lines.append(f"| {m['name']} | " + " | ".join(_ci(m[f'auc_{c}']) for c in CLASS_NAMES) + " |")
    for target_name, label in (("low_bmd", "Low BMD (score P(osteopenia) + P(osteoporosis))"),
                               ("osteoporosis", "Osteoporosis (score P(osteoporosis))")):
        lines += ["", f"## {label} at the bundle's threshold", "",
                  "| model | threshold | sensitivity | specificity | PPV | NPV |", "|---|---:|---|---|---|---|"]
        for m in models:
            lines.append(f"| {m['name']} | {m['thresholds'].get(target_name, float('nan')):.3f} | "
                         + " | ".join(_ci(m[f'{target_name}_{k}'])
                                      for k in ("sensitivity", "specificity", "ppv", "npv"))
                         + " |")
    for target_name in ("low_bmd", "osteoporosis"):
        table = results["delong"][target_name]
        names = [m["name"] for m in models]
        lines += ["", f"## DeLong test, {target_name.replace('_', '-')} AUC (two-sided p-values)", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in names:
            lines.append(f"| {a} | " + " | ".join("-" if a == b else _p(table[a].get(b)) for b in names) + " |")
    lines += ["", "No correction for multiple comparisons is applied.", "",
              "## Calibration (test split, top-label ECE, 15 equal-width bins)", "",
              "| model | temperature | ECE before [95% CI] | ECE after [95% CI] |", "|---|---:|---|---|"]
    for m in models:
        lines.append(f"| {m['name']} | {m['temperature']:.3f} | {_ci(m['ece_before'])} | {_ci(m['ece_after'])} |")
    bands = results["age_bands"]
    lines += ["", "## Subgroups by age band (years)", "",
              "| model | " + " | ".join(f"{b}: n, low-BMD AUC, accuracy" for b in bands) + " |",
              "|---|" + "---|" * len(bands)]
    for m in models:
        cells = []
        for b in bands:
            s = results["subgroups"][m["name"]][b]
            cells.append(f"{s['n']}, {_ci(s.get('low_bmd_auc'))}, {_ci(s.get('accuracy'))}" if s["n"] else "0")
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", "",
              "![ROC low BMD](figures/roc_low_bmd.png)", "", "![ROC osteoporosis](figures/roc_osteoporosis.png)", "",
              "![Confusion matrices](figures/confusion_matrices.png)", "",
              "![Reliability diagrams](figures/reliability.png)", "",
              "![Training curves](figures/training_curves.png)", "",
              "n/a: undefined on this split (a class or a band without positives or negatives).", ""]
    return "\n".join(lines)


def write_report(out: Path, results: Mapping[str, Any], work_dirs: Mapping[str, Path]) -> Path:
    """Write OUT/report.md and OUT/figures/*.png; return the report's path."""
    figures = Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot_roc(figures, results, "low_bmd")
    plot_roc(figures, results, "osteoporosis")
    plot_confusions(figures, results)
    plot_reliability(figures, results)
    plot_training(figures, work_dirs)
    path = Path(out) / REPORT_FILE
    path.write_text(markdown(results), encoding="utf-8")
    return path
