"""Model comparison on one test split: metrics with patient-level bootstrap CIs, DeLong tests,
calibration before/after temperature scaling, and age-band subgroups.

Inputs are ModelPredictions (one per trained model, same cases in the same order); the output is
one JSON-friendly dict that training/report.py renders. Confidence intervals come from
osteo_node.metrics.bootstrap_many (class-stratified, patient-level, percentile); the DeLong tests
from osteo_node.metrics.delong_test.

The AUCs inside the bootstrap use osteo_node.metrics.rank_auc, a Mann-Whitney AUC with mid-ranks that equals
osteo_node.metrics.auc (sklearn) but costs ~30 us instead of ~1.5 ms per call: 12 models x 1000
resamples x ~15 metrics would otherwise take minutes (training.evaluate.summarise: ~17 s per
model for 1000 resamples on the 2-core machine).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from osteo_node import metrics
from osteo_node.metrics import DEFAULT_BINS, rank_auc, reliability
from osteo_node.records import CLASS_NAMES
from training.calibration import softmax

#: Age bands of the subgroup analysis: (label, lowest age, highest age) in years, inclusive.
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("40-49", 40, 49.999), ("50-64", 50, 64.999), ("65-74", 65, 74.999), ("75+", 75, math.inf))


@dataclass(frozen=True, eq=False)
class ModelPredictions:
    """One model's test-split outputs. probs_raw: softmax(logits); probs: after its temperature."""

    name: str
    family: str
    method: str
    trainable_parameters: int
    labels: np.ndarray
    patient_ids: tuple[str, ...]
    ages: np.ndarray  # NaN where unknown
    probs_raw: np.ndarray
    temperature: float = 1.0
    thresholds: Mapping[str, float] = field(default_factory=lambda: {"low_bmd": 0.5, "osteoporosis": 0.5})
    threshold_target: Mapping[str, Any] | None = None

    @property
    def probs(self) -> np.ndarray:
        """Probabilities the node reports: softmax(log(probs_raw) / T) = softmax(logits / T)."""
        if self.temperature == 1.0:
            return self.probs_raw
        return softmax(np.log(np.clip(self.probs_raw, 1e-300, None)), self.temperature)


def _macro(y: np.ndarray, p: np.ndarray) -> float:
    values = [v for k in range(p.shape[1]) if not math.isnan(v := rank_auc(y == k, p[:, k]))]
    return float(np.mean(values)) if values else float("nan")


def metric_functions(thresholds: Mapping[str, float]) -> dict[str, metrics.MetricFn]:
    """name -> fn(labels, probs) for every reported metric."""
    def class_auc(k: int) -> metrics.MetricFn:
        return lambda y, p: rank_auc(y == k, p[:, k])

    def rate(target: str, name: str) -> metrics.MetricFn:
        t = float(thresholds[target])
        if target == "low_bmd":
            return lambda y, p: getattr(metrics.binary_rates(y >= 1, metrics.low_bmd_score(p), t), name)
        return lambda y, p: getattr(metrics.binary_rates(y == 2, p[:, 2], t), name)

    fns: dict[str, metrics.MetricFn] = {
        "macro_auc": _macro,
        "low_bmd_auc": lambda y, p: rank_auc(y >= 1, metrics.low_bmd_score(p)),
        "osteoporosis_auc": lambda y, p: rank_auc(y == 2, p[:, 2]),
        "accuracy": metrics.accuracy,
        **{f"auc_{name}": class_auc(k) for k, name in enumerate(CLASS_NAMES)},
    }
    for target in ("low_bmd", "osteoporosis"):
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            fns[f"{target}_{name}"] = rate(target, name)
    return fns


def confusion(labels: np.ndarray, probs: np.ndarray) -> list[list[int]]:
    """3x3 counts, rows = true class, columns = most probable class."""
    out = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(probs).argmax(axis=1)), 1)
    return out.tolist()


def model_metrics(mp: ModelPredictions, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Every metric of one model with its 95% CI, plus calibration and the confusion matrix."""
    probs = mp.probs
    ci = metrics.bootstrap_many(metric_functions(mp.thresholds), mp.labels, probs, mp.patient_ids,
                                n_bootstrap, seed)
    ece_ci = metrics.bootstrap_many(
        {"before": lambda y, p: reliability(p[:, :3], y, DEFAULT_BINS).ece,
         "after": lambda y, p: reliability(p[:, 3:], y, DEFAULT_BINS).ece},
        mp.labels, np.hstack([mp.probs_raw, probs]), mp.patient_ids, n_bootstrap, seed)
    before, after = reliability(mp.probs_raw, mp.labels), reliability(probs, mp.labels)
    return {
        "name": mp.name, "family": mp.family, "method": mp.method,
        "trainable_parameters": int(mp.trainable_parameters),
        "n": len(mp.labels), "n_patients": len(set(mp.patient_ids)),
        "class_counts": {name: int((mp.labels == k).sum()) for k, name in enumerate(CLASS_NAMES)},
        "thresholds": {k: float(v) for k, v in mp.thresholds.items()},
        "threshold_target": dict(mp.threshold_target) if mp.threshold_target else None,
        "temperature": float(mp.temperature),
        **{key: value.as_dict() for key, value in ci.items()},
        "ece_before": ece_ci["before"].as_dict(), "ece_after": ece_ci["after"].as_dict(),
        "reliability_before": _bins_dict(before), "reliability_after": _bins_dict(after),
        "confusion": confusion(mp.labels, probs),
    }


def _bins_dict(bins: Any) -> dict[str, Any]:
    return {"edges": bins.edges.tolist(), "counts": bins.counts.tolist(),
            "accuracy": [None if math.isnan(v) else float(v) for v in bins.accuracy],
            "confidence": [None if math.isnan(v) else float(v) for v in bins.confidence]}


def subgroup_metrics(mp: ModelPredictions, n_bootstrap: int, seed: int,
                     bands: Sequence[tuple[str, float, float]] = AGE_BANDS) -> dict[str, Any]:
    """Per age band: n, macro / low-BMD AUC and accuracy with CIs (NaN where a band is too small)."""
    probs = mp.probs
    out: dict[str, Any] = {}
    fns = {k: v for k, v in metric_functions(mp.thresholds).items()
           if k in ("macro_auc", "low_bmd_auc", "accuracy", "low_bmd_sensitivity", "low_bmd_specificity")}
    for label, low, high in bands:
        mask = (mp.ages >= low) & (mp.ages <= high)
        idx = np.nonzero(mask)[0]
        entry: dict[str, Any] = {"n": int(idx.size), "n_patients": len({mp.patient_ids[i] for i in idx})}
        if idx.size:
            ci = metrics.bootstrap_many(fns, mp.labels[idx], probs[idx], [mp.patient_ids[i] for i in idx],
                                        n_bootstrap, seed)
            entry.update({k: v.as_dict() for k, v in ci.items()})
        out[label] = entry
    return out


def delong_table(models: Sequence[ModelPredictions], target: str) -> dict[str, dict[str, float | None]]:
    """p-values of DeLong's test for every pair of models on `target` (low_bmd or osteoporosis)."""
    table: dict[str, dict[str, float | None]] = {m.name: {} for m in models}
    for a, b in itertools.combinations(models, 2):
        if target == "low_bmd":
            y, sa, sb = a.labels >= 1, metrics.low_bmd_score(a.probs), metrics.low_bmd_score(b.probs)
        else:
            y, sa, sb = a.labels == 2, a.probs[:, 2], b.probs[:, 2]
        try:
            p: float | None = metrics.delong_test(y, sa, sb).p_value
        except ValueError:  # fewer than 2 positives or negatives
            p = None
        if p is not None and math.isnan(p):
            p = None
        table[a.name][b.name] = table[b.name][a.name] = p
    return table


def compare(models: Sequence[ModelPredictions], *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The whole comparison as a JSON-friendly dict."""
    if not models:
        raise ValueError("compare needs at least one model")
    first = models[0]
    for m in models[1:]:
        if m.patient_ids != first.patient_ids or not np.array_equal(m.labels, first.labels):
            raise ValueError(f"model {m.name!r} was evaluated on other cases than {first.name!r}")
    return {
        "n_bootstrap": int(n_bootstrap), "seed": int(seed),
        "bootstrap": "percentile 95% CI, patients resampled with replacement within class strata",
        "ece_bins": DEFAULT_BINS,
        "models": [model_metrics(m, n_bootstrap, seed) for m in models],
        "delong": {"low_bmd": delong_table(models, "low_bmd"),
                   "osteoporosis": delong_table(models, "osteoporosis")},
        "subgroups": {m.name: subgroup_metrics(m, n_bootstrap, seed) for m in models},
        "age_bands": [b[0] for b in AGE_BANDS],
    }
