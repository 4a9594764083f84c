"""Benchmark: how long the worklist pages take with many referrals (issue 16: 0.1-0.2 s at 20,000).

Seeds a scratch SQLite database (or the PostgreSQL URL given) with N referrals, signs in through
the real login, then times each page REPEAT times in process (FastAPI TestClient: the whole
application, no network) and prints median and p95 per page. A measurement, not a test.

    PYTHONPATH=$PWD .venv/bin/python scripts/worklist_bench.py --referrals 20000 --repeat 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.db import (
    DxaResult,
    Instance,
    Referral,
    ReferralEvent,
    Result,
    make_engine,
    utcnow,
)
from osteo_node.web.auth import add_user

PASSWORD = "correct horse battery"
FAMILY = ("Rossi", "Keller", "Meier", "Smith", "Dubois", "Nowak", "Garcia", "Olsen", "Brun", "Weber")
GIVEN = ("Maria", "Ruth", "Anna", "Jane", "Claire", "Eva", "Lucia", "Ingrid", "Marta", "Heidi")
PAGES = {
    "worklist (open, longest waiting)": "/referrals",
    "all statuses, by risk": "/referrals?status=all&sort=risk",
    "search by name": "/referrals?q=keller+anna",
    "search by patient id": "/referrals?q=P0012345",
    "page 100": "/referrals?status=all&page=100",
    "one referral": "/referrals/{rid}",
}


def seed(engine: Engine, n: int, rng: random.Random) -> None:
    """`n` referrals (with instance and result rows), a history event each, DXA rows for a tenth."""
    now = utcnow()
    instances, results, referrals, events, dxa = [], [], [], [], []
    statuses = ("new",) * 5 + ("contacted", "scheduled", "completed", "declined", "dismissed")
    for i in range(1, n + 1):
        created = now - dt.timedelta(minutes=rng.randrange(0, 730 * 24 * 60))
        p_op = rng.uniform(0.3, 0.95)
        instances.append(dict(id=i, sop_instance_uid=f"2.25.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                              study_instance_uid=f"2.25.9{i}", path=f"incoming/{i}.dcm", size_bytes=1,
                              calling_ae="BENCH", received_at=created, eligible=True, reason="eligible"))
        results.append(dict(id=i, instance_id=i, device_uid="2.25.77", model_name="bench", model_version="1",
                            p_normal=(1 - p_op) / 2, p_osteopenia=(1 - p_op) / 2, p_osteoporosis=p_op,
                            category="osteoporosis", sr_path="x", sc_path="x", sr_sop_instance_uid=f"2.25.5{i}",
                            sc_sop_instance_uid=f"2.25.6{i}", created_at=created))
        patient = f"P{i:07d}"
        referrals.append(dict(
            id=i, status=rng.choice(statuses), risk_category="osteoporosis", rule="osteoporosis",
            patient_id=patient, issuer_of_patient_id="", patient_name=f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
            birth_date=dt.date(1950, 1, 1), sex="F", age=rng.uniform(50, 90), accession_number=f"A{i}",
            study_date=created.date(), study_instance_uid=f"2.25.9{i}", sop_instance_uid=f"2.25.{i}",
            patient_phone="+41 44 000 00 00" if i % 3 else "", referring_physician="Frei^Urs",
            assigned_to="", result_id=i, p_normal=(1 - p_op) / 2, p_osteopenia=(1 - p_op) / 2,
            p_osteoporosis=p_op, model_name="bench", model_version="1", device_uid="2.25.77",
            osteoporosis_threshold=0.5, low_bmd_threshold=0.8, created_at=created, updated_at=created))
        events.append(dict(referral_id=i, at=created, actor="osteo-node", kind="created", to_status="new",
                           reason="rule osteoporosis fired", sop_instance_uid=f"2.25.{i}", result_id=i))
        if i % 10 == 0:
            dxa.append(dict(patient_id=patient, issuer_of_patient_id="", dxa_date=created.date(),
                            t_lumbar_spine=rng.uniform(-4, 1), source="hl7", source_ref=f"MSG{i}",
                            actor="", fingerprint=f"{i:064d}", received_at=now))
    with Session(engine) as session, session.begin():
        for model, rows in ((Instance, instances), (Result, results), (Referral, referrals),
                            (ReferralEvent, events), (DxaResult, dxa)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(model), rows[start:start + 5000])
        add_user(session, "bench", "coordinator", PASSWORD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--referrals", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per page (after 2 warm-ups)")
    parser.add_argument("--database-url", help="a scratch database (default: SQLite in a temp folder)")
    args = parser.parse_args()
    if not 1 <= args.repeat <= 1000 or not 1 <= args.referrals <= 1_000_000:
        parser.error("--repeat 1..1000 and --referrals 1..1000000")

    from fastapi.testclient import TestClient

    from osteo_node.config import parse_settings
    from osteo_node.web import create_app

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        engine = make_engine(url)
        migrate.upgrade(engine)
        started = time.perf_counter()
        seed(engine, args.referrals, random.Random(16))
        print(f"seeded {args.referrals} referrals in {time.perf_counter() - started:.1f} s "
              f"({engine.dialect.name}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        settings = parse_settings({"node": {"data_dir": tmp}, "web": {"secret_key": "b" * 40}}, Path(tmp))
        client = TestClient(create_app(settings, engine=engine), follow_redirects=False)
        token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        assert client.post("/login", data={"name": "bench", "password": PASSWORD,
                                           "csrf_token": token}).status_code == 303
        print(f"{'page':36} {'median s':>9} {'p95 s':>7} {'max s':>7}")
        for name, path in PAGES.items():
            path = path.format(rid=args.referrals // 2)
            times = []
            for i in range(args.repeat + 2):
                start = time.perf_counter()
                response = client.get(path)
                elapsed = time.perf_counter() - start
                assert response.status_code == 200, (path, response.status_code)
                if i >= 2:
                    times.append(elapsed)
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            print(f"{name:36} {statistics.median(times):9.3f} {p95:7.3f} {times[-1]:7.3f}")
        engine.dispose()


if __name__ == "__main__":
    main()
