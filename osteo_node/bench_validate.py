"""How long `osteo-node validate` takes: a scratch database (SQLite, or PostgreSQL when the config
names one) filled with a synthetic site (screened images, model results, DXA results), then
validate timed end to end (pairing queries, bootstrap, subgroups, drift, comparison).

    python -m osteo_node.bench_validate [--config FILE] [--pairs 10000] [--repeats 3]

`fill_site` also serves the tests: it writes the rows the node writes, with known truth.
Nothing is kept: every database is temporary (osteo_node.bench.ScratchDatabases).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import migrate
from .config import Settings, load_settings
from .db import DxaResult, Instance, Result, ScreenedImage, make_engine, utcnow


@dataclass(frozen=True)
class SyntheticModel:
    """A model whose low-BMD score follows the truth with this strength (0: pure noise)."""

    name: str
    version: str
    device_uid: str
    skill: float


def _probs(t_scores: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Three-class probabilities whose low-BMD part rises as the T-score falls (by `skill`)."""
    latent = -skill * (t_scores + 1.0) + rng.normal(0.0, 1.0, t_scores.size)
    p_low = 1.0 / (1.0 + np.exp(-latent))
    share = 1.0 / (1.0 + np.exp(-(-skill * (t_scores + 2.5) + rng.normal(0, 1.0, t_scores.size))))
    p_op = p_low * share
    return np.stack([1.0 - p_low, p_low - p_op, p_op], axis=1)


def fill_site(engine: Engine, pairs: int, models: Sequence[SyntheticModel], *, seed: int = 0,
              first_day: dt.date = dt.date(2026, 1, 5), days: int = 150,
              manufacturers: Sequence[str] = ("ACME", "Globex")) -> None:
    """`pairs` patients, each with one screened image (results of every model) and one DXA result
    within 60 days of it. T-scores ~ N(-1.4, 1.1), so about 60% have low BMD."""
    rng = np.random.default_rng(seed)
    t = np.clip(rng.normal(-1.4, 1.1, pairs), -6.5, 4.0)
    image_day = rng.integers(0, days, pairs)
    gap = rng.integers(-60, 61, pairs)
    ages = rng.uniform(50, 90, pairs)
    now = utcnow()
    probs = {m.device_uid: _probs(t, m.skill, rng) for m in models}
    with Session(engine) as session, session.begin():
        base = session.query(Instance).count()
        session.execute(insert(Instance), [
            {"id": base + i + 1, "sop_instance_uid": f"2.25.{seed}{base + i + 1}",
             "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1", "path": "", "size_bytes": 0,
             "calling_ae": "BENCH", "eligible": True, "reason": "synthetic", "received_at": now}
            for i in range(pairs)])
        session.execute(insert(ScreenedImage), [
            {"instance_id": base + i + 1, "patient_id": f"S{seed}-{base + i}",
             "issuer_of_patient_id": "SITE", "image_date": first_day + dt.timedelta(days=int(image_day[i])),
             "age": float(ages[i]), "manufacturer": manufacturers[i % len(manufacturers)],
             "modality": "CR" if i % 3 else "DX", "view_position": "PA" if i % 4 else "AP",
             "created_at": now}
            for i in range(pairs)])
        for m in models:
            p = probs[m.device_uid]
            session.execute(insert(Result), [
                {"instance_id": base + i + 1, "device_uid": m.device_uid, "model_name": m.name,
                 "model_version": m.version, "p_normal": float(p[i, 0]),
                 "p_osteopenia": float(p[i, 1]), "p_osteoporosis": float(p[i, 2]),
                 "category": ("normal", "osteopenia", "osteoporosis")[int(p[i].argmax())],
                 "sr_path": "", "sc_path": "", "sr_sop_instance_uid": "", "sc_sop_instance_uid": "",
                 "created_at": now - dt.timedelta(days=int(days - image_day[i]) % 90)}
                for i in range(pairs)])
        session.execute(insert(DxaResult), [
            {"patient_id": f"S{seed}-{base + i}", "issuer_of_patient_id": "SITE",
             "dxa_date": min(first_day + dt.timedelta(days=int(image_day[i] + gap[i])), dt.date.today()),
             "t_lumbar_spine": float(round(t[i], 1)), "t_femoral_neck": None,
             "t_total_hip": float(round(t[i] + 0.3, 1)), "source": "csv",
             "source_ref": f"bench:{i}", "actor": "bench", "fingerprint": f"bench-{seed}-{base + i}",
             "received_at": now}
            for i in range(pairs)])


def time_validate(settings: Settings, engine: Engine, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds and this process's CPU seconds of each of `repeats` validate runs (CPU time
    stays meaningful on a shared machine; the database server's own CPU is not in it)."""
    from .validate import validate

    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        validate(engine, settings)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteo_node.bench_validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML config; its database kind is benchmarked "
                        "(PostgreSQL: a scratch database on that server)")
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shadow", action="store_true", help="a second (shadow) model too")
    args = parser.parse_args(argv)
    from .bench import ScratchDatabases
    from .manifest import read_manifest, resolve_bundle_path

    settings = load_settings(args.config) if args.config else Settings()
    live = read_manifest(resolve_bundle_path(settings.model.bundle))
    models = [SyntheticModel(live["name"], live["version"], live["device_uid"], 1.2)]
    if args.shadow:
        models.append(SyntheticModel("candidate", "0.0.1", "2.25.4242", 1.5))
    with tempfile.TemporaryDirectory() as tmp, ScratchDatabases(settings.database_url) as scratch:
        url = scratch.url(Path(tmp))
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            start = time.perf_counter()
            fill_site(engine, args.pairs, models)
            fill_s = time.perf_counter() - start
            seconds, cpu = time_validate(settings, engine, args.repeats)
        finally:
            engine.dispose()
    figures = {"database": scratch.backend, "pairs": args.pairs, "models": len(models),
               "bootstrap_resamples": settings.validation.bootstrap_resamples,
               "fill_s": round(fill_s, 2), "validate_s": [round(s, 2) for s in seconds],
               "median_s": round(statistics.median(seconds), 2),
               "spread_s": round(max(seconds) - min(seconds), 2),
               "cpu_s": [round(s, 2) for s in cpu], "median_cpu_s": round(statistics.median(cpu), 2),
               "load_average": [round(x, 1) for x in os.getloadavg()]}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
