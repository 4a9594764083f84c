"""Operating points: the thresholds at which each model's results refer a patient.

An operating point belongs to a model version (Device UID). The one in force is, key by key:

1. a `[referral]` threshold set in the configuration: an explicit override for every model;
2. else the site operating point that an admin set for this Device UID (table
   `operating_points`, versioned, the highest version in force);
3. else the thresholds validated with the model, from its bundle.json (`thresholds`).

A site operating point is chosen from local data: the DXA pairs for a target sensitivity, the
model's recent results for a target number of flags per week (the DXA capacity), or given as a
low-BMD threshold. The osteoporosis threshold stays what was in force (bundle or override): the
low-BMD rule is the one a site tunes. Every change is a new row and an audit event.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import audit
from .db import Result, SiteOperatingPoint, utcnow
from .errors import OsteoNodeError
from .manifest import read_manifest, resolve_bundle_path
from .metrics import threshold_for_sensitivity

if TYPE_CHECKING:
    from .config import Settings

#: How a site operating point was chosen (`operating_points.basis`).
TARGET_SENSITIVITY, FLAGS_PER_WEEK, MANUAL, BUNDLE = (
    "target-sensitivity", "flags-per-week", "manual", "bundle")
#: Where a threshold in force comes from.
FROM_CONFIG, FROM_SITE, FROM_BUNDLE = "config", "site", "bundle"
#: Flags per week are counted over the model's results of the last this many days.
VOLUME_DAYS = 91
#: ... of which at least this many must be covered, else the weekly volume is a guess.
MIN_VOLUME_DAYS = 7


class OperatingPointError(OsteoNodeError):
    """An operating point cannot be set as asked (too few pairs, unknown model, target out of
    range); the message says what is missing and what to do instead."""


class Overrides(Protocol):
    """The `[referral]` thresholds (osteo_node.refer.ReferralPolicy): None where not set."""

    @property
    def osteoporosis_threshold(self) -> float | None: ...
    @property
    def low_bmd_threshold(self) -> float | None: ...


@dataclass(frozen=True)
class Thresholds:
    """The two referral thresholds (osteo_node.refer.risk_rule)."""

    low_bmd_threshold: float
    osteoporosis_threshold: float


#: Device UID -> the thresholds validated with that model (its bundle.json).
BundleThresholds = Mapping[str, Thresholds]


@dataclass(frozen=True)
class OperatingPoint(Thresholds):
    """The thresholds in force for one model, and where each comes from."""

    device_uid: str = ""
    low_bmd_source: str = FROM_BUNDLE
    osteoporosis_source: str = FROM_BUNDLE
    #: The site operating point's version when one is in force.
    version: int | None = None

    @property
    def source(self) -> str:
        """"bundle", "site v3", "config", or "low BMD: site v3; osteoporosis: config"."""
        def name(src: str) -> str:
            return f"site v{self.version}" if src == FROM_SITE else src
        if self.low_bmd_source == self.osteoporosis_source:
            return name(self.low_bmd_source)
        return f"low BMD: {name(self.low_bmd_source)}; osteoporosis: {name(self.osteoporosis_source)}"

    def as_dict(self) -> dict[str, Any]:
        return {"low_bmd_threshold": self.low_bmd_threshold,
                "osteoporosis_threshold": self.osteoporosis_threshold,
                "source": self.source, "version": self.version}


# --------------------------------------------------------------------------- what is in force


def configured_bundles(settings: Settings) -> list[str]:
    """The bundles this node runs, live and shadow (their manifests give the default thresholds):
    a shadow promoted to live refers at its own bundle's thresholds from its first result."""
    return [settings.model.bundle, *settings.model.shadow]


def manifest_thresholds(manifest: Mapping[str, Any]) -> dict[str, Thresholds]:
    """{Device UID: thresholds} of one bundle manifest ({} when it has no thresholds)."""
    values = manifest.get("thresholds") or {}
    if "low_bmd" not in values or "osteoporosis" not in values:
        return {}
    return {str(manifest["device_uid"]): Thresholds(float(values["low_bmd"]),
                                                    float(values["osteoporosis"]))}


def bundle_thresholds(settings: Settings) -> dict[str, Thresholds]:
    """Device UID -> thresholds of every configured bundle, read from bundle.json (no torch)."""
    out: dict[str, Thresholds] = {}
    for bundle in configured_bundles(settings):
        out.update(manifest_thresholds(read_manifest(resolve_bundle_path(bundle))))
    return out


def latest_site_point(session: Session, device_uid: str) -> SiteOperatingPoint | None:
    return session.scalars(select(SiteOperatingPoint).where(SiteOperatingPoint.device_uid == device_uid)
                           .order_by(SiteOperatingPoint.version.desc())).first()


def in_force(session: Session, device_uid: str, bundles: BundleThresholds,
             overrides: Overrides | None = None) -> OperatingPoint | None:
    """The operating point in force for `device_uid`; None when no threshold is known for it."""
    site = latest_site_point(session, device_uid)
    base = bundles.get(device_uid)
    chosen: dict[str, tuple[float, str]] = {}
    for key in ("low_bmd_threshold", "osteoporosis_threshold"):
        override = getattr(overrides, key, None) if overrides is not None else None
        if override is not None:
            chosen[key] = (float(override), FROM_CONFIG)
        elif site is not None:
            chosen[key] = (float(getattr(site, key)), FROM_SITE)
        elif base is not None:
            chosen[key] = (getattr(base, key), FROM_BUNDLE)
        else:
            return None
    return OperatingPoint(
        low_bmd_threshold=chosen["low_bmd_threshold"][0],
        osteoporosis_threshold=chosen["osteoporosis_threshold"][0], device_uid=device_uid,
        low_bmd_source=chosen["low_bmd_threshold"][1],
        osteoporosis_source=chosen["osteoporosis_threshold"][1],
        version=site.version if site is not None else None)


def history(session: Session, device_uid: str | None = None) -> list[SiteOperatingPoint]:
    """Every site operating point (newest first), of one model or of all."""
    query = select(SiteOperatingPoint).order_by(SiteOperatingPoint.id.desc())
    if device_uid:
        query = query.where(SiteOperatingPoint.device_uid == device_uid)
    return list(session.scalars(query))


# --------------------------------------------------------------------------- choosing one


def _effective_low_bmd(probs: np.ndarray, osteoporosis_threshold: float) -> np.ndarray:
    """The low-BMD score, +inf where the osteoporosis rule fires anyway (flagged at any low-BMD
    threshold), so that choosing the low-BMD threshold accounts for both rules."""
    from .refer import flagged

    p = np.asarray(probs, dtype=np.float64)
    never = Thresholds(low_bmd_threshold=math.inf, osteoporosis_threshold=osteoporosis_threshold)
    return np.where(flagged(p, never), math.inf, p[:, 1] + p[:, 2])


def threshold_for_target_sensitivity(labels: np.ndarray, probs: np.ndarray,
                                     osteoporosis_threshold: float, target: float) -> float:
    """The highest low-BMD threshold at which the referral rule finds at least `target` of the
    low-BMD pairs (label >= 1), the osteoporosis threshold held."""
    score = _effective_low_bmd(probs, osteoporosis_threshold)
    try:
        threshold = threshold_for_sensitivity(np.asarray(labels) >= 1, score, target)
    except ValueError as exc:
        raise OperatingPointError(f"target sensitivity: {exc}") from exc
    return min(threshold, 1.0)


def threshold_for_flags_per_week(probs: np.ndarray, weeks: float, osteoporosis_threshold: float,
                                 flags_per_week: float) -> float:
    """The lowest low-BMD threshold at which the model's results would have been flagged at most
    `flags_per_week` times a week (results `probs` over `weeks` weeks)."""
    if flags_per_week < 0:
        raise OperatingPointError(f"flags per week must be >= 0, got {flags_per_week!r}")
    score = np.sort(_effective_low_bmd(probs, osteoporosis_threshold))[::-1]
    allowed = math.floor(flags_per_week * weeks + 1e-9)
    if allowed >= score.size:
        return 0.0
    if math.isinf(score[allowed]):
        forced = int(np.isinf(score).sum())
        raise OperatingPointError(
            f"the osteoporosis rule alone flags {forced / weeks:.1f} a week (threshold "
            f"{osteoporosis_threshold:.3f}), more than {flags_per_week:g}: no low-BMD threshold can "
            "reach that capacity")
    # just above the first score that must not be flagged (ties stay unflagged: at most N a week)
    return min(1.0, float(score[allowed]) + 1e-6)


def rates_at(labels: np.ndarray, probs: np.ndarray, point: Thresholds) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV (low BMD) and flag rate of the referral rule at `point`."""
    from .refer import flagged

    y = np.asarray(labels) >= 1
    f = flagged(probs, point)

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"sensitivity": ratio(int((f & y).sum()), int(y.sum())),
            "specificity": ratio(int((~f & ~y).sum()), int((~y).sum())),
            "ppv": ratio(int((f & y).sum()), int(f.sum())),
            "npv": ratio(int((~f & ~y).sum()), int((~f).sum())),
            "flag_rate": ratio(int(f.sum()), int(y.size))}


@dataclass(frozen=True, eq=False)
class Volume:
    """A model's recent results: their probabilities and the weeks they cover."""

    probs: np.ndarray
    weeks: float

    def flags_per_week(self, point: Thresholds) -> float | None:
        from .refer import flagged

        if self.weeks * 7 < MIN_VOLUME_DAYS or not len(self.probs):
            return None
        return float(flagged(self.probs, point).sum() / self.weeks)


def recent_volume(session: Session, device_uid: str, now: dt.datetime | None = None) -> Volume:
    """The model's results of the last VOLUME_DAYS days; weeks from the oldest of them to now."""
    now = now or utcnow()
    rows = session.execute(
        select(Result.p_normal, Result.p_osteopenia, Result.p_osteoporosis, Result.created_at)
        .where(Result.device_uid == device_uid,
               Result.created_at >= now - dt.timedelta(days=VOLUME_DAYS))).all()
    if not rows:
        return Volume(np.zeros((0, 3)), 0.0)
    oldest = min(r[3] for r in rows)
    probs = np.array([r[:3] for r in rows], dtype=np.float64)
    return Volume(probs, max((now - oldest).total_seconds(), 0.0) / (7 * 86400))


# --------------------------------------------------------------------------- setting one


@dataclass(frozen=True)
class Choice:
    """What an admin asks for: exactly one of a target sensitivity, a number of flags per week,
    a low-BMD threshold, or the bundle's thresholds back."""

    target_sensitivity: float | None = None
    flags_per_week: float | None = None
    low_bmd_threshold: float | None = None
    bundle_default: bool = False

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.target_sensitivity, self.flags_per_week,
                                          self.low_bmd_threshold)] + [self.bundle_default]
        if sum(given) != 1:
            raise OperatingPointError("give exactly one of a target sensitivity, flags per week, "
                                      "a low-BMD threshold, or the bundle default")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity <= 1:
            raise OperatingPointError(
                f"target sensitivity must be in (0, 1], got {self.target_sensitivity!r}")
        if self.low_bmd_threshold is not None and not 0 <= self.low_bmd_threshold <= 1:
            raise OperatingPointError(
                f"low-BMD threshold must be in [0, 1], got {self.low_bmd_threshold!r}")
        if self.flags_per_week is not None and not self.flags_per_week >= 0:
            raise OperatingPointError(f"flags per week must be >= 0, got {self.flags_per_week!r}")

    @property
    def basis(self) -> str:
        if self.target_sensitivity is not None:
            return TARGET_SENSITIVITY
        if self.flags_per_week is not None:
            return FLAGS_PER_WEEK
        return MANUAL if self.low_bmd_threshold is not None else BUNDLE

    @property
    def target(self) -> float | None:
        return self.target_sensitivity if self.target_sensitivity is not None else self.flags_per_week


def set_point(engine: Engine, settings: Settings, device_uid: str, choice: Choice, actor: str,
              *, now: dt.datetime | None = None) -> SiteOperatingPoint:
    """Choose and record a new site operating point for `device_uid` (a new version), audited."""
    from .pairing import (
        load_model_pairs,  # pairing reads results; import here to keep this light
    )

    bundles = bundle_thresholds(settings)
    data = load_model_pairs(engine, settings.validation.match_window_days).get(device_uid)
    with Session(engine) as session:
        model = session.execute(select(Result.model_name, Result.model_version)
                                .where(Result.device_uid == device_uid).limit(1)).first()
        if model is None:
            raise OperatingPointError(f"no model with Device UID {device_uid} has produced results "
                                      "here (see `osteo-node operating-point show`)")
        current = in_force(session, device_uid, bundles)  # without config overrides
        volume = recent_volume(session, device_uid, now)
    bundle = bundles.get(device_uid)
    osteoporosis = (current.osteoporosis_threshold if current is not None
                    else bundle.osteoporosis_threshold if bundle is not None else None)
    n_pairs = 0 if data is None else len(data.labels)
    if choice.bundle_default:
        if bundle is None:
            raise OperatingPointError(f"the bundle of Device UID {device_uid} is not configured: its "
                                      "thresholds are unknown; give --low-bmd-threshold instead")
        low, osteoporosis = bundle.low_bmd_threshold, bundle.osteoporosis_threshold
    elif osteoporosis is None:
        raise OperatingPointError(f"no osteoporosis threshold is known for Device UID {device_uid} "
                                  "(its bundle is not configured)")
    elif choice.low_bmd_threshold is not None:
        low = choice.low_bmd_threshold
    elif choice.target_sensitivity is not None:
        if data is None or n_pairs < settings.validation.min_pairs:
            raise OperatingPointError(
                f"a target sensitivity needs at least validation.min_pairs = "
                f"{settings.validation.min_pairs} DXA pairs for this model; it has {n_pairs}. Wait for "
                "more DXA results, or give --low-bmd-threshold")
        low = threshold_for_target_sensitivity(data.labels, data.probs, osteoporosis,
                                               choice.target_sensitivity)
    else:
        assert choice.flags_per_week is not None
        if volume.weeks * 7 < MIN_VOLUME_DAYS:
            raise OperatingPointError(
                f"flags per week needs at least {MIN_VOLUME_DAYS} days of this model's results; it "
                f"has {volume.weeks * 7:.1f} days. Wait, or give --low-bmd-threshold")
        low = threshold_for_flags_per_week(volume.probs, volume.weeks, osteoporosis,
                                           choice.flags_per_week)
    point = Thresholds(low_bmd_threshold=float(low), osteoporosis_threshold=float(osteoporosis))
    expected: dict[str, Any] = {"flags_per_week": volume.flags_per_week(point)}
    if data is not None and n_pairs:
        expected.update(rates_at(data.labels, data.probs, point))
    try:
        with Session(engine) as session, session.begin():
            version = (session.scalar(select(func.max(SiteOperatingPoint.version))
                                      .where(SiteOperatingPoint.device_uid == device_uid)) or 0) + 1
            row = SiteOperatingPoint(
                device_uid=device_uid, model_name=model[0], model_version=model[1], version=version,
                low_bmd_threshold=point.low_bmd_threshold,
                osteoporosis_threshold=point.osteoporosis_threshold, basis=choice.basis,
                target=choice.target, pairs=n_pairs, expected=json.dumps(expected), actor=actor[:64],
                created_at=now or utcnow())
            session.add(row)
            session.flush()
            audit.record(session, actor, "operating_point.set", "model", device_uid,
                         detail=f"version {version}: {choice.basis}"
                                f"{'' if choice.target is None else f' {choice.target:g}'}; low BMD "
                                f"{point.low_bmd_threshold:.4f}, osteoporosis "
                                f"{point.osteoporosis_threshold:.4f}; {n_pairs} pairs")
            session.expunge(row)
            return row
    except IntegrityError as exc:
        raise OperatingPointError("another operating point was set for this model at the same "
                                  "moment: look at the history and try again") from exc
