"""Validate: how well each model works at this site, measured on DXA pairs (osteo_node.pairing).

For every model version that has produced results: the pairs, low-BMD AUC (P(osteopenia) +
P(osteoporosis), truth: lowest T-score < -1.0) and osteoporosis-vs-rest AUC with 95% patient-level
bootstrap CIs, calibration (top-label reliability bins and ECE), sensitivity, specificity, PPV,
NPV and flag rate of the referral rule at the operating point in force, the same figures by
manufacturer, modality, view and age band and per calendar month of the image (drift), what
other operating points would give, and a status. Shadow models are compared with the live model
on the pairs both screened (paired patient-level bootstrap of the AUC difference, and DeLong).

Every figure carries its n; a CI computed from under SMALL_N cases is marked `small_sample`.
The output is one JSON-ready dict (`Validation.report`), the same for `osteo-node validate
--json`, the HTML report and the Performance page; `Validation.data` keeps the arrays for plots.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import operating_point
from .metrics import (
    Interval,
    bootstrap_indices,
    bootstrap_weights,
    delong_test,
    patient_strata,
    percentile_interval,
    rank_auc,
    reliability,
    weighted_auc,
)
from .operating_point import OperatingPoint, OperatingPointError, Thresholds, Volume
from .pairing import ModelKey, ModelPairs, by_model, load_pairs, models
from .refer import flagged
from .roles import LIVE as LIVE  # re-exported: the roles validate reports
from .roles import SHADOW as SHADOW
from .roles import model_roles

if TYPE_CHECKING:
    from .config import Settings, ValidationSettings

INSUFFICIENT, FAILING, PASSING = "insufficient-data", "failing", "passing"
#: A CI from fewer cases than this is marked `small_sample`.
SMALL_N = 30
CALIBRATION_BINS = 10
#: Operating points shown for comparison: these target sensitivities (low BMD).
SENSITIVITY_TARGETS = (0.80, 0.85, 0.90, 0.95)
#: Subgroups: report key -> what a pair is grouped by.
AGE_BANDS = ((0, 50, "<50"), (50, 60, "50-59"), (60, 70, "60-69"), (70, 80, "70-79"),
             (80, math.inf, "80+"))
SEED = 0


def status_of(pairs: int, low_bmd_auc_ci_high: float | None, rules: ValidationSettings) -> str:
    """insufficient-data under min_pairs pairs (or no AUC: one class only); failing when the
    low-BMD AUC's CI upper bound is below min_low_bmd_auc; else passing."""
    if pairs < rules.min_pairs or low_bmd_auc_ci_high is None:
        return INSUFFICIENT
    return FAILING if low_bmd_auc_ci_high < rules.min_low_bmd_auc else PASSING


@dataclass(frozen=True)
class Targets:
    """Operating points the admin wants to see the effect of (validate --target-sensitivity ...)."""

    target_sensitivity: float | None = None
    flags_per_week: float | None = None


@dataclass(frozen=True, eq=False)
class Validation:
    """The report (JSON-ready) and, per Device UID, the pairs behind it (for plots)."""

    report: dict[str, Any]
    data: dict[str, ModelPairs]
    points: dict[str, OperatingPoint | None]


# --------------------------------------------------------------------------- figures


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _interval(iv: Interval, n: int) -> dict[str, Any]:
    return {"value": _num(iv.value), "ci_low": _num(iv.ci_low), "ci_high": _num(iv.ci_high),
            "n": n, "small_sample": n < SMALL_N}


#: Rates of the referral rule: name -> (numerator, denominator) as masks of (flagged, low BMD).
RATES: dict[str, tuple[Callable[[np.ndarray, np.ndarray], np.ndarray],
                       Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "sensitivity": (lambda f, y: f & y, lambda f, y: y),
    "specificity": (lambda f, y: ~f & ~y, lambda f, y: ~y),
    "ppv": (lambda f, y: f & y, lambda f, y: f),
    "npv": (lambda f, y: ~f & ~y, lambda f, y: ~f),
    "flag_rate": (lambda f, y: f, lambda f, y: np.ones_like(f)),
}
#: `at_threshold` of a model without a known operating point (or without pairs): same keys, no values.
NO_RATES: dict[str, Any] = {**{name: None for name in RATES}, "n": None, "ci": None}
#: Resamples evaluated together (weights of 200 x 10,000 pairs: 16 MB).
_BATCH = 200


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def bootstrap(data: ModelPairs, point: Thresholds | None, resamples: int) -> dict[str, Interval]:
    """Both AUCs and, at `point`, the rates, with 95% CIs from one patient-level bootstrap
    (patients resampled within their class, as in training; resamples as weights)."""
    y, p = data.labels, data.probs
    low, pos = p[:, 1] + p[:, 2], y >= 1
    f = flagged(p, point) if point is not None else None
    values = {"low_bmd_auc": rank_auc(pos, low), "osteoporosis_auc": rank_auc(y == 2, p[:, 2])}
    if f is not None:
        values.update({name: float(_ratio(np.array([num(f, pos).sum()], dtype=float),
                                          np.array([den(f, pos).sum()], dtype=float))[0])
                       for name, (num, den) in RATES.items()})
    samples: dict[str, list[np.ndarray]] = {name: [] for name in values}
    patients = data.patients
    index = bootstrap_indices(patients, patient_strata(y, patients), resamples, SEED)
    # numerator and denominator masks of every rate as columns: one matrix product per batch
    masks = (np.stack([m(f, pos) for num, den in RATES.values() for m in (num, den)], axis=1)
             .astype(np.float64) if f is not None else None)
    for start in range(0, len(index), _BATCH):
        w = bootstrap_weights(index[start:start + _BATCH], len(y))
        samples["low_bmd_auc"].append(weighted_auc(pos, low, w))
        samples["osteoporosis_auc"].append(weighted_auc(y == 2, p[:, 2], w))
        if masks is not None:
            counts = w @ masks
            for k, name in enumerate(RATES):
                samples[name].append(_ratio(counts[:, 2 * k], counts[:, 2 * k + 1]))
    return {name: percentile_interval(values[name], list(np.concatenate(samples[name])))
            for name in values}


def figures(data: ModelPairs, point: Thresholds | None, resamples: int) -> dict[str, Any]:
    """Pairs, AUCs, ECE and rates at `point` (with CIs and n) of one set of pairs."""
    y, p = data.labels, data.probs
    n = len(y)
    out: dict[str, Any] = {"pairs": n, "patients": len(set(data.patients)),
                           "class_counts": {"normal": int((y == 0).sum()),
                                            "osteopenia": int((y == 1).sum()),
                                            "osteoporosis": int((y == 2).sum())}}
    if n == 0:
        empty = Interval(float("nan"), float("nan"), float("nan"))
        out.update(low_bmd_auc=_interval(empty, 0), osteoporosis_auc=_interval(empty, 0), ece=None,
                   at_threshold=NO_RATES)
        return out
    ci = bootstrap(data, point, resamples)
    out["low_bmd_auc"] = _interval(ci["low_bmd_auc"], n)
    out["osteoporosis_auc"] = _interval(ci["osteoporosis_auc"], n)
    out["ece"] = _num(reliability(p, y, CALIBRATION_BINS).ece)
    if point is None:
        out["at_threshold"] = NO_RATES
        return out
    f, pos = flagged(p, point), y >= 1
    counts = {name: int(den(f, pos).sum()) for name, (_, den) in RATES.items()}
    at: dict[str, Any] = {name: _num(ci[name].value) for name in RATES}
    at["n"] = counts
    at["ci"] = {name: {"ci_low": _num(ci[name].ci_low), "ci_high": _num(ci[name].ci_high),
                       "small_sample": counts[name] < SMALL_N} for name in RATES}
    out["at_threshold"] = at
    return out


def _age_band(age: float | None) -> str:
    if age is None:
        return "unknown"
    return next(label for low, high, label in AGE_BANDS if low <= age < high)


GROUPINGS: dict[str, Callable[[Any], str]] = {
    "manufacturer": lambda pair: pair.image.manufacturer or "(unknown)",
    "modality": lambda pair: pair.image.modality or "(unknown)",
    "view": lambda pair: pair.image.view_position or "(unknown)",
    "age_band": lambda pair: _age_band(pair.image.age),
}


def grouped(data: ModelPairs, key: Callable[[Any], str], point: Thresholds | None,
            resamples: int) -> list[dict[str, Any]]:
    """`figures` for each value of `key` (sorted), labelled `group`."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(data.pairs):
        groups.setdefault(key(pair), []).append(i)
    return [{"group": name, **figures(data.subset(index), point, resamples)}
            for name, index in sorted(groups.items())]


def calibration(data: ModelPairs) -> dict[str, Any]:
    bins = reliability(data.probs, data.labels, CALIBRATION_BINS)
    return {"ece": _num(bins.ece), "n": len(data.labels), "bins": [
        {"low": float(bins.edges[b]), "high": float(bins.edges[b + 1]), "n": int(bins.counts[b]),
         "accuracy": _num(bins.accuracy[b]), "confidence": _num(bins.confidence[b])}
        for b in range(len(bins.counts))]}


def candidates(data: ModelPairs, point: Thresholds | None, volume: Volume,
               targets: Targets) -> list[dict[str, Any]]:
    """What other low-BMD thresholds would give on these pairs (and in flags per week)."""
    if point is None or not len(data.labels):
        return []
    wanted: list[tuple[str, float]] = [(operating_point.TARGET_SENSITIVITY, s) for s in SENSITIVITY_TARGETS]
    if targets.target_sensitivity is not None and targets.target_sensitivity not in SENSITIVITY_TARGETS:
        wanted.append((operating_point.TARGET_SENSITIVITY, targets.target_sensitivity))
    if targets.flags_per_week is not None:
        wanted.append((operating_point.FLAGS_PER_WEEK, targets.flags_per_week))
    out = []
    for basis, target in wanted:
        row: dict[str, Any] = {"basis": basis, "target": target,
                               "requested": (target == targets.target_sensitivity
                                             if basis == operating_point.TARGET_SENSITIVITY
                                             else True)}
        try:
            if basis == operating_point.TARGET_SENSITIVITY:
                low = operating_point.threshold_for_target_sensitivity(
                    data.labels, data.probs, point.osteoporosis_threshold, target)
            else:
                if volume.weeks * 7 < operating_point.MIN_VOLUME_DAYS:
                    raise OperatingPointError(f"needs {operating_point.MIN_VOLUME_DAYS} days of results")
                low = operating_point.threshold_for_flags_per_week(
                    volume.probs, volume.weeks, point.osteoporosis_threshold, target)
        except OperatingPointError as exc:
            row["error"] = str(exc)
            out.append(row)
            continue
        at = Thresholds(low_bmd_threshold=low, osteoporosis_threshold=point.osteoporosis_threshold)
        row.update(low_bmd_threshold=low, pairs=len(data.labels),
                   **operating_point.rates_at(data.labels, data.probs, at),
                   flags_per_week=volume.flags_per_week(at))
        out.append(row)
    return out


def compare(live: ModelPairs, other: ModelPairs, resamples: int) -> dict[str, Any]:
    """Low-BMD AUC of `other` minus `live` on the pairs both screened: paired patient-level
    bootstrap CI and two-sided p-value, and DeLong's test (images as independent)."""
    live_at = {p.dxa.id: i for i, p in enumerate(live.pairs)}
    both = [(live_at[p.dxa.id], j) for j, p in enumerate(other.pairs) if p.dxa.id in live_at]
    out: dict[str, Any] = {"device_uid": other.model.device_uid, "name": other.model.name,
                           "version": other.model.version, "against": live.model.device_uid,
                           "pairs": len(both)}
    if not both:
        return {**out, "auc_difference": None, "p_value": None, "delong_p_value": None}
    li, oi = (np.array(ix) for ix in zip(*both))
    y = live.labels[li] >= 1
    s_live = live.probs[li, 1] + live.probs[li, 2]
    s_other = other.probs[oi, 1] + other.probs[oi, 2]
    patients = [live.patients[i] for i in li]
    value = rank_auc(y, s_other) - rank_auc(y, s_live)
    index = bootstrap_indices(patients, patient_strata(live.labels[li], patients), resamples, SEED)
    diffs = np.concatenate([
        weighted_auc(y, s_other, w) - weighted_auc(y, s_live, w)
        for w in (bootstrap_weights(index[i:i + _BATCH], len(y)) for i in range(0, len(index), _BATCH))])
    diffs = diffs[np.isfinite(diffs)]
    p_boot = (min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
              if diffs.size else None)
    try:
        delong = delong_test(y, s_other, s_live).p_value
    except ValueError:
        delong = None
    return {**out, "low_bmd_auc_live": _num(rank_auc(y, s_live)),
            "low_bmd_auc_other": _num(rank_auc(y, s_other)),
            "auc_difference": _interval(percentile_interval(value, list(diffs)), len(both)),
            "p_value": _num(p_boot), "delong_p_value": _num(delong)}


# --------------------------------------------------------------------------- the whole report


def validate(engine: Engine, settings: Settings, *, targets: Targets | None = None,
             now: dt.datetime | None = None) -> Validation:
    """Pair, measure and compare every model that has produced results here."""
    rules = settings.validation
    resamples = rules.bootstrap_resamples
    targets = targets or Targets()
    bundles = operating_point.bundle_thresholds(settings)
    overrides = settings.referral
    with Session(engine) as session:
        pairs = load_pairs(session, rules.match_window_days)
        data = by_model(session, pairs)
        keys = models(session)
        points = {k.device_uid: operating_point.in_force(session, k.device_uid, bundles, overrides)
                  for k in keys}
        volumes = {k.device_uid: operating_point.recent_volume(session, k.device_uid, now)
                   for k in keys}
    in_force = model_roles(settings, engine)  # live, shadow, or retired (configured no more)
    roles = {k.device_uid: in_force.role_of(k.device_uid) for k in keys}
    keys.sort(key=lambda k: roles[k.device_uid] != LIVE)
    entries = []
    for key in keys:
        mp = data.get(key.device_uid) or _empty(key)
        data[key.device_uid] = mp
        point = points[key.device_uid]
        overall = figures(mp, point, resamples)
        status = status_of(len(mp.labels), overall["low_bmd_auc"]["ci_high"], rules)
        volume = volumes[key.device_uid]
        entries.append({
            "name": key.name, "version": key.version, "device_uid": key.device_uid,
            "role": roles[key.device_uid], "status": status,
            "operating_point": None if point is None else {
                **point.as_dict(), "flags_per_week": volume.flags_per_week(point)},
            **overall,
            "calibration": calibration(mp),
            "subgroups": {name: grouped(mp, fn, point, resamples) for name, fn in GROUPINGS.items()},
            "monthly": [{"month": row.pop("group"), **row} for row in grouped(
                mp, lambda pair: pair.image.image_date.strftime("%Y-%m"), point, resamples)],
            "candidates": candidates(mp, point, volume, targets),
            "recent_results": {"n": len(volume.probs), "weeks": round(volume.weeks, 2),
                               "days_counted": operating_point.VOLUME_DAYS},
        })
    live = next((data[k.device_uid] for k in keys if roles[k.device_uid] == LIVE), None)
    comparisons = [compare(live, data[k.device_uid], resamples) for k in keys
                   if live is not None and roles[k.device_uid] != LIVE]
    report = {
        "generated_at": (now or dt.datetime.now(dt.UTC).replace(tzinfo=None)).isoformat(timespec="seconds"),
        "match_window_days": rules.match_window_days, "min_pairs": rules.min_pairs,
        "min_low_bmd_auc": rules.min_low_bmd_auc, "bootstrap_resamples": resamples,
        "small_sample_below": SMALL_N, "paired_dxa_results": len(pairs),
        "models": entries, "comparisons": comparisons,
    }
    return Validation(report, data, points)


def _empty(key: ModelKey) -> ModelPairs:
    return ModelPairs(key, (), np.zeros(0, dtype=np.int64), np.zeros((0, 3)))


def live_status(report: Mapping[str, Any]) -> str | None:
    """The live model's status in a report (None when the live model has no results yet)."""
    return next((m["status"] for m in report["models"] if m["role"] == LIVE), None)


def live_model_status(engine: Engine, settings: Settings) -> str | None:
    """The live model's status alone (pairs and low-BMD AUC CI; no subgroups): the worklist's
    warning banner asks this often. None while the live model has produced no results."""
    live = model_roles(settings, engine).live.device_uid
    with Session(engine) as session:
        data = by_model(session, load_pairs(session, settings.validation.match_window_days)).get(live)
    if data is None:
        return None
    ci = bootstrap(data, None, settings.validation.bootstrap_resamples)["low_bmd_auc"]
    return status_of(len(data.labels), _num(ci.ci_high), settings.validation)
